"""`shira-diffusion` command line: one subcommand per module in this package.

Each subcommand module defines `add_arguments(parser)` (cheap: no torch/diffusers imports at module level)
and `run(args) -> int` (does the work, importing what it needs). User errors (bad files, bad flags,
bad data, and whatever the operating system refuses: a full disk, a read-only or forbidden folder) print one
clear line `error: ...` and exit with status 2; set SHIRA_DEBUG=1 to see the traceback.

Usage: shira-diffusion train --pretrained_model_name_or_path PATH --train_data_dir DIR --output_dir OUT
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Sequence

FLOAT32_MAX = 3.4028234663852886e38

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


class _Parser(argparse.ArgumentParser):
    """Flags are spelled with underscores, as in diffusers' scripts; each one's hyphenated spelling is accepted too
    (`--match-params` is `--match_params`). Subcommand parsers are of this class as well."""

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*_underscored(names), **kwargs)

    def add_argument_group(self, *args, **kwargs):
        return _spelling_underscores(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        return _spelling_underscores(super().add_mutually_exclusive_group(**kwargs))

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        known = {option for action in self._actions for option in action.option_strings}
        return super().parse_known_args([_respelled(token, known) for token in args], namespace)


def _underscored(names: Sequence[str]) -> list[str]:
    return [f"--{name[2:].replace('-', '_')}" if name.startswith("--") else name for name in names]


def _spelling_underscores(group):
    """An argument group whose flags are spelled with underscores too (groups do not call the parser's add_argument)."""
    add = group.add_argument
    group.add_argument = lambda *names, **kwargs: add(*_underscored(names), **kwargs)
    return group


def _respelled(token: str, known: set[str]) -> str:
    """`--foo-bar[=v]` as `--foo_bar[=v]` when that is a flag of this parser; anything else unchanged."""
    if not token.startswith("--"):
        return token
    name, equals, value = token.partition("=")
    underscored = f"--{name[2:].replace('-', '_')}"
    return f"{underscored}{equals}{value}" if name not in known and underscored in known else token


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser. With `command`, only that subcommand's module is imported and its flags added (the others
    are listed by name): `shira-diffusion --help` imports nothing heavy. Usage: build_parser().parse_args(argv)"""
    parser = _Parser(prog="shira-diffusion", description="Sparse High Rank Adapters for diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            module = importlib.import_module(f"{__name__}.{module_name}")
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of zero would run and do nothing). Usage: type=positive_int"""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def float32(text: str) -> float:
    """argparse type: a finite number that fits float32, the dtype strengths are applied in. Usage: type=float32"""
    value = float(text)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be a finite number with |x| <= {FLOAT32_MAX!r} (float32), got {text}")
    return value


def resolution(text: str) -> int:
    """argparse type: an image side the pipelines take (a positive multiple of 8, at most 4096). Usage: type=resolution"""
    from ..data import check_resolution  # torch: only when the flag is given, at parse time

    value = int(text)
    try:
        check_resolution(value, "the image size")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _user_errors() -> tuple[type[BaseException], ...]:
    """What bad input or the operating system raise: OSError (missing, forbidden, read-only, full disk ...),
    ValueError (our format errors, bad JSON / UTF-8), safetensors' SafetensorError, and the RecursionError /
    OverflowError / EOFError that parsers raise on absurd or cut-short files."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, RecursionError, OverflowError, EOFError)
    if "safetensors" in sys.modules:  # loaded by whatever raised it; never imported just for this
        errors += (sys.modules["safetensors"].SafetensorError,)
    return errors


def describe_error(error: BaseException) -> str:
    """One line for `error: ...`: "path: reason" for OS errors, the message (with the type where the message
    alone would not say what failed) otherwise. Usage: print(f"error: {describe_error(e)}")"""
    if isinstance(error, OSError) and error.strerror:
        names = [os.fsdecode(n) for n in (error.filename, error.filename2) if n is not None]
        text = f"{' -> '.join(names)}: {error.strerror}" if names else error.strerror
    else:
        text = str(error)
        if not isinstance(error, (OSError, ValueError)) or not text:
            text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((token for token in argv if not token.startswith("-")), None)
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as error:
        if os.environ.get("SHIRA_DEBUG"):
            raise
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
