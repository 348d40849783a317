"""Generate on the world model and measure the images with the judge: content accuracy, style strength.

Every image of (prompt, seed) is drawn with its own `torch.Generator().manual_seed(seed)`, so an image does
not depend on what else is in its batch; prompts x seeds are generated in batches. `measure` returns the
judge's summary (`judge.summarize`) of the images against their prompts; `base_quality` is the base model's
report card over every (shape, colour, background) combination, seen in training and held out.

Usage:
    pipe, judge = world.pipeline(), Judge.load()
    summary = measure(pipe, judge, ["a red circle on a gray background"], seeds=range(8))
    card = base_quality(pipe, judge, seeds=range(4))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ..diffusers_verbs import lora_only
from .datasets import STYLE_SETS, validation_prompts
from .judge import Judge, summarize
from .model import GUIDANCE_SCALE, INFERENCE_STEPS, RESOLUTION
from .scenes import Scene, combinations
from .styles import styled_caption


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], guidance_scale: float = GUIDANCE_SCALE,
             num_inference_steps: int = INFERENCE_STEPS, batch_size: int = 64) -> list[Image.Image]:
    """One image per (prompt, seed), prompts outer, seeds inner."""
    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    images: list[Image.Image] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        images += pipe([p for p, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                       guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                       height=RESOLUTION, width=RESOLUTION).images
    return images


def measure(pipe, judge: Judge, prompts: Sequence[str], seeds: Sequence[int], **generation) -> dict:
    """The judge's summary of every (prompt, seed) image; `generation` goes to `generate`."""
    images = generate(pipe, prompts, seeds, **generation)
    return summarize(judge.score(images, [p for p in prompts for _ in seeds]))


def base_quality(pipe, judge: Judge, seeds: Sequence[int] = range(4), **generation) -> dict:
    """Content accuracy and style strengths of plain prompts, for combinations seen in training and held out."""
    report = {}
    for split in ("train", "heldout"):
        prompts = [Scene(*combination).caption for combination in combinations(split)]
        report["seen" if split == "train" else "unseen"] = measure(pipe, judge, prompts, seeds, **generation)
    return report


def style_prompts(style: str, seen: bool | None = None) -> list[str]:
    """The style set's validation prompts (seen concepts, unseen ones, or both when `seen` is None)."""
    return [p["prompt"] for p in validation_prompts(style) if seen is None or p["seen"] == seen]


def fusion_prompts() -> list[str]:
    """Every style set's validation content once, each prompt naming every style (the fusion's prompts)."""
    contents = dict.fromkeys(p["prompt"].split(",")[0] for style in STYLE_SETS for p in validation_prompts(style))
    return [styled_caption(content, list(STYLE_SETS)) for content in contents]


def shira_activation(pipe):
    """`activate({name: alpha})` for SHiRA adapters loaded under the style names: exactly these active (enabled
    again first: `disable_lora` turns SHiRA adapters off too)."""
    def activate(weights: dict[str, float]) -> None:
        pipe.enable_shira()
        pipe.set_shira_adapters(list(weights), list(weights.values()))
    return activate


def lora_activation(pipe, adapter_names: dict[str, str]):
    """`activate({style: alpha})` for LoRA adapters loaded with diffusers (unfused, `set_adapters`);
    `adapter_names` maps each style to its diffusers adapter name. diffusers' own verbs on the LoRA layers only
    (`lora_only`): any SHiRA adapters in the pipeline are left as they are."""
    def activate(weights: dict[str, float]) -> None:
        if not weights:
            lora_only(pipe, "disable_lora")()
            return
        lora_only(pipe, "enable_lora")()
        lora_only(pipe, "set_adapters")([adapter_names[name] for name in weights], list(weights.values()))
    return activate
