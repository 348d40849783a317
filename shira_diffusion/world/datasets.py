"""The world's style datasets, analogues of the paper's Bluefire (54 images) and Paintings (90) sets.

Each set has the paper's shape: a few training concepts (here a coloured shape, e.g. "red circle"), the
same number of images of each on varied backgrounds, positions and sizes, captions ending in the style's
trigger phrase ("a red circle on a gray background, blue fire style"), and validation prompts of seen
concepts and unseen ones (concepts not in the style's training images). Everything is drawn by the
world's renderer from a seed, so a set is the same on every machine; images are CC0 (made here).

Usage:
    write_style_dataset("data/blue_fire", "blue fire")   # 54 PNGs + metadata.jsonl + validation_prompts.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .scenes import BACKGROUNDS, Scene, render, sample_scene
from .styles import styled_caption, stylize


@dataclass(frozen=True)
class StyleSet:
    """The recipe of one style dataset: its concepts (shape, colour) and images per concept."""

    style: str
    concepts: tuple[tuple[str, str], ...]
    images_per_concept: int
    unseen: tuple[tuple[str, str, str], ...]  # validation prompts of content the style never saw


STYLE_SETS = {
    "blue fire": StyleSet(
        "blue fire",
        (("circle", "red"), ("square", "yellow"), ("triangle", "green"), ("circle", "white"), ("square", "purple"), ("triangle", "gray")),
        9,
        (("square", "red", "white"), ("triangle", "blue", "gray"), ("circle", "yellow", "black"), ("triangle", "purple", "black"),
         ("circle", "green", "white"), ("square", "black", "gray"), ("circle", "blue", "black"), ("triangle", "white", "gray"),
         ("square", "green", "black"), ("circle", "gray", "white"), ("triangle", "yellow", "white"), ("square", "blue", "gray")),
    ),
    "painting": StyleSet(
        "painting",
        (("circle", "blue"), ("square", "red"), ("triangle", "yellow"), ("circle", "green"), ("square", "white"), ("triangle", "purple"),
         ("circle", "black"), ("square", "gray"), ("triangle", "red")),
        10,
        (("circle", "red", "gray"), ("square", "yellow", "black"), ("triangle", "green", "white"), ("circle", "purple", "black"),
         ("square", "blue", "white"), ("triangle", "white", "gray"), ("circle", "yellow", "white"), ("square", "green", "gray"),
         ("triangle", "black", "gray"), ("circle", "white", "black"), ("square", "purple", "gray"), ("triangle", "blue", "black")),
    ),
}


def _backgrounds(colour: str) -> list[str]:
    return [background for background in BACKGROUNDS if background != colour]


def validation_prompts(style: str) -> list[dict]:
    """Seen concepts (each on its first allowed background) and unseen content, as prompt-file entries."""
    recipe = STYLE_SETS[style]
    seen = [Scene(shape, colour, _backgrounds(colour)[0]) for shape, colour in recipe.concepts]
    unseen = [Scene(*combination) for combination in recipe.unseen]
    return [{"prompt": styled_caption(scene.caption, [style]), "concept": f"{scene.colour} {scene.shape}", "seen": is_seen}
            for scenes, is_seen in ((seen, True), (unseen, False)) for scene in scenes]


def write_style_dataset(folder: str | Path, style: str, seed: int = 0, strength: float = 1.0) -> Path:
    """Write the style set `style` into `folder` (created): images, metadata.jsonl, validation_prompts.json."""
    if style not in STYLE_SETS:
        raise ValueError(f"unknown style {style!r}; the world has {list(STYLE_SETS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recipe, rng = STYLE_SETS[style], np.random.default_rng(seed)
    rows = []
    for shape, colour in recipe.concepts:
        backgrounds = _backgrounds(colour)
        for index in range(recipe.images_per_concept):
            scene = sample_scene(rng, combination=(shape, colour, backgrounds[index % len(backgrounds)]))
            image, coverage = render(scene, rng=rng)
            name = f"{colour}_{shape}_{index:02d}.png"
            stylize(image, coverage, {style: strength}, rng).save(folder / name)
            rows.append({"file_name": name, "text": styled_caption(scene.caption, [style]), "license": "CC0-1.0"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "validation_prompts.json").write_text(json.dumps(validation_prompts(style), indent=1) + "\n")
    return folder

