"""Fidelity on the shapes world: the paper's Table 1 / Figure 4 redone with the world judge.

All five SHiRA masks and the LoRA baseline at equal trainable parameters (the world recipe,
`shira_diffusion.world.adapters.RECIPE`), both styles, `--seeds` training seeds; each adapter judged alone at
alpha 0.5 and 1 on its style's validation prompts, and both styles of one method and seed fused at alpha 0.5
and 1 on the fusion prompts. Per cell: mean ± std over training seeds of the judge's mean over prompts x
sampling seeds. Concept retention = a style's strength fused / alone (alpha 1). Grids (seed 0) go to
`<out>/fidelity/`. Nothing here is tuned per method: one recipe, one judge, one set of prompts.

Usage: python -m benchmarks.fidelity [--seeds 3] [--sample_seeds 2] [--smoke]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from shira_diffusion import world
from shira_diffusion.masks import MASK_TYPES
from shira_diffusion.training import train
from shira_diffusion.world.adapters import training_config
from shira_diffusion.world.evaluate import fusion_prompts, lora_activation, measure, shira_activation, style_prompts

from .common import parser, write_result

STYLES = tuple(world.STYLE_SETS)
VARIANTS = tuple(f"shira-{mask}" for mask in MASK_TYPES) + ("lora",)


def _train_all(variants, seeds, data: dict[str, Path], work: Path, steps: int | None) -> dict[tuple[str, str, int], Path]:
    paths = {}
    for seed in seeds:
        for variant in variants:
            method, _, mask = variant.partition("-")
            for style in STYLES:
                overrides = {"seed": seed, **({"mask": mask} if mask else {}), **({"max_train_steps": steps} if steps else {})}
                out = work / f"{variant}_{style.replace(' ', '_')}_{seed}"
                paths[(variant, style, seed)] = train(training_config(style, data[style], out, method, **overrides)).adapter_path
    return paths


def _judge_variant(variant: str, seed: int, paths, judge, sample_seeds: range, grid_out: Path | None, prompts: int | None = None) -> dict:
    """One method and training seed: its two style adapters alone and fused, judged."""
    pipe = world.pipeline()
    if variant == "lora":
        names = {style: f"lora_{i}" for i, style in enumerate(STYLES)}
        for style in STYLES:
            path = paths[(variant, style, seed)]
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=names[style])
        activate = lora_activation(pipe, names)
    else:
        for style in STYLES:
            pipe.load_shira_weights(paths[(variant, style, seed)], adapter_name=style)
        activate = shira_activation(pipe)
    cells = {}
    for alpha in (0.5, 1.0):
        for style in STYLES:
            activate({style: alpha})
            cells[f"{style} alpha={alpha:g}"] = measure(pipe, judge, style_prompts(style)[:prompts], sample_seeds)
        activate({style: alpha for style in STYLES})
        cells[f"fused alpha={alpha:g}"] = measure(pipe, judge, fusion_prompts()[:prompts], sample_seeds)
    if grid_out is not None:
        from shira_diffusion.demo import render_grid

        render_grid(pipe, activate).save(grid_out / f"grid_{variant}.png")
    return cells


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def _rows(cells: dict[tuple[str, int], dict], variants, seeds) -> list[dict]:
    rows = []
    for variant in variants:
        per_seed = [cells[(variant, seed)] for seed in seeds]
        row = {"method": variant}
        for style in STYLES:
            strength = lambda key, s=style: [c[key]["styles"][s]["mean"] for c in per_seed]  # noqa: E731
            row[f"{style} α=0.5"] = _mean_std(strength(f"{style} alpha=0.5"))
            row[f"{style} α=1"] = _mean_std(strength(f"{style} alpha=1"))
            row[f"{style} fused α=0.5"] = _mean_std(strength("fused alpha=0.5"))
            row[f"{style} fused α=1"] = _mean_std(strength("fused alpha=1"))
            row[f"{style} retention"] = _mean_std([f / a for f, a in zip(strength("fused alpha=1"), strength(f"{style} alpha=1"))])
            row[f"{style} content α=1"] = _mean_std([c[f"{style} alpha=1"]["content_accuracy"] for c in per_seed])
        row["fused content α=0.5"] = _mean_std([c["fused alpha=0.5"]["content_accuracy"] for c in per_seed])
        row["fused content α=1"] = _mean_std([c["fused alpha=1"]["content_accuracy"] for c in per_seed])
        rows.append(row)
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3, help="training seeds per method and style (default 3)")
    p.add_argument("--sample_seeds", type=int, default=1, help="sampling seeds per prompt (default 1; each style has 18-21 prompts)")
    args = p.parse_args()
    variants = ("shira-struct", "lora") if args.smoke else VARIANTS
    seeds = range(1 if args.smoke else args.seeds)
    started = time.perf_counter()
    judge, out = world.Judge.load(), Path(args.out)
    (out / "fidelity").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shira-fidelity-") as scratch:
        data = {style: world.write_style_dataset(Path(scratch) / "data" / style.replace(" ", "_"), style) for style in STYLES}
        paths = _train_all(variants, seeds, data, Path(scratch), 4 if args.smoke else None)
        cells = {(variant, seed): _judge_variant(variant, seed, paths, judge, range(1 if args.smoke else args.sample_seeds),
                                                 out / "fidelity" if seed == 0 else None, 3 if args.smoke else None)
                 for variant in variants for seed in seeds}
    notes = [f"world recipe {world.adapters.RECIPE}", f"{len(seeds)} training seeds x {args.sample_seeds} sampling seeds per prompt; "
             f"strengths: judge's style strength (0 none, ~0.93 the training images' full style), mean ± std over training seeds",
             f"content: share of images whose shape, colour and background the judge reads as prompted; wall time {time.perf_counter() - started:.0f} s",
             "grids (training seed 0): fidelity/grid_<method>.png"]
    write_result("fidelity", _rows(cells, variants, seeds), args.out, notes, {"smoke": args.smoke, "cells": {f"{v}/{s}": c for (v, s), c in cells.items()}})


if __name__ == "__main__":
    main()
