"""Training memory and speed: SHiRA `sparse` vs `hook` vs LoRA at equal trainable parameters (SHiRA budget
r*(m+n) per weight = LoRA rank r), SD 1.5-shaped UNet, 32x32 latents, batch 1, AdamW, a few steps. Each
variant runs in its own process so its peak memory is its own (process max RSS on CPU;
torch.cuda.max_memory_allocated on GPU).

Usage: python -m benchmarks.training [--smoke] [--rank 64] [--steps 4]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch


def run_variant(variant: str, smoke: bool, rank: int, steps: int) -> dict:
    from shira_diffusion.masks import build_masks
    from shira_diffusion.training import ShiraTrainable, attach_lora, find_targets

    from .common import TARGETS, sd15_unet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = sd15_unet(smoke).to(device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    targets = find_targets(unet, TARGETS)
    if variant == "lora":
        params = attach_lora(unet, sorted(targets), rank)
        groups = [{"params": params}]
        trainable = None
    else:
        masks = build_masks({n: m.weight for n, m in targets.items()}, "rand", r=rank, seed=0)
        trainable = ShiraTrainable(unet, masks, variant)
        groups = [trainable.param_group(1e-2)]
        params = groups[0]["params"]
    count = sum(p.numel() if variant != "hook" else 0 for p in params) or sum(m.numel() for m in masks.values())
    optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-2)
    size = 4 if smoke else 32
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size, size, generator=generator).to(device)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to(device)
    if smoke:
        latents = torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size, generator=generator).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = unet(latents, torch.tensor([500], device=device), hidden).sample.square().mean()
        loss.backward()
        if trainable is not None:
            trainable.decay_toward_base(1e-4, 1e-2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times.sort()
    return {"variant": variant, "trainable parameters": count, "peak memory MB": peak / 2**20,
            "peak over model MB": (peak - (0 if device == "cuda" else baseline)) / 2**20, "steps/s": 1 / times[len(times) // 2]}


def main() -> None:
    from .common import parser, write_result

    p = parser(__doc__)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--variant", help="internal: run one variant and print JSON")
    args = p.parse_args()
    rank = 2 if args.smoke else args.rank
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.smoke, rank, args.steps)))
        return
    rows = []
    for variant in ("lora", "sparse", "hook"):
        command = [sys.executable, "-m", "benchmarks.training", "--variant", variant, "--rank", str(rank), "--steps", str(args.steps)] + (["--smoke"] if args.smoke else [])
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(output))
    lora = rows[0]
    for row in rows:
        row["memory vs LoRA"] = row["peak memory MB"] / lora["peak memory MB"]
        row["speed vs LoRA"] = row["steps/s"] / lora["steps/s"]
    write_result("training", rows, args.out, [
        f"SHiRA r={rank} budget (rand mask) vs LoRA rank {rank} on the same 160 attention + FF linears; AdamW; batch 1; "
        + ("tiny UNet" if args.smoke else "32x32 latents"),
        "peak memory: process max RSS on CPU (includes the fp32 model); 'peak over model' subtracts the RSS after building the model",
        "target: sparse <= 0.85x LoRA's peak memory at >= 0.95x its step rate (the paper's GPU numbers: -16.6 % memory, -2.9 % steps/s)",
    ], {"smoke": args.smoke})


if __name__ == "__main__":
    main()
