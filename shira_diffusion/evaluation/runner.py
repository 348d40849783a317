"""Generate and score every prompt x seed x alpha for the base model, each adapter alone and each fusion.

One pipeline is loaded once; SHiRA adapters are loaded once each and switched with `set_shira_adapters`
(fusion = several active with weights x alpha); LoRA files go through diffusers' own loader and are fused
with `fuse_lora` at the same strengths, then unfused. Work is keyed by (adapter set, alpha, prompt, seed):
images and scores already on disk are not redone. Under `accelerate launch` each process takes a share of
the work and the main process merges the records.

Outputs in `out_dir`: `images/`, `records.jsonl` and `records.csv` (one row per image), `summary.md` and
`summary.csv` (mean ± std of HPS x 100 per adapter set and alpha; std over images, ddof=1), `grids/`
(one PNG per prompt: rows = settings, columns = seeds) and `score_vs_alpha.png`.

Usage:
    result = run_evaluation(pipe, {"bluefire": "bluefire.safetensors"}, load_prompts("prompts.json"),
                            seeds=range(30), out_dir="eval", scorer=HPSv2Scorer())
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..format import METADATA_KEY
from .prompts import Prompt

BASE = "base"


@dataclass(frozen=True)
class Fusion:
    """Several adapters active together, e.g. Fusion(("bluefire", "paintings"), (0.7, 0.5)); alpha scales all."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    @property
    def label(self) -> str:
        return "+".join(self.names)

    @classmethod
    def parse(cls, text: str) -> "Fusion":
        """'a+b' (weights 1) or 'a+b:0.7,0.5'."""
        names, _, weights = text.partition(":")
        parts = tuple(n for n in names.split("+") if n)
        values = tuple(float(w) for w in weights.split(",")) if weights else (1.0,) * len(parts)
        if len(parts) < 2 or len(values) != len(parts):
            raise ValueError(f"fusion {text!r}: expected 'name1+name2[:w1,w2]' with one weight per adapter")
        return cls(parts, values)


@dataclass
class EvaluationResult:
    out_dir: Path
    records: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    generated: int = 0  # images made by this call (the rest came from disk)


def adapter_kind(path: str | Path) -> str:
    """'shira' or 'lora', from the safetensors header and key names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if METADATA_KEY in (handle.metadata() or {}):
            return "shira"
        if any("lora" in key for key in handle.keys()):
            return "lora"
    raise ValueError(f"{path}: neither a SHiRA adapter nor a LoRA file")


def _settings(names: Sequence[str], fusions: Sequence[Fusion], alphas: Sequence[float], include_base: bool):
    """(label, {adapter: strength}, alpha) for every setting to evaluate."""
    settings = [(BASE, {}, 0.0)] if include_base else []
    for alpha in alphas:
        settings += [(name, {name: alpha}, alpha) for name in names]
        settings += [(f.label, {n: alpha * w for n, w in zip(f.names, f.weights)}, alpha) for f in fusions]
    return settings


def _key(label: str, alpha: float, prompt_index: int, seed: int) -> str:
    return f"{label}|{alpha:g}|{prompt_index}|{seed}"


def _activate(pipe, strengths: Mapping[str, float], kinds: Mapping[str, str]) -> None:
    lora = {n: s for n, s in strengths.items() if kinds[n] == "lora"}
    pipe.set_shira_adapters([n for n in strengths if kinds[n] == "shira"], [s for n, s in strengths.items() if kinds[n] == "shira"])
    if lora:
        pipe.enable_lora()
        pipe.set_adapters(list(lora), adapter_weights=list(lora.values()))
        pipe.fuse_lora(adapter_names=list(lora))
    elif any(kind == "lora" for kind in kinds.values()):
        pipe.disable_lora()


def _deactivate(pipe, strengths: Mapping[str, float], kinds: Mapping[str, str]) -> None:
    if any(kinds[n] == "lora" for n in strengths):
        pipe.unfuse_lora()


def run_evaluation(
    pipe,
    adapters: Mapping[str, str | Path],
    prompts: Sequence[Prompt],
    seeds: Iterable[int],
    out_dir: str | Path,
    scorer=None,
    alphas: Sequence[float] = (1.0, 0.75, 0.5),
    fusions: Sequence[Fusion] = (),
    include_base: bool = True,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    model_id: str = "",
) -> EvaluationResult:
    """Run (or resume) an evaluation. `pipe` must have the SHiRA methods (`add_shira_support`)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    seeds = list(seeds)
    kinds = {name: adapter_kind(path) for name, path in adapters.items()}
    for fusion in fusions:
        unknown = [n for n in fusion.names if n not in adapters]
        if unknown:
            raise ValueError(f"fusion {fusion.label}: unknown adapter {unknown[0]!r} (adapters: {sorted(adapters)})")
        if len({kinds[n] for n in fusion.names}) > 1:
            raise ValueError(f"fusion {fusion.label}: mixes SHiRA and LoRA adapters")
    for name, path in adapters.items():  # each adapter is loaded once; switching never reloads anything
        if kinds[name] == "shira":
            pipe.load_shira_weights(path, adapter_name=name)
        else:
            pipe.load_lora_weights(str(path), adapter_name=name)
    state = PartialState()
    records_path = out_dir / "records.jsonl"
    done = {}
    if records_path.is_file():
        for line in records_path.read_text().splitlines():
            record = json.loads(line)
            done[record["key"]] = record
    work = [
        (label, strengths, alpha, index, seed)
        for label, strengths, alpha in _settings(list(adapters), fusions, alphas, include_base)
        for index in range(len(prompts))
        for seed in seeds
        if _key(label, alpha, index, seed) not in done
    ]
    version = getattr(scorer, "version", None)
    new_records, generated = [], 0
    with state.split_between_processes(work) as share:
        progress = tqdm(total=len(share), desc="images", disable=not state.is_local_main_process)
        by_setting: dict[tuple, list] = {}
        for item in share:
            by_setting.setdefault((item[0], item[2]), []).append(item)
        for (label, alpha), items in by_setting.items():
            strengths = items[0][1]
            _activate(pipe, strengths, kinds)
            images, rows = [], []
            for _, _, _, index, seed in items:
                path = out_dir / "images" / label / f"alpha{alpha:g}" / f"p{index:03d}-s{seed}.png"
                if path.is_file():
                    image = Image.open(path).convert("RGB")
                else:
                    generator = torch.Generator(device="cpu").manual_seed(seed)
                    image = pipe(prompts[index].prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 height=height, width=width, generator=generator).images[0]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
                    generated += 1
                images.append(image)
                rows.append({
                    "key": _key(label, alpha, index, seed), "prompt": prompts[index].prompt, "prompt_index": index,
                    "concept": prompts[index].concept, "seen": prompts[index].seen, "seed": seed, "alpha": alpha,
                    "adapters": label, "weights": strengths, "model": model_id, "steps": num_inference_steps,
                    "guidance": guidance_scale, "hps_version": version, "image": str(path.relative_to(out_dir)),
                })
                progress.update(1)
            _deactivate(pipe, strengths, kinds)
            if scorer is not None:
                for row, score in zip(rows, scorer.score(images, [r["prompt"] for r in rows])):
                    row["score"] = score
            new_records += rows
        progress.close()
    part = out_dir / f"records.part{state.process_index}.jsonl"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text("".join(json.dumps(r) + "\n" for r in new_records))
    state.wait_for_everyone()
    pipe.set_shira_adapters([])
    result = EvaluationResult(out_dir, generated=generated)
    if state.is_main_process:
        for index in range(state.num_processes):
            part = out_dir / f"records.part{index}.jsonl"
            for line in part.read_text().splitlines():
                record = json.loads(line)
                done[record["key"]] = record
            part.unlink()
        result.records = sorted(done.values(), key=lambda r: r["key"])
        records_path.write_text("".join(json.dumps(r) + "\n" for r in result.records))
        result.summary = summarize_records(result.records)
        write_reports(out_dir, result.records, result.summary, prompts, seeds)
    state.wait_for_everyone()
    return result


def summarize_records(records: Sequence[Mapping]) -> list[dict]:
    """Mean ± std (ddof=1) of the scores per (adapter set, alpha), in first-seen order."""
    groups: dict[tuple[str, float], list[float]] = {}
    for record in records:
        if record.get("score") is not None:
            groups.setdefault((record["adapters"], record["alpha"]), []).append(float(record["score"]))
    return [
        {"adapters": label, "alpha": alpha, "n": len(scores), "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0}
        for (label, alpha), scores in groups.items()
    ]


def write_reports(out_dir: Path, records: Sequence[Mapping], summary: Sequence[Mapping], prompts: Sequence[Prompt], seeds: Sequence[int]) -> None:
    """records.csv, summary.md / .csv (paper format: rows = adapter sets, columns = alpha), grids, plot."""
    columns = ["prompt", "prompt_index", "concept", "seen", "seed", "alpha", "adapters", "weights", "hps_version", "model", "steps", "guidance", "score", "image"]
    with open(out_dir / "records.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({**record, "weights": json.dumps(record["weights"])})
    with open(out_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["adapters", "alpha", "n", "mean", "std"])
        writer.writeheader()
        writer.writerows(summary)
    alphas = sorted({row["alpha"] for row in summary if row["adapters"] != BASE}, reverse=True)
    labels = list(dict.fromkeys(row["adapters"] for row in summary))
    cell = {(row["adapters"], row["alpha"]): f"{row['mean']:.1f} ± {row['std']:.1f}" for row in summary}
    version = next((r.get("hps_version") for r in records if r.get("hps_version")), None)
    lines = [f"HPSv2{f' {version}' if version else ''} x 100, mean ± std over images (n per cell in summary.csv)", ""]
    lines.append("| adapters | " + " | ".join(f"α={a:g}" for a in alphas) + " |")
    lines.append("|---|" + "---|" * len(alphas))
    for label in labels:
        if label == BASE:
            lines.append("| base | " + " | ".join(cell.get((BASE, 0.0), "") for _ in alphas) + " |")
        else:
            lines.append(f"| {label} | " + " | ".join(cell.get((label, a), "") for a in alphas) + " |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    _write_grids(out_dir, records, len(prompts), seeds)
    if summary:  # images generated without scoring have nothing to plot
        _write_plot(out_dir, summary, alphas)


def _write_grids(out_dir: Path, records: Sequence[Mapping], prompt_count: int, seeds: Sequence[int]) -> None:
    grid_dir = out_dir / "grids"
    grid_dir.mkdir(exist_ok=True)
    for index in range(prompt_count):
        rows: dict[tuple, dict[int, str]] = {}
        for record in records:
            if record["prompt_index"] == index:
                rows.setdefault((record["adapters"], record["alpha"]), {})[record["seed"]] = record["image"]
        if not rows:
            continue
        tiles = {key: {s: Image.open(out_dir / p).convert("RGB") for s, p in images.items()} for key, images in rows.items()}
        size = next(iter(next(iter(tiles.values())).values())).size
        grid = Image.new("RGB", (size[0] * len(seeds), size[1] * len(tiles)), "white")
        for row, (_, images) in enumerate(sorted(tiles.items(), key=lambda item: (item[0][0] != BASE, item[0][0], -item[0][1]))):
            for column, seed in enumerate(seeds):
                if seed in images:
                    grid.paste(images[seed].resize(size), (column * size[0], row * size[1]))
        grid.save(grid_dir / f"prompt{index:03d}.png")


def _write_plot(out_dir: Path, summary: Sequence[Mapping], alphas: Sequence[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(row["adapters"] for row in summary):
        points = sorted((row["alpha"], row["mean"], row["std"]) for row in summary if row["adapters"] == label)
        if label == BASE and points:
            axes.axhline(points[0][1], color="gray", linestyle="--", label="base")
            continue
        axes.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=label)
    axes.set_xlabel("α")
    axes.set_ylabel("HPSv2 × 100")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "score_vs_alpha.png", dpi=100)
    plt.close(figure)
