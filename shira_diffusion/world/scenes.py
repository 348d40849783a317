"""The shapes world: seeded scenes of one coloured shape on a named background, rendered with exact truth.

A `Scene` is the ground truth (shape, colour, background, centre, radius); `render(scene)` draws it
anti-aliased (4x supersampled, box-downscaled) and also returns the object's coverage mask, which the
styles use. The same seed always gives the same images, on every machine: every draw comes from a
`numpy.random.Generator` the caller passes in. Combinations in `HELDOUT` never appear in the base
model's training data (`sample_scene(..., split="train")`); they test generalisation.

Usage:
    rng = np.random.default_rng(0)
    scene = sample_scene(rng)                 # Scene(shape="circle", colour="red", background="gray", ...)
    image, mask = render(scene, size=32)      # PIL RGB image, float32 [size, size] coverage in [0, 1]
    scene.caption                             # "a red circle on a gray background"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (145, 55, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
BACKGROUNDS = ("white", "gray", "black")
# Held out of the base model's training: every shape, colour and background still appears, only these
# triples do not. Evaluation reports them apart ("unseen").
HELDOUT = (
    ("circle", "purple", "white"), ("circle", "yellow", "black"), ("circle", "green", "gray"),
    ("square", "red", "gray"), ("square", "blue", "white"), ("square", "white", "black"),
    ("triangle", "yellow", "gray"), ("triangle", "black", "white"), ("triangle", "red", "black"),
)
SUPERSAMPLE = 4
COLOUR_JITTER = 12  # per-channel RGB jitter of object and background: the words name a range, not one value


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image; coordinates are fractions of the image side."""

    shape: str
    colour: str
    background: str
    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.3

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; the world has {list(SHAPES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; the world has {list(COLOURS)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; the world has {list(BACKGROUNDS)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background would be invisible")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.background)


def combinations(split: str = "all") -> list[tuple[str, str, str]]:
    """(shape, colour, background) triples of a split: "train" (not held out), "heldout", or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}; choose train, heldout or all")
    every = [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS if c != b]
    if split == "all":
        return every
    return [t for t in every if (t in HELDOUT) == (split == "heldout")]


def sample_scene(rng: np.random.Generator, split: str = "all", combination: tuple[str, str, str] | None = None) -> Scene:
    """A random scene of `split` (or of the given combination) at a random size and position."""
    shape, colour, background = combination or combinations(split)[rng.integers(len(combinations(split)))]
    radius = float(rng.uniform(0.2, 0.32))
    margin = radius + 0.04
    return Scene(shape, colour, background, float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)), radius)


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator | None) -> tuple[int, ...]:
    if rng is None:
        return rgb
    return tuple(int(np.clip(v + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for v in rgb)


def _outline(scene: Scene, side: int) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    cx, cy, r = scene.cx * side, scene.cy * side, scene.radius * side
    if scene.shape == "triangle":  # upright, with the same area scale as the circle
        return [(cx, cy - r * 1.1), (cx - r * 1.1, cy + r * 0.85), (cx + r * 1.1, cy + r * 0.85)]
    if scene.shape == "square":
        r *= 0.9
    return (cx - r, cy - r, cx + r, cy + r)


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> tuple[Image.Image, np.ndarray]:
    """The scene as an RGB image of `size` px, and the shape's coverage in [0, 1] (float32, size x size).
    With `rng`, object and background colours get a small jitter (training data); without, exact colours."""
    side = size * SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    outline = _outline(scene, side)
    if scene.shape == "circle":
        draw.ellipse(outline, fill=255)
    elif scene.shape == "square":
        draw.rectangle(outline, fill=255)
    else:
        draw.polygon(outline, fill=255)
    coverage = np.asarray(mask.resize((size, size), Image.Resampling.BOX), np.float32)[..., None] / 255.0
    ground = np.array(_jittered(COLOURS[scene.background], rng), np.float32)
    paint = np.array(_jittered(COLOURS[scene.colour], rng), np.float32)
    pixels = ground * (1 - coverage) + paint * coverage
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)), coverage[..., 0]
