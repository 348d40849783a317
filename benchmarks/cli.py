"""The command line's start-up: `shira-diffusion --help` and a subcommand's help, next to importing torch (what
they took before the imports moved to where they are needed) — wall time of a fresh process, median of runs.

Usage: python -m benchmarks.cli [--repeats 5] [--smoke]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from .common import parser, write_result

COMMANDS = {
    "shira-diffusion --help": [sys.executable, "-m", "shira_diffusion.cli", "--help"],
    "shira-diffusion train --help": [sys.executable, "-m", "shira_diffusion.cli", "train", "--help"],
    "shira-diffusion eval --help": [sys.executable, "-m", "shira_diffusion.cli", "eval", "--help"],
    "python -c 'import torch, diffusers' (reference)": [sys.executable, "-c", "import torch, diffusers"],
}


def seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms the file cache
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    repeats = 1 if args.smoke else args.repeats
    rows = [{"command": label, "seconds": seconds(command, repeats)} for label, command in COMMANDS.items()]
    write_result("cli", rows, args.out, [f"median of {repeats} fresh processes after one warm-up run"], {"smoke": args.smoke})


if __name__ == "__main__":
    main()
