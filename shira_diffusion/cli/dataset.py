"""`shira-diffusion dataset check DIR`: every defect of a style image folder, by file name.

Usage: shira-diffusion dataset check my_style/ --resolution 512 --require_license
"""

from __future__ import annotations

import argparse

from . import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate an image folder with captions")
    check.add_argument("folder")
    check.add_argument("--resolution", type=positive_int, default=None, help="flag images smaller than this (the training resolution)")
    check.add_argument("--require_license", action="store_true", help="every metadata.jsonl row needs a license field (CC0 / public domain)")
    check.add_argument("--any_license", action="store_true", help="with --require_license: accept licences other than CC0")


def run(args: argparse.Namespace) -> int:
    from ..datasets import check_dataset

    defects, stats = check_dataset(args.folder, args.resolution, args.require_license, cc0_only=not args.any_license)
    sizes = f", sizes {stats['min_size'][0]}x{stats['min_size'][1]} .. {stats['max_size'][0]}x{stats['max_size'][1]}" if "min_size" in stats else ""
    print(f"{args.folder}: {stats['images']} images, {stats.get('captioned', 0)} with captions{sizes}")
    for defect in defects:
        print(f"  {defect}")
    print("ok" if not defects else f"{len(defects)} problem(s) found")
    return 0 if not defects else 1
