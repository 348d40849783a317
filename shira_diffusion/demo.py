"""The whole story in one command, on the shapes world: styles learnt, switched, fused, and measured.

Offline and on 2 CPU cores in a few minutes (`shira-diffusion demo`):
1. write the world's two style datasets (blue fire, 54 images; painting, 90) into out/data;
2. get four adapters: SHiRA and a LoRA of equal trainable parameters for each style, with the world recipe
   (`world.adapters.RECIPE`). Those named in `live` are trained now by the package's trainer; the others are
   the ones shipped in the package, trained by the same recipe and command (the report says which is which);
3. load the SHiRA adapters into the world model with `load_shira_weights`, time switching and fusing;
4. render labelled grids (rows: base; each style at alpha 0.5 and 1; both fused; columns: prompts), one for
   SHiRA and one for LoRA;
5. judge every setting over prompts and seeds: style strength and content accuracy of each adapter alone and
   fused (concept retention under fusion = fused strength / strength alone);
6. write `report.md`, `results.json` and the grids to the output folder.

With `--model` the older flow runs on a real SD 1.x model instead (`demo_model.py`).

Usage: results = run_world_demo(WorldDemoConfig(out="shira-demo"))
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from . import world
from .demo_model import median_ms
from .grids import labelled_grid
from .quiet import quiet_libraries
from .world.adapters import METHODS, shipped_adapter, training_config
from .world.evaluate import fusion_prompts, generate, measure, style_prompts

STYLES = tuple(world.STYLE_SETS)
GRID_CONTENT = ("a red circle on a gray background", "a yellow square on a black background", "a blue triangle on a white background",
                "a white circle on a black background", "a purple square on a gray background", "a green triangle on a black background")


@dataclass
class WorldDemoConfig:
    out: str = "shira-demo"
    live: tuple[str, ...] = ("shira:blue fire",)  # method:style pairs trained during the demo
    seeds: int = 2  # seeds per prompt for the judged measurements
    steps: int | None = None  # training steps of the live adapters (default: the recipe's)
    seed: int = 0


def _adapters(config: WorldDemoConfig, data: dict[str, Path], results: dict) -> dict[tuple[str, str], Path]:
    from .training import train

    paths, results["adapters"] = {}, {}
    for method in METHODS:
        for style in STYLES:
            if f"{method}:{style}" in config.live:
                overrides = {"seed": config.seed, "no_progress_bar": True} | ({"max_train_steps": config.steps} if config.steps else {})  # one bar: the demo's
                started = time.perf_counter()
                run = train(training_config(style, data[style], Path(config.out) / "adapters" / f"{method}_{style.replace(' ', '_')}", method, **overrides))
                paths[(method, style)] = run.adapter_path
                results["adapters"][f"{method} {style}"] = {"source": "trained live", "seconds": time.perf_counter() - started,
                                                            "steps": run.global_step, "trainable_parameters": run.trainable_parameters,
                                                            "first_loss": run.losses[0], "last_loss": run.losses[-1]}
            else:
                paths[(method, style)] = shipped_adapter(method, style)
                results["adapters"][f"{method} {style}"] = {"source": "shipped (same recipe)"}
    return paths


def _settings(base: bool = True) -> list[tuple[str, dict[str, float]]]:
    rows = [("base", {})] if base else []
    rows += [(f"{style} alpha={alpha:g}", {style: alpha}) for style in STYLES for alpha in (0.5, 1.0)]
    return rows + [("fused alpha=1", {style: 1.0 for style in STYLES})]


def _column_label(content: str) -> str:
    """'a red circle on a gray background' -> 'red circle\non gray': fits a 96 px column."""
    shape, background = content.removeprefix("a ").split(" on ")
    return shape + "\non " + background.removeprefix("a ").removesuffix(" background")


def render_grid(pipe, activate, seed: int = 0, tile: int = 96) -> Image.Image:
    """Rows: the settings of `_settings()` (labelled on the left); columns: GRID_CONTENT (labelled on top), each
    prompt naming the active styles. Images are scaled up with NEAREST: the pixels as generated."""
    labels, images = [], []
    for label, weights in _settings():
        activate(weights)
        prompts = [world.styled_caption(content, list(weights)) for content in GRID_CONTENT]
        labels.append(label)
        images += [image.resize((tile, tile), Image.Resampling.NEAREST) for image in generate(pipe, prompts, [seed])]
    activate({})
    return labelled_grid(images, rows=len(labels), cols=len(GRID_CONTENT), row_labels=labels,
                         column_labels=[_column_label(content) for content in GRID_CONTENT])


def judge_base(pipe, judge, seeds: range) -> dict:
    """The base model (no adapter active) on each style's prompts and on the fusion prompts."""
    report = {style: measure(pipe, judge, style_prompts(style), seeds) for style in STYLES}
    report["fused prompts"] = measure(pipe, judge, fusion_prompts(), seeds)
    return report


def judge_settings(pipe, activate, judge, seeds: range) -> dict:
    """The judge's summary of one method's settings: each style alone on its validation prompts, both fused
    on the fusion prompts; retention = fused strength / strength alone (alpha 1)."""
    report = {}
    for label, weights in _settings(base=False):
        activate(weights)
        report[label] = measure(pipe, judge, style_prompts(next(iter(weights))) if len(weights) == 1 else fusion_prompts(), seeds)
    activate({})
    report["retention"] = {style: report["fused alpha=1"]["styles"][style]["mean"] / report[f"{style} alpha=1"]["styles"][style]["mean"] for style in STYLES}
    return report


def _activation(pipe, names: dict[str, str]):
    """`activate({style: alpha})` for one method's adapters (`names`: style -> adapter name) in a pipeline holding
    both methods: exactly these active through `set_adapters` (which turns every other LoRA and SHiRA adapter off),
    after `enable_lora` (which also re-enables SHiRA: this package's `disable_lora` turns both off, as diffusers'
    does all adapters); `{}` is the base model (`disable_lora`)."""
    def activate(weights: dict[str, float]) -> None:
        if not weights:
            pipe.disable_lora()
            return
        pipe.enable_lora()
        pipe.set_adapters([names[style] for style in weights], list(weights.values()))
    return activate


def _load(pipe, paths: dict[tuple[str, str], Path]) -> dict[str, object]:
    """Both methods' adapters into one pipeline: SHiRA by `load_shira_weights`, LoRA by diffusers' loader (unfused),
    without the libraries' noise about it (`quiet_libraries`). Returns each method's `activate` (`_activation`)."""
    names = {}
    for style in STYLES:
        pipe.load_shira_weights(paths[("shira", style)], adapter_name=style)
        names[style] = "lora_" + style.replace(" ", "_")  # diffusers confuses names like "A" with lora_A keys
        with quiet_libraries():
            pipe.load_lora_weights(str(paths[("lora", style)].parent), weight_name=paths[("lora", style)].name, adapter_name=names[style])
    return {"shira": _activation(pipe, {style: style for style in STYLES}), "lora": _activation(pipe, names)}


def _timings(pipe, paths, activate_shira) -> dict[str, float]:
    """Median ms of SHiRA's switch, fuse and load + unload, with SHiRA enabled and every LoRA adapter off."""
    a, b = STYLES
    activate_shira({a: 1.0})  # enabled: a disabled engine would time writes it skips
    return {
        "switch A→B, both loaded (set_shira_adapters)": median_ms(lambda: (pipe.set_shira_adapters(b), pipe.set_shira_adapters(a))) / 2,
        "fuse A+B (1, 1)": median_ms(lambda: pipe.set_shira_adapters([a, b], [1.0, 1.0])),
        "load from file + unload": median_ms(lambda: (pipe.load_shira_weights(paths[("shira", a)], adapter_name="timing"), pipe.unload_shira_weights("timing"))),
    }


def run_world_demo(config: WorldDemoConfig) -> dict:
    """Run every step; returns the results written to results.json."""
    from tqdm.auto import tqdm

    from .world.judge import Judge

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": asdict(config)}
    started = time.perf_counter()
    # quiet_libraries: no loading bars inside the demo's bar, no library noise the user cannot act on.
    with quiet_libraries(), tqdm(total=5, desc="demo", unit="stage") as stages:
        stages.set_postfix_str("datasets")
        data = {style: world.write_style_dataset(out / "data" / style.replace(" ", "_"), style, seed=config.seed) for style in STYLES}
        stages.update()
        stages.set_postfix_str("adapters")
        paths = _adapters(config, data, results)
        stages.update()
        stages.set_postfix_str("switching")
        pipe, judge = world.pipeline(), Judge.load()
        activations = _load(pipe, paths)
        results["switch_ms"] = _timings(pipe, paths, activations["shira"])
        activations["shira"]({})
        stages.update()
        stages.set_postfix_str("grids")
        for method in METHODS:
            render_grid(pipe, activations[method], config.seed).save(out / f"grid_{method}.png")
        stages.update()
        stages.set_postfix_str("judging")
        pipe.disable_lora()
        results["judge"] = {"base": judge_base(pipe, judge, range(config.seeds))}
        results["judge"] |= {method: judge_settings(pipe, activations[method], judge, range(config.seeds)) for method in METHODS}
        stages.update()
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report(results))
    return results


def _strength(summary: dict, style: str) -> str:
    values = summary["styles"][style]
    return f"{values['mean']:.2f} ± {values['std']:.2f}"


def _accuracy(summary: dict) -> str:
    return f"{100 * summary['content_accuracy']:.0f} % (shape {100 * summary['shape_accuracy']:.0f}, colour {100 * summary['colour_accuracy']:.0f})"


def report(results: dict) -> str:
    """The demo's report.md: adapters (live or shipped), the judged table per method, retention, timings."""
    config = results["config"]
    lines = ["# shira-diffusion demo: the shapes world", "",
             f"World model (`shira_diffusion.world`, trained from scratch, ships in the package), 32 px, "
             f"{world.INFERENCE_STEPS} DDIM steps, guidance {world.GUIDANCE_SCALE}. Judge: `world.judge` (trained on procedural images only). "
             f"{config['seeds']} seeds per prompt; strengths are mean ± std over prompts × seeds (0 = no style; the judge reads a training image's full style as about 0.93). Content correct: share of images whose shape, colour and background are the prompted ones.", "",
             "## Adapters", "", "| adapter | source | steps | trainable parameters | seconds |", "|---|---|---|---|---|"]
    for name, info in results["adapters"].items():
        seconds = f"{info['seconds']:.0f}" if "seconds" in info else ""
        lines.append(f"| {name} | {info['source']} | {info.get('steps', '')} | {info.get('trainable_parameters', '')} | {seconds} |")
    header = ["| setting | prompts | " + " | ".join(f"{s} strength" for s in STYLES) + " | content correct |", "|---|---|" + "---|" * len(STYLES) + "---|"]
    row = lambda label, prompts, values: f"| {label} | {prompts} | " + " | ".join(_strength(values, s) for s in STYLES) + f" | {_accuracy(values)} |"  # noqa: E731
    lines += ["", "## Base model (no adapter)", ""] + header + [row("base", prompts, values) for prompts, values in results["judge"]["base"].items()]
    for method in METHODS:
        table = results["judge"][method]
        lines += ["", f"## {method.upper()}: what the judge sees", "", f"![{method} grid](grid_{method}.png)", ""] + header
        lines += [row(label, "fused prompts" if label.startswith("fused") else label.split(" alpha")[0], values) for label, values in table.items() if label != "retention"]
        lines += ["", "Concept retention under fusion (fused strength / strength alone, α = 1): " +
                  ", ".join(f"{style} {value:.2f}" for style, value in table["retention"].items())]
    lines += ["", "## Switching (median ms, SHiRA)", "", "| operation | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in results["switch_ms"].items()]
    lines += ["", f"Demo wall time: {results['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
