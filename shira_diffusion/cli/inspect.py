"""`shira-diffusion inspect FILE [FILE2]`: what is in an adapter, and how two would interfere.

Usage: shira-diffusion inspect bluefire.safetensors paintings.safetensors [--json]
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a SHiRA adapter (.safetensors)")
    parser.add_argument("file2", nargs="?", help="a second adapter: report their interference")
    parser.add_argument("--top", type=int, default=10, help="layers to list in the interference table (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    from ..format import ShiraAdapter
    from ..inspection import format_interference, format_summary, interference, summarize

    result = {"adapters": [summarize(args.file)] + ([summarize(args.file2)] if args.file2 else [])}
    if args.file2:
        result["interference"] = interference(ShiraAdapter.load(args.file), ShiraAdapter.load(args.file2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for info in result["adapters"]:
        print(format_summary(info))
    if args.file2:
        print(format_interference(result["interference"], args.top))
    return 0
