"""The world's two styles, analogues of the paper's Bluefire and Paintings sets, with a strength in [0, 1].

- blue fire: blue flames rise from the object's edges (tongues of varying height, a white-blue core, a
  blue glow), drawn over the scene;
- painting: the scene repainted in short brush strokes that take their colour from where they start, in
  a warm, muted, varnished palette, on a canvas weave.

`stylize(image, coverage, strengths, rng)` applies them in a fixed order (fire, then painting over it), so
both can be in one image. A strength s is a linear blend between the image before and after the style:
s = 0 returns the input unchanged, and s is the judge's ground truth for "how much of the style".
`STYLES` is the one list of styles: names, the trigger phrase captions use, and the function.

Usage:
    image, coverage = render(scene, 32)
    styled = stylize(image, coverage, {"blue fire": 1.0}, np.random.default_rng(0))
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scenes import SUPERSAMPLE


def _smooth_noise(rng: np.random.Generator, length: int, cells: int) -> np.ndarray:
    """1-D value noise in [0, 1]: `cells` random knots, linearly interpolated over `length` samples."""
    knots = rng.uniform(0, 1, cells + 1)
    return np.interp(np.linspace(0, cells, length), np.arange(cells + 1), knots)


def _edges(coverage: np.ndarray) -> np.ndarray:
    """Where coverage drops within one pixel: the object's outline, in [0, 1]."""
    padded = np.pad(coverage, 1, mode="edge")
    neighbours = np.stack([padded[1 + dy:1 + dy + coverage.shape[0], 1 + dx:1 + dx + coverage.shape[1]]
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return np.clip(coverage - neighbours.min(axis=0), 0, 1)


def blue_fire(pixels: np.ndarray, coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Full-strength blue fire over float RGB `pixels` (H, W, 3) in [0, 255]."""
    height, width = coverage.shape
    source = _edges(coverage)
    heights = 0.78 + 0.17 * _smooth_noise(rng, width, max(2, width // 4))  # per-column tongue length
    flicker = rng.uniform(0.9, 1.0, (height, width))
    flame = source.copy()
    for y in range(height - 2, -1, -1):  # each row inherits the decayed flame of the row below, drifting sideways
        below = flame[y + 1]
        drift = np.maximum(below, 0.55 * np.maximum(np.roll(below, 1), np.roll(below, -1)))
        flame[y] = np.maximum(flame[y], drift * heights * flicker[y])
    # flames rise over the background; over the object they only tint it, so the content stays readable
    flame = (np.clip(flame * 1.4, 0, 1) * (1 - 0.6 * coverage))[..., None]
    glow = np.asarray(Image.fromarray((source * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.6)), np.float32)[..., None] / 255
    deep, hot = np.array([25, 70, 255], np.float32), np.array([190, 235, 255], np.float32)
    colour = deep + (hot - deep) * flame ** 2
    return pixels * (1 - flame) + colour * flame + glow * np.array([40, 90, 200], np.float32)


def painting(pixels: np.ndarray, coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Full-strength painting of float RGB `pixels` (H, W, 3) in [0, 255]."""
    height, width = coverage.shape
    luminance = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
    muted = 0.75 * pixels + 0.25 * luminance[..., None]
    varnished = np.clip(muted * np.array([1.04, 0.97, 0.82], np.float32) + np.array([18, 10, 0], np.float32), 0, 255)
    side = (width * SUPERSAMPLE, height * SUPERSAMPLE)
    canvas = Image.fromarray(varnished.astype(np.uint8)).resize(side, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    direction = rng.uniform(0, np.pi)
    for _ in range(height * width // 3):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        angle = direction + rng.normal(0, 0.35)
        length = rng.uniform(1.0, 2.2)
        dx, dy = np.cos(angle) * length, np.sin(angle) * length
        base = varnished[min(int(y), height - 1), min(int(x), width - 1)]
        colour = tuple(int(v) for v in np.clip(base + rng.normal(0, 12, 3), 0, 255))
        ends = [((x - dx) * SUPERSAMPLE, (y - dy) * SUPERSAMPLE), ((x + dx) * SUPERSAMPLE, (y + dy) * SUPERSAMPLE)]
        draw.line(ends, fill=colour, width=int(rng.uniform(1.2, 2.0) * SUPERSAMPLE))
    painted = np.asarray(canvas.resize((width, height), Image.Resampling.BOX), np.float32)
    rows, columns = np.indices((height, width))
    weave = np.where((rows + columns) % 2 == 0, 1.04, 0.96).astype(np.float32)[..., None]
    return painted * weave


STYLES: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]]] = {
    # name -> (the phrase captions end with, full-strength renderer); applied in this order
    "blue fire": ("blue fire style", blue_fire),
    "painting": ("painting style", painting),
}


def stylize(image: Image.Image, coverage: np.ndarray, strengths: dict[str, float], rng: np.random.Generator) -> Image.Image:
    """`image` with each named style blended in at its strength (0 = absent, 1 = full)."""
    unknown = set(strengths) - set(STYLES)
    if unknown:
        raise ValueError(f"unknown style(s) {sorted(unknown)}; the world has {list(STYLES)}")
    pixels = np.asarray(image, np.float32)
    for name, (_, renderer) in STYLES.items():
        strength = float(strengths.get(name, 0.0))
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength of {name!r} must be in [0, 1], got {strength}")
        if strength > 0:
            pixels = pixels + strength * (np.clip(renderer(pixels, coverage, rng), 0, 255) - pixels)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def styled_caption(caption: str, styles: list[str] | tuple[str, ...]) -> str:
    """The caption with each style's trigger phrase: "a red circle ..., blue fire style"."""
    return ", ".join([caption] + [STYLES[name][0] for name in styles])
