"""`shira-diffusion convert LORA_FILE OUT_FILE`: a LoRA (diffusers, PEFT or Kohya keys) as a SHiRA adapter.

Usage: shira-diffusion convert pytorch_lora_weights.safetensors style.safetensors --density 0.02
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora_file", help="LoRA .safetensors file")
    parser.add_argument("out_file", help="SHiRA adapter to write (.safetensors)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--density", type=float, default=0.02, help="fraction of each weight to keep (default 0.02)")
    budget.add_argument("--match_params", action="store_true", help="keep as many entries per layer as the LoRA has parameters")
    parser.add_argument("--components", nargs="+", help="only these components (e.g. unet text_encoder)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16", help="stored value dtype (default fp16: 4 bytes/parameter)")
    parser.add_argument("--pipeline", default="StableDiffusionXLPipeline",
                        help="diffusers pipeline class whose lora_state_dict reads the file (default reads SD 1.x / SDXL / "
                             "diffusers-format Flux and SD3 files; e.g. FluxPipeline for Kohya / XLabs Flux LoRAs)")
    parser.add_argument("--quiet", action="store_true", help="print only the overall error")


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_output_file(path: str) -> Path:
    """The adapter file to write, checked before the conversion's work: a .safetensors name that is not a folder,
    in a folder that exists (or will be made inside one) and that this user may write. Usage: check_output_file("a.safetensors")"""
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: SHiRA adapters are saved as .safetensors files")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the path of the adapter file to write")
    folder = next(p for p in out.absolute().parents if os.path.lexists(p))  # save() makes the missing ones
    if not folder.is_dir():
        raise ValueError(f"{out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):  # root passes: the kernel ignores permission bits for it
        raise PermissionError(f"{folder}: folder is not writable, cannot write {out.name} there")
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from ..convert import lora_to_shira

    check_output_file(args.out_file)
    adapter, report = lora_to_shira(args.lora_file, density=None if args.match_params else args.density, match_params=args.match_params, components=args.components,
                                   pipeline=args.pipeline)
    adapter.to(getattr(torch, DTYPES[args.dtype])).save(args.out_file)
    print(f"overall relative Frobenius error {report.overall:.4f}" if args.quiet else report.table())
    print(f"wrote {args.out_file}: {adapter.num_parameters:,} parameters, density {adapter.density:.4%}")
    return 0
