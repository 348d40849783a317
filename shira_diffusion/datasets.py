"""Style datasets: check a user's folder, and draw small synthetic style sets for the offline demo.

`check_dataset` reports every defect of a training folder at once (the trainer stops at the first): entries
that are not regular files, metadata.jsonl rows and .txt captions that are unusable (read and checked by
`data.scan_folder`, the trainer's own reader), unreadable images, images without a caption, images smaller
than the training resolution, exact duplicates, and a licence field on every row when the dataset card asks
for one (CC0 / public domain only for the Bluefire / Paintings look-alikes).

`make_style_dataset` draws procedural images: simple content shapes (circle, square, triangle, star,
ring, cross) rendered in one of two styles, "blue_glow" (glowing blue strokes on dark ground) or "brush"
(warm oil-paint texture with visible strokes), with captions and a held-out split.

Usage:
    defects, stats = check_dataset("my_style/", resolution=512)
    make_style_dataset("data/blue_glow", style="blue_glow", train=12, heldout=4, size=64)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .data import IMAGE_ERRORS, METADATA_NAME, irregular_entries, open_image, scan_folder

OPEN_LICENSES = {"cc0", "cc0-1.0", "public domain", "public-domain", "pd", "cc-pdm", "pdm"}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
STYLES = {"blue_glow": "blue fire style", "brush": "oil painting style"}


@dataclass(frozen=True)
class Defect:
    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


def check_dataset(folder: str | Path, resolution: int | None = None, require_license: bool = False, cc0_only: bool = True) -> tuple[list[Defect], dict]:
    """All defects of an image folder, and size statistics. Usage: defects, stats = check_dataset("dir")"""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder")
    # never opened (a FIFO would block the check forever); the trainer skips them too
    defects = [Defect(path.name, f"{kind}, not a regular file (skipped)") for path, kind in irregular_entries(folder)]
    scan = scan_folder(folder)
    defects += [Defect(file, problem) for file, problem in scan.problems]
    if not scan.images:
        return defects + [Defect(str(folder), "no images")], {"images": 0}
    if scan.rows is None:  # metadata.jsonl unreadable as a whole: every image would be reported without a caption
        return defects, {"images": len(scan.images)}
    sizes, seen_hashes = [], {}
    for image in scan.images:
        try:  # decoded as the trainer does: EXIF-rotated (upright size), 16-bit scaled to 8
            width, height = open_image(image).size
            sizes.append((width, height))
        except Image.DecompressionBombError as error:  # refused from its header, not decoded
            defects.append(Defect(image.name, f"too large to decode ({error})"))
            continue
        except IMAGE_ERRORS as error:
            defects.append(Defect(image.name, f"unreadable image ({type(error).__name__})"))
            continue
        if image.name not in scan.captions and image.name not in scan.rows:  # a row's bad caption is reported above
            defects.append(Defect(image.name, f"no caption (add it to {METADATA_NAME} or a .txt file beside it)"))
        if resolution and min(width, height) < resolution:
            defects.append(Defect(image.name, f"{width}x{height} is smaller than the training resolution {resolution}"))
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        if digest in seen_hashes:
            defects.append(Defect(image.name, f"exact duplicate of {seen_hashes[digest]}"))
        else:
            seen_hashes[digest] = image.name
        if require_license:
            defects += _license_defects(image.name, scan.rows.get(image.name, {}).get("license"), cc0_only)
    stats = {"images": len(scan.images), "captioned": sum(1 for i in scan.images if i.name in scan.captions)}
    if sizes:
        stats.update(min_size=min(sizes, key=lambda s: s[0] * s[1]), max_size=max(sizes, key=lambda s: s[0] * s[1]))
    return defects, stats


def _license_defects(name: str, license_: object, cc0_only: bool) -> list[Defect]:
    """A missing licence field, or (cc0_only) one that is not CC0 / public domain."""
    if not license_:
        return [Defect(name, f"no license field in {METADATA_NAME}")]
    if cc0_only and str(license_).strip().lower() not in OPEN_LICENSES:
        return [Defect(name, f"license {license_!r} is not CC0 / public domain")]
    return []


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = size / 2 + rng.uniform(-size / 10, size / 10), size / 2 + rng.uniform(-size / 10, size / 10)
    r = size * rng.uniform(0.22, 0.32)
    width = max(2, size // 14)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    elif shape == "star":
        points = [(cx + (r if i % 2 == 0 else r / 2.5) * math.sin(i * math.pi / 5), cy - (r if i % 2 == 0 else r / 2.5) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(points, fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=width)
    else:
        draw.rectangle([cx - r, cy - width, cx + r, cy + width], fill=255)
        draw.rectangle([cx - width, cy - r, cx + width, cy + r], fill=255)
    return mask


def render_style(shape: str, style: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One procedural image of `shape` in `style`."""
    mask = _shape_mask(shape, size, rng)
    if style == "blue_glow":
        ground = np.zeros((size, size, 3), np.float32) + np.array([8, 10, 30], np.float32)
        glow = np.asarray(mask.filter(ImageFilter.GaussianBlur(size / 12)), np.float32)[..., None] / 255
        core = np.asarray(mask.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.GaussianBlur(1)), np.float32)[..., None] / 255
        pixels = ground + glow * np.array([40, 120, 255]) * 1.6 + core * np.array([200, 230, 255])
    elif style == "brush":
        strokes = rng.normal(0, 1, (size, size // 4 + 1)).repeat(4, axis=1)[:, :size]  # horizontal brush strokes
        ground = np.array([230, 200, 150], np.float32) + strokes[..., None] * np.array([18, 14, 10])
        paint = np.array([170, 60, 30], np.float32) + strokes[..., None] * np.array([25, 10, 8])
        inside = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.5)), np.float32)[..., None] / 255
        pixels = ground * (1 - inside) + paint * inside
    else:
        raise ValueError(f"unknown style {style!r}; choose one of {list(STYLES)}")
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_style_dataset(folder: str | Path, style: str, train: int = 12, heldout: int = 4, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write `train` and `heldout` captioned images of `style` (CC0: made here) into folder/{train,heldout}."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("heldout", heldout)):
        target = folder / split
        target.mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(count):
            shape = SHAPES[(index + (0 if split == "train" else 3)) % len(SHAPES)]
            name = f"{split}_{index:03d}_{shape}.png"
            render_style(shape, style, size, rng).save(target / name)
            rows.append({"file_name": name, "text": f"a {shape}, {STYLES[style]}", "license": "CC0-1.0"})
        (target / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "train", folder / "heldout"
