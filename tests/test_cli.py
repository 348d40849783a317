"""The command line's shape: one flag spelling (underscores, the hyphenated one accepted), help without heavy imports."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from shira_diffusion.cli import SUBCOMMANDS, build_parser


def flags(parser: argparse.ArgumentParser) -> list[str]:
    found = []
    for action in parser._actions:  # argparse keeps no public list of a parser's flags
        found += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            found += [flag for sub in action.choices.values() for flag in flags(sub)]
    return found


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_flag_is_spelled_with_underscores(command):
    parser = build_parser(command)
    assert [flag for flag in flags(parser) if "-" in flag[2:]] == []


def test_the_hyphenated_spelling_is_an_alias():
    convert = build_parser("convert").parse_args(["convert", "a.safetensors", "b.safetensors", "--match-params"])
    assert convert.match_params is True
    check = build_parser("dataset").parse_args(["dataset", "check", "folder", "--require-license", "--any_license"])
    assert check.require_license and check.any_license
    evaluate = build_parser("eval").parse_args(["eval", "--pretrained-model-name-or-path=m", "--adapter", "a=x", "--prompts", "p", "--num-seeds", "3"])
    assert (evaluate.pretrained_model_name_or_path, evaluate.num_seeds) == ("m", 3)
    with pytest.raises(SystemExit):  # a misspelling is still an error, not silently respelled
        build_parser("convert").parse_args(["convert", "a", "b", "--match-param"])


def test_help_imports_neither_torch_nor_diffusers():
    code = ("import sys\nfrom shira_diffusion.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', '--help'], ['dataset', 'check', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
