"""Training memory and speed: SHiRA `sparse` vs `hook` vs LoRA at equal trainable parameters (SHiRA budget
r*(m+n) per weight = LoRA rank r), SD 1.5-shaped UNet, batch 1, AdamW, a few steps, in two precisions:
fp32 (the issue's setting) and the DreamBooth recipe (frozen model in half precision, fp32 trainables,
autocast: bf16 on CPU, fp16 on GPU; `hook` trains full fp32 weights (`trains_full_weights`), so it has no row
there). The variants are LoRA and every SHiRA impl of `trainables.SHIRA_IMPLS`. Each memory run
is its own process so its peak memory is its own: process peak RSS on CPU (reset after the model is built,
where Linux allows), torch.cuda.max_memory_allocated on GPU.

Step rates are measured apart from memory: all variants of a precision in one process, each on its own copy of
the model, one step of each in turn, so a slow spell of the machine hits them alike.

Usage: python -m benchmarks.training [--smoke] [--device cpu|cuda] [--rank 64] [--steps 3] [--rounds 2] [--speed-steps 10] [--latent-size 32]
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


HALF = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _build(precision: str, smoke: bool, device: str):
    """SD 1.5's UNet architecture (random weights) in the precision's frozen dtype, on the device."""
    from .common import sd15_unet

    return sd15_unet(smoke, HALF[precision] or torch.float32, device)


def _attach(unet, variant: str, precision: str, smoke: bool, rank: int, latent_size: int, device: str):
    """Make `unet` trainable as the trainer does; returns (trainable, a function running one timed step)."""
    from shira_diffusion.trainables import SHIRA_IMPLS, prepare_trainable

    from .common import TARGETS

    half = HALF[precision]
    if variant in SHIRA_IMPLS:
        trainable = prepare_trainable(unet, "shira", impl=variant, rank=rank, target_modules=TARGETS)
    else:
        trainable = prepare_trainable(unet, "lora", rank=rank, target_modules=TARGETS)
    for _, p in trainable.named_parameters():  # diffusers' cast_training_params: fp32 trainables over a half model
        p.data = p.data.float()
    optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4, weight_decay=1e-2)
    trainable.track(optimizer)  # as the trainer does
    size = unet.config.sample_size if smoke else latent_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size, size, generator=generator).to(device, half or torch.float32)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to(device, half or torch.float32)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(device, dtype=half, enabled=half is not None):
            loss = unet(latents, torch.tensor([500], device=device), hidden).sample.float().square().mean()
        loss.backward()
        trainable.decay_toward_base(1e-4, 1e-2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return trainable, step


def peak_memory(variant: str, precision: str, smoke: bool, rank: int, steps: int, latent_size: int, device: str) -> dict:
    """One variant alone in this process: its peak memory, counted from the built model on (the adapter's own
    state and `steps` training steps)."""
    unet = _build(precision, smoke, device)
    gc.collect()
    baseline = _reset_peak_rss() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainable, step = _attach(unet, variant, precision, smoke, rank, latent_size, device)
    for _ in range(steps):
        step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mb()
    return {"precision": precision, "variant": variant, "trainable parameters": trainable.num_parameters,
            "peak memory MB": peak, "peak over model MB": peak - baseline}


def step_rates(variants: list[str], precision: str, smoke: bool, rank: int, steps: int, latent_size: int, device: str) -> dict[str, float]:
    """All variants in this one process, each on its own copy of the model, one step of each in turn (in
    alternating order): a slow spell of a shared machine hits them alike. Returns the median steps/s per variant (after a warm-up step)."""
    runs = {variant: _attach(_build(precision, smoke, device), variant, precision, smoke, rank, latent_size, device)[1] for variant in variants}
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for index in range(steps + 1):
        for variant in variants if index % 2 else variants[::-1]:  # alternating order: no variant always goes first
            seconds = runs[variant]()
            if index:
                times[variant].append(seconds)
    return {variant: 1 / statistics.median(found) for variant, found in times.items()}


def _child(*flags: str) -> dict:
    """Run this module with internal flags in a fresh process; its last stdout line is JSON."""
    command = [sys.executable, "-m", "benchmarks.training", *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:  # show why (a CUDA out-of-memory, say), not only that it failed
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"benchmarks.training {' '.join(flags)}: exit {done.returncode} (its output is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from .common import parse, parser, write_result

    p = parser(__doc__, device=True)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="training steps of each memory run")
    p.add_argument("--rounds", type=int, default=2, help="memory runs of every variant (medians reported)")
    p.add_argument("--speed-steps", type=int, default=10, help="timed steps per variant in the one-process speed run")
    p.add_argument("--latent-size", type=int, default=32, help="latent height = width (64 is SD 1.5's 512 px)")
    p.add_argument("--variant", help="internal: measure this variant's peak memory alone and print JSON")
    p.add_argument("--speed", help="internal: comma-separated variants whose step rates are measured together")
    p.add_argument("--precision", default="fp32", help="internal: the precision of that run")
    args = parse(p)
    rank = 2 if args.smoke else args.rank
    if args.variant:
        print(json.dumps(peak_memory(args.variant, args.precision, args.smoke, rank, args.steps, args.latent_size, args.device)))
        return
    if args.speed:
        print(json.dumps(step_rates(args.speed.split(","), args.precision, args.smoke, rank, args.speed_steps, args.latent_size, args.device)))
        return
    half = "fp16" if args.device == "cuda" else "bf16"
    common = ["--rank", str(rank), "--latent-size", str(args.latent_size), "--device", args.device] + (["--smoke"] if args.smoke else [])
    from shira_diffusion.trainables import SHIRA_IMPLS

    half_impls = tuple(impl for impl, kind in SHIRA_IMPLS.items() if not kind.trains_full_weights)  # these need fp32 weights
    settings = (("fp32", ("lora", *SHIRA_IMPLS)), (half, ("lora", *half_impls)))
    memory: dict[tuple[str, str], list[dict]] = {}
    for _ in range(1 if args.smoke else args.rounds):  # rounds interleave the variants; medians per variant
        for precision, variants in settings:
            for variant in variants:
                found = _child("--variant", variant, "--precision", precision, "--steps", str(args.steps), *common)
                memory.setdefault((precision, variant), []).append(found)
    speed = {precision: _child("--speed", ",".join(variants), "--precision", precision,
                               "--speed-steps", str(2 if args.smoke else args.speed_steps), *common)
             for precision, variants in settings}
    rows = []
    for (precision, variant), found in memory.items():
        row = dict(found[0])
        for key in ("peak memory MB", "peak over model MB"):
            row[key] = statistics.median(run[key] for run in found)
        row["memory runs"] = len(found)
        row["steps/s"] = speed[precision][variant]
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
        "peak memory: each variant alone in its own process, process peak RSS on CPU (includes the model); 'peak over "
        "model' counts from the RSS once the model is built, before the adapter is attached (GPU: max_memory_allocated, "
        "over the memory allocated then); median of the memory runs",
        f"steps/s: all variants of a precision in one process, each on its own copy of the model, one step of each in "
        f"turn, median of {2 if args.smoke else args.speed_steps} steps after a warm-up step",
        "target: sparse <= 0.85x LoRA's peak memory at >= 0.95x its step rate (the paper's GPU numbers on LLaMA2-7B: "
        "-16.6 % memory, -2.9 % steps/s)",
    ], {"smoke": args.smoke, "latent size": args.latent_size})


if __name__ == "__main__":
    main()
