"""`shira-diffusion extract BASE TUNED OUT`: a SHiRA adapter from a full fine-tune.

BASE and TUNED are diffusers pipeline folders (every model component is compared) or .safetensors state
dicts (then --component names them). Usage: shira-diffusion extract sd15/ sd15-tuned/ style.safetensors --density 0.02
"""

from __future__ import annotations

import argparse

from .convert import DTYPES, check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base pipeline folder or .safetensors state dict")
    parser.add_argument("tuned", help="fine-tuned pipeline folder or .safetensors state dict")
    parser.add_argument("out_file", help="SHiRA adapter to write (.safetensors)")
    parser.add_argument("--density", type=float, default=0.02, help="fraction of each weight to keep (default 0.02)")
    parser.add_argument("--component", default="unet", help="component name for plain state dict files (default unet)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="stored value dtype (default fp32: exact deltas)")
    parser.add_argument("--quiet", action="store_true", help="print only the overall error")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..convert import extract_shira

    check_output_file(args.out_file)
    adapter, report = extract_shira(args.base, args.tuned, density=args.density, component=args.component)
    adapter.to(getattr(torch, DTYPES[args.dtype])).save(args.out_file)
    print(f"overall relative Frobenius error {report.overall:.4f}" if args.quiet else report.table())
    print(f"wrote {args.out_file}: {adapter.num_parameters:,} parameters, density {adapter.density:.4%}")
    return 0
