"""Inference overhead: one UNet denoising step with a SHiRA adapter active vs the base model vs PEFT's
unfused LoRA (rank 64, same targets). SD 1.5-shaped UNet, batch 1, 64x64 latents (512 px): fp32 on the CPU,
fp16 on a GPU.

Usage: python -m benchmarks.overhead [--smoke] [--device cpu|cuda]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import half, lora_file, median_ms, parse, parser, sd15_pipeline, shira_adapter, write_result


def main() -> None:
    args = parse(parser(__doc__, device=True))
    dtype = half(args.device)
    pipe = sd15_pipeline(args.smoke, dtype, args.device)
    unet = pipe.unet
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, size, size, generator=generator), torch.tensor([500]), torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator))
    inputs = tuple(t.to(args.device, dtype) if t.is_floating_point() else t.to(args.device) for t in inputs)

    @torch.no_grad()
    def step():
        unet(*inputs)

    rows = [{"variant": "base model", "ms per step": median_ms(step, args.repeats)}]
    pipe.load_shira_weights(shira_adapter(unet, seed=1), adapter_name="A")
    rows.append({"variant": "SHiRA active (written into the weights)", "ms per step": median_ms(step, args.repeats)})
    pipe.unload_shira_weights()
    pipe.load_lora_weights(str(lora_file(unet, 4 if args.smoke else 64, Path(tempfile.mkdtemp()), 1).parent), adapter_name="L")
    rows.append({"variant": "LoRA unfused (PEFT layers)", "ms per step": median_ms(step, args.repeats)})
    pipe.unload_lora_weights()
    rows.append({"variant": "base model (again)", "ms per step": median_ms(step, args.repeats)})
    base = (rows[0]["ms per step"] + rows[-1]["ms per step"]) / 2
    for row in rows:
        row["vs base"] = row["ms per step"] / base
    write_result("overhead", rows, args.out, [f"device {args.device}, latents {size}x{size}, batch 1, {str(dtype).removeprefix('torch.')}; base measured before and after to show the noise",
                                               "target: SHiRA within noise of the base model"], {"smoke": args.smoke, "device": args.device})


if __name__ == "__main__":
    main()
