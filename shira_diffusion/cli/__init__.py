"""`shira-diffusion` command line: one subcommand per module in this package.

Each subcommand module defines `add_arguments(parser)` (cheap: no torch/diffusers imports at module level)
and `run(args) -> int` (does the work, importing what it needs). User errors (bad files, bad flags,
bad data) print one clear line and exit with status 2; set SHIRA_DEBUG=1 to see the traceback.

Usage: shira-diffusion train --pretrained_model_name_or_path PATH --train_data_dir DIR --output_dir OUT
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# subcommand -> (module in shira_diffusion.cli, one-line help)
SUBCOMMANDS = {
    "train": ("train", "train a SHiRA (or LoRA baseline) style adapter, DreamBooth-style, on accelerate"),
    "eval": ("evaluate", "generate and score single and fused styles with HPSv2"),
    "convert": ("convert", "convert a LoRA file into a SHiRA adapter"),
    "extract": ("extract", "extract a SHiRA adapter from a full fine-tune"),
    "inspect": ("inspect", "summarise an adapter file, or the interference between two"),
    "demo": ("demo", "the whole story offline on the shapes world: train styles, switch, fuse, judge, report"),
    "dataset": ("dataset", "check a style dataset folder"),
}


def _available() -> dict[str, object]:
    modules = {}
    for command, (module_name, _) in SUBCOMMANDS.items():
        try:
            modules[command] = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{module_name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shira-diffusion", description="Sparse High Rank Adapters for diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, module in _available().items():
        sub_parser = sub.add_parser(command, help=SUBCOMMANDS[command][1], description=SUBCOMMANDS[command][1])
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        if os.environ.get("SHIRA_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
