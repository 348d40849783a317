"""File size: bytes per stored parameter and file size, SHiRA (fp16 and fp32 values) vs LoRA and vs PEFT's
SHiRA file, at equal parameter counts (SHiRA budget r*(m+n) = LoRA rank r on the same linears).

Usage: python -m benchmarks.size [--smoke] [--rank 64]
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from shira_diffusion import ShiraAdapter, SparseDelta
from shira_diffusion.masks import build_masks

from .common import lora_file, parser, sd15_unet, target_weights, write_result


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rank", type=int, default=64)
    args = p.parse_args()
    rank = 2 if args.smoke else args.rank
    unet = sd15_unet(args.smoke)
    weights = target_weights(unet)
    work = Path(tempfile.mkdtemp())
    masks = build_masks(weights, "rand", r=rank)
    adapter = ShiraAdapter({"unet": {n: SparseDelta(tuple(weights[n].shape), m, torch.randn(m.numel())) for n, m in masks.items()}})
    count = adapter.num_parameters
    rows = []
    for label, path in (("shira-diffusion fp16", adapter.to(torch.float16).save(work / "a16.safetensors")),
                        ("shira-diffusion fp32", adapter.save(work / "a32.safetensors")),
                        ("diffusers LoRA fp32", lora_file(unet, rank, work / "lora"))):
        rows.append({"file": label, "parameters": count, "MB": path.stat().st_size / 1e6, "bytes per parameter": path.stat().st_size / count})
    from peft import ShiraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(unet), ShiraConfig(r=rank, target_modules=[n.removesuffix(".weight") for n in weights], init_weights=False))
    model.save_pretrained(str(work / "peft"))
    size = (work / "peft" / "adapter_model.safetensors").stat().st_size
    rows.append({"file": "PEFT SHiRA (fp32 + int32 indices)", "parameters": count, "MB": size / 1e6, "bytes per parameter": size / count})
    write_result("size", rows, args.out, [f"budget r={rank}: {count:,} parameters on {len(weights)} linears", "target: <= 4 bytes per parameter"], {"smoke": args.smoke})


if __name__ == "__main__":
    main()
