"""Run every benchmark in full mode (or --smoke) and write results/summary.md: one table per benchmark,
with the machine it ran on.

Usage: python -m benchmarks.run_all [--smoke] [--device cpu|cuda] [--only switch exactness ...] [--summary-only]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .common import RESULTS

BENCHMARKS = ("switch", "exactness", "overhead", "compile", "training", "size", "masks", "eval", "world_quality", "fidelity", "cli")
ON_DEVICE = {"switch", "exactness", "overhead", "compile", "training", "eval"}  # size and masks are CPU work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--device", choices=["cpu", "cuda"], help="for the benchmarks with a GPU side (default: cuda when torch sees one)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild summary.md from the tables already in --out")
    args = parser.parse_args()
    out = Path(args.out)
    for name in [] if args.summary_only else args.only:  # one process each: no memory or compile state carried over
        device = ["--device", args.device] if args.device and name in ON_DEVICE else []
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--out", str(out), *device] + (["--smoke"] if args.smoke else []), check=True)
    names = [n for name in BENCHMARKS for n in (name, *(["training_latent64"] if name == "training" else []))]
    parts = [(out / f"{name}.md").read_text() for name in names if (out / f"{name}.md").is_file()]
    (out / "summary.md").write_text("\n".join(parts))
    print(f"wrote {out / 'summary.md'}")


if __name__ == "__main__":
    main()
