"""Shared pieces of the benchmarks: machine record, timing, result files, full-size random models, adapters.

Every benchmark takes `--smoke` (tiny pipeline, seconds; part of the test run) and `--out DIR`, records the
machine, takes medians over >= 5 repeats after a warm-up, and writes `<name>.json` and `<name>.md`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
RESULTS = Path(__file__).parent / "results"


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parser(description: str, device: bool = False) -> argparse.ArgumentParser:
    """The flags every benchmark takes; `device=True` adds --device for those that also run on a GPU."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny pipeline, a few seconds")
    p.add_argument("--out", default=str(RESULTS), help="where to write <name>.json / <name>.md")
    p.add_argument("--repeats", type=int, default=5)
    if device:
        p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                       help="where the models run (default: cuda when torch sees one)")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """`p.parse_args()`, refusing --device cuda where torch sees no GPU (a clear message, not a traceback)."""
    args = p.parse_args()
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device on this machine")
    return args


def half(device: str) -> torch.dtype:
    """The dtype a diffusers user runs a pipeline in there: fp16 on GPUs, fp32 on CPUs."""
    return torch.float16 if device == "cuda" else torch.float32


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def median_ms(action, repeats: int = 5, warmup: int = 1, setup=None) -> float:
    """Median wall time of `action()` in ms; `setup()` runs untimed before each call."""
    times = []
    for index in range(warmup + repeats):
        if setup is not None:
            setup()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        action()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def median_ms_in_turn(actions: dict, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall times (ms) of several actions run one after the other, round by round (the order alternating),
    so a slow spell of a shared machine hits them alike: for side-by-side ratios of close numbers."""
    times: dict[str, list[float]] = {name: [] for name in actions}
    for index in range(warmup + repeats):
        for name in (list(actions) if index % 2 == 0 else list(reversed(actions))):
            start = time.perf_counter()
            actions[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if index >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def write_result(name: str, rows: list[dict], out: str | Path, notes: list[str] | None = None, extra: dict | None = None) -> dict:
    """<name>.json and <name>.md in `out`; prints the Markdown table last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": machine(), "rows": rows, "notes": notes or [], **(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {name}", "", f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']}"
             + (f", GPU {result['machine']['gpu']}" if result["machine"]["gpu"] else ", no GPU"), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    lines += [""] + [f"- {note}" for note in notes or []]
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    print(text)
    return result


def sd15_unet(smoke: bool, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """SD 1.5's UNet architecture with random weights (860 M parameters), or the tiny one for --smoke."""
    from diffusers import UNet2DConditionModel

    from shira_diffusion.testing import tiny_pipeline

    torch.manual_seed(0)
    if smoke:
        unet = tiny_pipeline("sd").unet
    else:
        with torch.device(device):  # built where it runs: a GPU initialises 860 M random weights in a blink
            unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    return unet.to(device, dtype).eval().requires_grad_(False)


def sd15_pipeline(smoke: bool, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A ShiraStableDiffusionPipeline whose UNet is SD 1.5-shaped (tiny VAE / text encoder: not adapted here)."""
    from shira_diffusion import ShiraStableDiffusionPipeline
    from shira_diffusion.testing import tiny_components

    components = tiny_components("sd")
    components["unet"] = sd15_unet(smoke, dtype, device)
    pipe = ShiraStableDiffusionPipeline(**components).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def target_weights(unet) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if n.endswith(tuple(f"{t}.weight" for t in TARGETS))}


def shira_adapter(unet, density: float = 0.02, seed: int = 0, dtype: torch.dtype = torch.float16):
    """A random SHiRA adapter on every attention + FF linear of `unet`."""
    from shira_diffusion import ShiraAdapter, SparseDelta
    from shira_diffusion.masks import mask_budget, random_positions

    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, weight in target_weights(unet).items():
        positions = random_positions(tuple(weight.shape), mask_budget(tuple(weight.shape), density), seed, name)
        deltas[name] = SparseDelta(tuple(weight.shape), positions, (torch.randn(positions.numel(), generator=generator) * 0.01).to(dtype))
    return ShiraAdapter({"unet": deltas})


def lora_file(unet, rank: int, folder: Path, seed: int = 0) -> Path:
    """A rank-`rank` LoRA on the same targets (random A and B, so fusing changes weights), PEFT-style keys
    as diffusers writes them; built from shapes, so the UNet gets no PEFT wrappers."""
    from diffusers import StableDiffusionPipeline

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, weight in target_weights(unet).items():
        module = name.removesuffix(".weight")
        out_features, in_features = weight.shape
        state[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
        state[f"{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state)
    return folder / "pytorch_lora_weights.safetensors"


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_pass(size_mb: int = 512, device: str = "cpu") -> tuple[Callable[[], object], int]:
    """A copy of `size_mb` MB within this machine's memory, or the GPU's, and the bytes it moves (read + written)."""
    source = torch.ones(size_mb * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    return (lambda: target.copy_(source)), 2 * source.numel() * 4


def memory_bandwidth_gbs(size_mb: int = 512, device: str = "cpu") -> float:
    """Copy bandwidth (bytes read + written per second) of this machine's memory, or of the GPU's, GB/s."""
    copy, moved = copy_pass(size_mb, device)
    return moved / (median_ms(copy, repeats=5) / 1000) / 1e9


def host_to_device_gbs(size_mb: int = 256) -> float:
    """Bytes per second from (pageable) host memory to the GPU, GB/s: what an adapter read from a file crosses."""
    source = torch.ones(size_mb * 2**20 // 4)
    ms = median_ms(lambda: source.to("cuda"), repeats=5)
    return source.numel() * 4 / (ms / 1000) / 1e9
