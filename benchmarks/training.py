"""Training memory and speed: SHiRA `sparse` vs `hook` vs LoRA at equal trainable parameters (SHiRA budget
r*(m+n) per weight = LoRA rank r), SD 1.5-shaped UNet, batch 1, AdamW, a few steps, in two precisions:
fp32 (the issue's setting) and the DreamBooth recipe (frozen model in half precision, fp32 trainables,
autocast: bf16 on CPU, fp16 on GPU; `hook` trains full fp32 weights, so it has no row there). Each run is
its own process so its peak memory is its own: process peak RSS on CPU (reset after the model is built,
where Linux allows), torch.cuda.max_memory_allocated on GPU.

Usage: python -m benchmarks.training [--smoke] [--rank 64] [--steps 4] [--rounds 3] [--latent-size 32]
(--latent-size 64, SD 1.5's 512 px, writes training_latent64.json / .md)
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _rss_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process in MB (Linux), else None."""
    try:
        line = next(line for line in _STATUS.read_text().splitlines() if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> float:
    """Start the peak-RSS count from now, where Linux allows it; returns the RSS it starts from (MB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return _rss_mb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    return _rss_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, precision: str, smoke: bool, rank: int, steps: int, latent_size: int) -> dict:
    from shira_diffusion.trainables import prepare_trainable

    from .common import TARGETS, sd15_unet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    half = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    unet = sd15_unet(smoke, half or torch.float32).to(device)
    gc.collect()
    # From here on everything counts: the adapter's own state (positions, W0 there) and the training step.
    baseline = _reset_peak_rss() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainable = prepare_trainable(unet, "lora" if variant == "lora" else "shira", impl=variant, rank=rank, target_modules=TARGETS)
    for _, p in trainable.named_parameters():  # diffusers' cast_training_params: fp32 trainables over a half model
        p.data = p.data.float()
    optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4, weight_decay=1e-2)
    trainable.track(optimizer)  # as the trainer does
    size = unet.config.sample_size if smoke else latent_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size, size, generator=generator).to(device, half or torch.float32)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to(device, half or torch.float32)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device, dtype=half, enabled=half is not None):
            loss = unet(latents, torch.tensor([500], device=device), hidden).sample.float().square().mean()
        loss.backward()
        trainable.decay_toward_base(1e-4, 1e-2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mb()
    times.sort()
    return {"precision": precision, "variant": variant, "trainable parameters": trainable.num_parameters,
            "peak memory MB": peak, "peak over model MB": peak - baseline, "steps/s": 1 / times[len(times) // 2]}


def main() -> None:
    from .common import parser, write_result

    p = parser(__doc__)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="runs of every variant, interleaved (medians reported)")
    p.add_argument("--latent-size", type=int, default=32, help="latent height = width (64 is SD 1.5's 512 px)")
    p.add_argument("--variant", help="internal: run one variant and print JSON")
    p.add_argument("--precision", default="fp32", help="internal: the precision of that variant")
    args = p.parse_args()
    rank = 2 if args.smoke else args.rank
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.precision, args.smoke, rank, args.steps, args.latent_size)))
        return
    half = "fp16" if torch.cuda.is_available() else "bf16"
    runs: dict[tuple[str, str], list[dict]] = {}
    # Rounds interleave the variants, so a slow spell of a shared machine hits them alike; medians per variant.
    for _ in range(1 if args.smoke else args.rounds):
        for precision, variants in (("fp32", ("lora", "sparse", "hook")), (half, ("lora", "sparse"))):
            for variant in variants:
                command = [sys.executable, "-m", "benchmarks.training", "--variant", variant, "--precision", precision, "--rank", str(rank),
                           "--steps", str(args.steps), "--latent-size", str(args.latent_size)] + (["--smoke"] if args.smoke else [])
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                runs.setdefault((precision, variant), []).append(json.loads(output))
    rows = []
    for found in runs.values():
        row = dict(found[0])
        for key in ("peak memory MB", "peak over model MB", "steps/s"):
            row[key] = statistics.median(run[key] for run in found)
        row["runs"] = len(found)
        rows.append(row)
    for row in rows:
        lora = next(r for r in rows if r["precision"] == row["precision"] and r["variant"] == "lora")
        row["memory vs LoRA"] = row["peak memory MB"] / lora["peak memory MB"]
        row["over-model memory vs LoRA"] = row["peak over model MB"] / lora["peak over model MB"]
        row["speed vs LoRA"] = row["steps/s"] / lora["steps/s"]
    shape = "tiny UNet" if args.smoke else f"{args.latent_size}x{args.latent_size} latents"
    name = "training" if args.smoke or args.latent_size == 32 else f"training_latent{args.latent_size}"
    write_result(name, rows, args.out, [
        f"SHiRA r={rank} budget (rand mask) vs LoRA rank {rank} on the same 160 attention + FF linears; AdamW; batch 1; {shape}",
        f"fp32: everything in fp32; {half}: the DreamBooth recipe (frozen model in {half}, fp32 trainables, autocast)",
        "peak memory: process peak RSS on CPU (includes the model); 'peak over model' counts from the RSS once the model "
        "is built, before the adapter is attached (GPU: max_memory_allocated, over the memory allocated then)",
        "target: sparse <= 0.85x LoRA's peak memory at >= 0.95x its step rate (the paper's GPU numbers on LLaMA2-7B: "
        "-16.6 % memory, -2.9 % steps/s)",
    ], {"smoke": args.smoke, "latent size": args.latent_size})


if __name__ == "__main__":
    main()
