"""The demo on a real Stable Diffusion 1.x model (`shira-diffusion demo --model ...`): train two styles,
switch, fuse, measure how fusion keeps each style (HPSv2 scoring is added when its checkpoint is available).
The default demo runs on the shapes world instead (`demo.py`). Steps:
1. draw two synthetic style datasets ("blue glow" and "brush" over simple shapes), train and held-out splits;
2. train a SHiRA adapter (struct mask, r·(m+n) entries per weight) and a LoRA of rank r (the same number of
   trainable parameters) on each, with the real trainer and identical settings;
3. load the SHiRA adapters with `load_shira_weights`, render base / A / B / A+B at alpha 0.5 and 1, and time
   the switches;
4. concept retention under fusion: each adapter's held-out denoising loss on its own style, alone and fused
   with the other, for SHiRA and for LoRA. Retention = (base loss - fused loss) / (base loss - alone loss):
   the share of what the adapter learned that survives the fusion (1 = all of it);
5. write `report.md`, `results.json` and grid PNGs to the output folder.
The model and a given HPS checkpoint are checked first (the checkpoint is loaded), so a bad input fails in
seconds instead of after the training and rendering.

Usage: run_demo(DemoConfig(out="shira-demo"))
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from .grids import labelled_grid
from .trainables import ADAPTERS
from .quiet import quiet_libraries

STYLE_NAMES = {"A": "blue_glow", "B": "brush"}


@dataclass
class DemoConfig:
    out: str = "shira-demo"
    model: str | None = None  # a real SD 1.x folder or Hub id (required; None is refused)
    steps: int | None = None  # training steps per adapter
    resolution: int | None = None
    rank: int = 4  # LoRA rank, and SHiRA's budget r*(m+n): equal trainable parameters
    mask: str = "struct"  # the paper's pick for style fusion
    learning_rate: float | None = None
    inference_steps: int | None = None
    hps_checkpoint: str | None = None
    seed: int = 0

    def resolved(self) -> "DemoConfig":
        if self.model is None:
            raise ValueError("the real-model demo needs --model (a SD 1.x folder or Hub id); without it the demo runs on the shapes world")
        return DemoConfig(
            self.out, self.model, self.steps or 400, self.resolution or 512, self.rank, self.mask, self.learning_rate or 1e-4,
            self.inference_steps or 30, self.hps_checkpoint, self.seed,
        )


def _grid(rows: list[tuple[str, list[Image.Image]]], size: int) -> Image.Image:
    """One row per (label, images) setting, each image `size` px, labels in the left margin."""
    return labelled_grid([image for _, images in rows for image in images], rows=len(rows), cols=len(rows[0][1]),
                         row_labels=[name for name, _ in rows], tile=size)


def median_ms(action, repeats: int = 7) -> float:
    """Median milliseconds of `action` over `repeats` calls after one warm-up (GPU work timed to its end)."""
    action()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        if torch.cuda.is_available():  # GPU writes are asynchronous: time them to their end
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run_demo(config: DemoConfig) -> dict:
    """Run every step; returns the results written to results.json. The libraries' loading bars and known noise
    are off meanwhile (`quiet_libraries`): the demo's own bar is the one progress display."""
    with quiet_libraries():
        return _run(config)


def _run(config: DemoConfig) -> dict:
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    from .datasets import STYLES, make_style_dataset
    from .evaluation import check_model_source
    from .loaders import add_shira_support
    from .training import TrainingConfig, denoising_loss, train

    config = config.resolved()
    # Everything that can fail on user input fails now, in seconds, not after the training and rendering.
    check_model_source(config.model)
    scorer, hps_note = _prepare_scorer(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = tqdm(total=7, desc="demo", unit="step")
    results: dict = {"config": asdict(config)}

    stages.set_postfix_str("datasets")
    image_size = max(64, config.resolution)
    data = {key: make_style_dataset(out / "data" / style, style, train=12, heldout=4, size=image_size, seed=config.seed + i) for i, (key, style) in enumerate(STYLE_NAMES.items())}
    stages.update()

    model = config.model
    stages.update()

    stages.set_postfix_str("training")
    trained: dict[tuple[str, str], Path] = {}
    results["training"] = {}
    for method in ADAPTERS:
        for key, style in STYLE_NAMES.items():
            run = train(TrainingConfig(
                pretrained_model_name_or_path=model, train_data_dir=str(data[key][0]), output_dir=str(out / "adapters" / f"{method}_{style}"),
                resolution=config.resolution, center_crop=True, random_flip=True, train_batch_size=4, max_train_steps=config.steps,
                learning_rate=config.learning_rate, lr_scheduler="constant", lr_warmup_steps=0, adapter=method, mask=config.mask, shira_r=config.rank,
                rank=config.rank, seed=config.seed, report_to="none", checkpointing_steps=0,
                mixed_precision="fp16" if torch.cuda.is_available() else None,
            ))
            trained[(method, key)] = run.adapter_path
            results["training"][f"{method}_{style}"] = {
                "trainable_parameters": run.trainable_parameters, "steps": run.global_step,
                "first_loss": run.losses[0], "last_loss": run.losses[-1], "steps_per_second": run.steps_per_second,
            }
    stages.update()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = add_shira_support(StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None)).to(device)
    pipe.set_progress_bar_config(disable=True)

    stages.set_postfix_str("switching")
    pipe.load_shira_weights(trained[("shira", "A")], adapter_name="A")
    pipe.load_shira_weights(trained[("shira", "B")], adapter_name="B")
    results["switch_ms"] = {
        "switch A->B (set_shira_adapters)": median_ms(lambda: (pipe.set_shira_adapters("B"), pipe.set_shira_adapters("A"))) / 2,
        "fuse A+B (weights 0.7, 0.7)": median_ms(lambda: pipe.set_shira_adapters(["A", "B"], [0.7, 0.7])),
        "load from file + unload": median_ms(lambda: (pipe.load_shira_weights(trained[("shira", "A")], adapter_name="C"), pipe.unload_shira_weights("C"))),
    }
    stages.update()

    stages.set_postfix_str("grids")
    prompts = [f"a {shape}, {STYLES['blue_glow']}, {STYLES['brush']}" for shape in ("circle", "star", "triangle", "ring")]

    def render() -> list[Image.Image]:
        return [pipe(p, num_inference_steps=config.inference_steps, generator=torch.Generator().manual_seed(config.seed), height=config.resolution, width=config.resolution).images[0] for p in prompts]

    settings = [("base", []), ("A alpha=0.5", [("A", 0.5)]), ("A alpha=1", [("A", 1.0)]), ("B alpha=0.5", [("B", 0.5)]), ("B alpha=1", [("B", 1.0)]),
                ("A+B alpha=0.5", [("A", 0.5), ("B", 0.5)]), ("A+B alpha=1", [("A", 1.0), ("B", 1.0)])]
    rows = []
    for name, active in settings:
        pipe.set_shira_adapters([n for n, _ in active], [w for _, w in active])
        rows.append((name, render()))
    _grid(rows, max(96, config.resolution)).save(out / "grid_shira.png")
    pipe.set_shira_adapters([])
    stages.update()

    stages.set_postfix_str("retention")
    heldout = {key: data[key][1] for key in STYLE_NAMES}

    def losses() -> dict[str, float]:
        return {key: denoising_loss(pipe, heldout[key], config.resolution, seed=config.seed) for key in STYLE_NAMES}

    retention: dict = {}
    table = {}
    for method in ADAPTERS:
        if method == "lora":
            pipe.unload_shira_weights()
            # LoRA adapter names must not be "A"/"B": diffusers mixes them up with the lora_A / lora_B keys.
            pipe.load_lora_weights(str(trained[("lora", "A")].parent), adapter_name="first_style")
            pipe.load_lora_weights(str(trained[("lora", "B")].parent), adapter_name="second_style")
        activate = (lambda names: pipe.set_shira_adapters(names, [1.0] * len(names))) if method == "shira" else (
            lambda names: (pipe.enable_lora(), pipe.set_adapters([{"A": "first_style", "B": "second_style"}[n] for n in names], [1.0] * len(names))) if names else pipe.disable_lora())
        rows = {}
        for name, names in (("base", []), ("A", ["A"]), ("B", ["B"]), ("A+B", ["A", "B"])):
            activate(names)
            rows[name] = losses()
        table[method] = rows
        retention[method] = {
            key: (rows["base"][key] - rows["A+B"][key]) / (rows["base"][key] - rows[key][key]) if rows["base"][key] != rows[key][key] else float("nan")
            for key in STYLE_NAMES
        }
    results["heldout_denoising_loss"] = table
    results["fusion_retention"] = retention
    stages.update()

    stages.set_postfix_str("report")
    results["hpsv2"] = {"skipped": hps_note} if scorer is None else {"pending": "scoring"}
    (out / "results.json").write_text(json.dumps(results, indent=2))  # written before scoring: nothing is lost if it fails
    (out / "report.md").write_text(_report(results))
    if scorer is not None:
        results["hpsv2"] = _hps(config, pipe, trained, prompts, scorer.to(device))
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "report.md").write_text(_report(results))
    stages.update()
    stages.close()
    return results


def _prepare_scorer(config: DemoConfig):
    """(HPSv2Scorer on the CPU, None) when scoring will run, else (None, why not). A checkpoint the user named
    must load (errors propagate: bad file -> ValueError); the default one may be absent (a note)."""
    from .evaluation import HPSv2Scorer

    try:
        return HPSv2Scorer(config.hps_checkpoint, device="cpu"), None  # moved to the GPU only for scoring
    except FileNotFoundError as error:
        if config.hps_checkpoint is not None:
            raise
        return None, str(error)


def _hps(config: DemoConfig, pipe, trained, prompts, scorer) -> dict:
    """HPSv2 of base / A / B / A+B (SHiRA)."""
    pipe.unload_lora_weights()
    pipe.load_shira_weights(trained[("shira", "A")], adapter_name="A")
    pipe.load_shira_weights(trained[("shira", "B")], adapter_name="B")
    scores = {}
    for name, names in (("base", []), ("A", ["A"]), ("B", ["B"]), ("A+B", ["A", "B"])):
        pipe.set_shira_adapters(names)
        images = [pipe(p, num_inference_steps=config.inference_steps, generator=torch.Generator().manual_seed(config.seed)).images[0] for p in prompts]
        values = scorer.score(images, prompts)
        scores[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return {"version": scorer.version, "scores": scores}


def _report(results: dict) -> str:
    config = results["config"]
    lines = [
        "# shira-diffusion demo", "",
        f"Model: `{config['model']}`, resolution {config['resolution']}, "
        f"{config['steps']} training steps per adapter, SHiRA {config['mask']} mask with r={config['rank']} vs LoRA rank {config['rank']}.", "",
        "## Training", "", "| run | trainable parameters | first loss | last loss | steps/s |", "|---|---|---|---|---|",
    ]
    for name, run in results["training"].items():
        lines.append(f"| {name} | {run['trainable_parameters']:,} | {run['first_loss']:.4f} | {run['last_loss']:.4f} | {run['steps_per_second']:.1f} |")
    lines += ["", "## Switching (median ms)", "", "| operation | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in results["switch_ms"].items()]
    lines += ["", "## Concept retention under fusion", "",
              "Held-out denoising loss (fixed noise and timesteps; lower is better) on each style's held-out images. "
              "Retention = (base − fused) / (base − alone): the share of an adapter's gain that survives fusion with the other style.", "",
              "| method | setting | loss on style A | loss on style B |", "|---|---|---|---|"]
    for method, rows in results["heldout_denoising_loss"].items():
        for name, values in rows.items():
            lines.append(f"| {method} | {name} | {values['A']:.4f} | {values['B']:.4f} |")
    lines += ["", "| method | retention of A under A+B | retention of B under A+B |", "|---|---|---|"]
    for method, values in results["fusion_retention"].items():
        lines.append(f"| {method} | {values['A']:.3f} | {values['B']:.3f} |")
    lines += ["", "## Images", "", "![SHiRA grid](grid_shira.png)", "",
              "Rows: base, A (blue glow) and B (brush) at α = 0.5 and 1, and the fusion A+B; columns: four prompts naming both styles.", "",
              "## HPSv2", ""]
    hps = results["hpsv2"]
    if "skipped" in hps:
        lines.append(f"Skipped: {hps['skipped']}")
    elif "pending" in hps:
        lines.append("Not scored yet (the run stopped before or during scoring).")
    else:
        lines += [f"HPSv2 {hps['version']} × 100 (mean ± std over the grid prompts):", ""]
        lines += [f"- {name}: {v['mean']:.1f} ± {v['std']:.1f}" for name, v in hps["scores"].items()]
    return "\n".join(lines) + "\n"
