"""Exactness: max |W - W0| after many switch cycles in fp16 and bf16, this package vs diffusers' LoRA
fuse/unfuse. SD 1.5-shaped UNet with random weights, on the CPU or a GPU.

Usage: python -m benchmarks.exactness [--smoke] [--device cpu|cuda] [--cycles 1000] [--lora_cycles 20]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import free, lora_file, parse, parser, sd15_pipeline, shira_adapter, write_result


def drift(pipe, before: dict) -> float:
    return max(float((p.detach().float() - before[n].float()).abs().max()) for n, p in pipe.unet.named_parameters())


def main() -> None:
    p = parser(__doc__, device=True)
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--lora_cycles", type=int, default=20, help="diffusers' fuse/unfuse costs seconds per cycle on a CPU")
    args = parse(p)
    cycles, lora_cycles = (20, 5) if args.smoke else (args.cycles, args.lora_cycles)
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        pipe = sd15_pipeline(args.smoke, dtype, args.device)
        before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
        work = Path(tempfile.mkdtemp())
        styles = [shira_adapter(pipe.unet, seed=seed) for seed in (1, 3)]  # hotswapped in turn under the name "A"
        pipe.load_shira_weights(styles[0], adapter_name="A")
        pipe.load_shira_weights(shira_adapter(pipe.unet, seed=2), adapter_name="B")
        for cycle in range(cycles):
            if cycle % 4 == 3:
                pipe.load_shira_weights(styles[(cycle // 4 + 1) % 2], adapter_name="A", hotswap=True)
                continue
            pipe.set_shira_adapters(["A"] if cycle % 4 == 0 else ["B"] if cycle % 4 == 1 else ["A", "B"], None if cycle % 4 < 2 else [0.7, 0.4])
        pipe.unload_shira_weights()
        ours = drift(pipe, before)
        pipe.load_lora_weights(str(lora_file(pipe.unet, 4 if args.smoke else 64, work / "a", 1).parent), adapter_name="style_a")
        for _ in range(lora_cycles):
            pipe.fuse_lora()
            pipe.unfuse_lora()
        pipe.unload_lora_weights()
        rows.append({"dtype": str(dtype).removeprefix("torch."), "shira-diffusion cycles": cycles, "shira-diffusion max |W-W0|": ours,
                     "diffusers LoRA cycles": lora_cycles, "diffusers LoRA max |W-W0|": drift(pipe, before)})
        del pipe, before
        free()
    write_result("exactness", rows, args.out, [f"device {args.device}", "a cycle is one switch (A, B, A+B at 0.7/0.4, or another style hotswapped into A) for us, one fuse_lora + unfuse_lora for LoRA (rank 64)",
                                                 "target: 0 bits of drift"], {"smoke": args.smoke, "device": args.device})


if __name__ == "__main__":
    main()
