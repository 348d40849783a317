"""Train the world's judge (`judge.py`) on procedural images only, and validate it on held-out ones.

Seeded and single-threaded (the other core trains the world model): a pool of random scenes is rendered
once (every combination, colour jitter, each style independently absent with probability 0.4, else at a
strength U(0, 1)); every batch drawn from it is degraded on the fly (translation, blur, noise, brightness /
contrast / colour shifts) so the judge holds on what a diffusion model draws. None of these look like a
style, so the style strengths stay the ground truth. Images a model generated are never used.

Validation renders fresh images from another seed: a set of the training distribution and a set with both
styles at strength >= 0.7 (the same distribution restricted to its hardest corner), each judged clean and
degraded. The numbers, seeds, counts, steps and CPU seconds go to the JSON report next to the weights.

Usage:
    python -m shira_diffusion.world.train_judge --out shira_diffusion/world/judge.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .judge import PRESENCE_THRESHOLD, SIZE, JudgeNet, world_metadata
from .scenes import BACKGROUNDS, COLOURS, SHAPES, render, sample_scene
from .styles import STYLES, stylize

ABSENT = 0.4  # probability that a style is absent from a training image
STRONG = 0.7  # the hardest validation set: both styles at least this strong
_COLOURS, _STYLES = tuple(COLOURS), tuple(STYLES)


def render_set(rng: np.random.Generator, count: int, strong: bool = False) -> dict[str, torch.Tensor]:
    """`count` random scenes: uint8 pixels N x 3 x 32 x 32, labels N x 3 (shape, colour, background),
    strengths N x len(STYLES); `strong` draws both styles from U(STRONG, 1) instead."""
    pixels = np.empty((count, SIZE, SIZE, 3), np.uint8)
    labels = np.empty((count, 3), np.int64)
    strengths = np.zeros((count, len(_STYLES)), np.float32)
    for i in range(count):
        scene = sample_scene(rng)
        image, coverage = render(scene, SIZE, rng)
        for j in range(len(_STYLES)):
            if strong:
                strengths[i, j] = rng.uniform(STRONG, 1.0)
            elif rng.random() >= ABSENT:
                strengths[i, j] = rng.uniform(0.0, 1.0)
        if strengths[i].any():
            image = stylize(image, coverage, dict(zip(_STYLES, strengths[i].tolist())), rng)
        pixels[i] = np.asarray(image)
        labels[i] = (SHAPES.index(scene.shape), _COLOURS.index(scene.colour), BACKGROUNDS.index(scene.background))
    return {"pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
            "labels": torch.from_numpy(labels), "strengths": torch.from_numpy(strengths)}


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], as `judge.to_pixels` does for PIL images."""
    return pixels.float() / 127.5 - 1


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (sigma in px; ~0 leaves the image as is)."""
    n, c, h, w = x.shape
    taps = torch.arange(-3, 4, dtype=x.dtype)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, 7)
    y = F.pad(x.reshape(1, n * c, h, w), (3, 3, 3, 3), mode="replicate")
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips, shifts (up to 2 px), blur (sigma up to 1 px), noise and brightness / contrast / colour
    shifts of a float batch in [-1, 1]. Each is applied to about half the images; none adds texture,
    blue light or a warm cast strong enough to read as a style."""
    n = len(x)
    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)
    def half() -> torch.Tensor:
        return (torch.rand(n, generator=g) < 0.5).float()

    flip = half().bool()  # the world is left-right symmetric (upright triangles, flames rise straight up)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    shift = u(-2, 2, 2) * 2 / SIZE * half()[:, None]  # bilinear, so sub-pixel shifts also soften edges
    theta = torch.cat([torch.eye(2).expand(n, 2, 2), shift[:, :, None]], 2)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border", align_corners=False)
    x = _blur(x, u(0.3, 1.0) * half())
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = 1 + u(-0.1, 0.1) * half()
    offset = (u(-0.08, 0.08, 1) + u(-0.04, 0.04, 3)) * half()[:, None]  # brightness, then per-channel colour
    x = (x - mean) * contrast[:, None, None, None] + mean + offset[:, :, None, None]
    x = x + torch.randn(x.shape, generator=g) * (u(0.0, 0.05) * half())[:, None, None, None]
    return x.clamp(-1, 1)


def loss_of(out: dict[str, torch.Tensor], labels: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the three names + binary cross-entropy on the strengths (soft targets)."""
    classes = sum(F.cross_entropy(out[key], labels[:, i]) for i, key in enumerate(("shape", "colour", "background")))
    return classes + len(_STYLES) * F.binary_cross_entropy_with_logits(out["style_logits"], strengths)


def train(pool: dict[str, torch.Tensor], steps: int, batch: int, seed: int, lr: float = 3e-3) -> JudgeNet:
    """AdamW with warm-up and cosine decay on random batches of the pool, degraded afresh each step."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = JudgeNet().to(memory_format=torch.channels_last).train()  # channels-last convs: ~30 % faster on CPU
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    started, running = time.process_time(), 0.0
    for step in range(1, steps + 1):
        index = torch.randint(len(pool["pixels"]), (batch,), generator=g)
        x = degrade(to_unit(pool["pixels"][index]), g).contiguous(memory_format=torch.channels_last)
        loss = loss_of(net(x), pool["labels"][index], pool["strengths"][index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 250 == 0 or step == steps:
            print(f"step {step}/{steps} loss {running:.4f} cpu {time.process_time() - started:.0f}s", flush=True)
    return net.eval()


@torch.no_grad()
def evaluate(net: JudgeNet, data: dict[str, torch.Tensor], g: torch.Generator | None = None) -> dict[str, dict]:
    """Accuracies, style MAE and presence accuracy on `data` (degraded with `g` if given); also on its
    plain images (no style) when it has any."""
    x = to_unit(data["pixels"])
    x = degrade(x, g) if g is not None else x
    outs = [net(chunk) for chunk in x.split(256)]
    out = {key: torch.cat([o[key] for o in outs]) for key in outs[0]}
    right = torch.stack([out[key].argmax(1) == data["labels"][:, i] for i, key in enumerate(("shape", "colour", "background"))], 1)
    strengths, truth = out["styles"], data["strengths"]
    def metrics(rows: torch.Tensor) -> dict:
        result = {"count": int(rows.sum())}
        for i, key in enumerate(("shape", "colour", "background")):
            result[f"{key}_accuracy"] = round(right[rows, i].float().mean().item(), 4)
        result["content_accuracy"] = round(right[rows].all(1).float().mean().item(), 4)
        for j, name in enumerate(_STYLES):
            p, t = strengths[rows, j], truth[rows, j]
            result[name] = {"mae": round((p - t).abs().mean().item(), 4),
                            "presence_accuracy": round(
                                ((p > PRESENCE_THRESHOLD) == (t > PRESENCE_THRESHOLD)).float().mean().item(), 4),
                            "mean_predicted": round(p.mean().item(), 4), "mean_true": round(t.mean().item(), 4)}
        return result
    every = torch.ones(len(x), dtype=torch.bool)
    plain = (truth == 0).all(1)
    return {"all": metrics(every), **({"no_style": metrics(plain)} if plain.any() else {})}


def save_judge(net: JudgeNet, path: Path) -> None:
    """Write the weights atomically (temporary file, then rename) with the world's names as metadata."""
    state = {key: value.detach().contiguous() for key, value in net.state_dict().items()}
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata=world_metadata())
    os.chmod(temporary, 0o644)  # a shipped package file, readable by all (the temporary file may be private)
    os.replace(temporary, path)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    parser.add_argument("--report", type=Path, help="JSON report (default: next to --out, .json)")
    parser.add_argument("--seed", type=int, default=0, help="training pool, batches and initialisation")
    parser.add_argument("--val-seed", type=int, default=1, help="held-out validation images (must differ from --seed)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pool", type=int, default=24000, help="training images rendered once, degraded afresh per batch")
    parser.add_argument("--val-count", type=int, default=4000, help="validation images of the training distribution")
    parser.add_argument("--strong-count", type=int, default=1000, help=f"validation images with both styles >= {STRONG}")
    args = parser.parse_args(argv)
    args.report = args.report or args.out.with_suffix(".json")
    # bad input fails here, before minutes of work and before anything is written
    if args.out.suffix != ".safetensors":
        parser.error(f"--out {args.out} must end in .safetensors")
    for path in (args.out, args.report):
        if not path.parent.is_dir():
            parser.error(f"folder {path.parent} does not exist")
    if args.seed == args.val_seed:
        parser.error(f"--val-seed must differ from --seed ({args.seed}): validation images are held out")
    for name in ("steps", "batch", "pool", "val_count", "strong_count"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Render, train, validate, write weights and report; returns the report."""
    args = _arguments(argv)
    torch.set_num_threads(1)  # the machine's other core trains the world model
    cpu, wall = time.process_time(), time.time()
    pool = render_set(np.random.default_rng(args.seed), args.pool)
    render_seconds = time.process_time() - cpu
    print(f"rendered {args.pool} training images in {render_seconds:.0f}s cpu", flush=True)
    net = train(pool, args.steps, args.batch, args.seed)
    train_seconds = time.process_time() - cpu
    rng = np.random.default_rng(args.val_seed)
    held_out = {"random": render_set(rng, args.val_count),
                f"both_styles_at_least_{STRONG}": render_set(rng, args.strong_count, strong=True)}
    validation = {name: {"clean": evaluate(net, data), "degraded": evaluate(net, data, torch.Generator().manual_seed(args.val_seed))}
                  for name, data in held_out.items()}
    report = {
        "seed": args.seed, "validation_seed": args.val_seed, "training_images": args.pool, "training_steps": args.steps,
        "batch": args.batch, "absent_probability": ABSENT, "presence_threshold": PRESENCE_THRESHOLD,
        "validation_images": {name: len(data["pixels"]) for name, data in held_out.items()},
        "parameters": sum(p.numel() for p in net.parameters()), "torch_threads": torch.get_num_threads(),
        "cpu_seconds": {"render": round(render_seconds, 1), "train_total": round(train_seconds, 1),
                        "all": round(time.process_time() - cpu, 1)},
        "wall_seconds": round(time.time() - wall, 1), "validation": validation,
    }
    save_judge(net, args.out)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(validation, indent=1), flush=True)
    return report


if __name__ == "__main__":
    main()
