"""Image grids the package writes (training's samples.png, the demos' grids): diffusers' `make_image_grid`, labels in
a white margin drawn with PIL's ImageDraw, and never more pixels than PIL opens without a DecompressionBombWarning.

Usage:
    grid = labelled_grid(images, rows=2, cols=3, row_labels=["base", "styled"], column_labels=["cat", "dog", "fox"])
    grid.save("grid.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageOps

# PIL warns from MAX_IMAGE_PIXELS and refuses twice that; if a program has switched the check off (None), this
# is PIL's default, so what the package writes still opens everywhere.
DEFAULT_PIXEL_LIMIT = 89_478_485
LINE_HEIGHT = 12  # PIL's default bitmap font draws about 11 px per line


def pixel_limit() -> int:
    """The most pixels a written grid may have: PIL's current MAX_IMAGE_PIXELS (its default when switched off)."""
    return int(Image.MAX_IMAGE_PIXELS or DEFAULT_PIXEL_LIMIT)


def cap_pixels(image: Image.Image, limit: int | None = None) -> Image.Image:
    """`image`, scaled down (aspect kept) to at most `limit` pixels (default `pixel_limit()`); unchanged if it fits.

    Usage: cap_pixels(grid).save("grid.png")
    """
    limit = limit or pixel_limit()
    if image.width * image.height <= limit:
        return image
    scale = math.sqrt(limit / (image.width * image.height))
    size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
    while size[0] * size[1] > limit:  # floor rounding can leave a few pixels over
        size = (max(1, size[0] - 1), max(1, size[1] - 1))
    return image.resize(size, Image.Resampling.LANCZOS)


def image_grid(images: Sequence[Image.Image], cols: int | None = None, tile: int | tuple[int, int] | None = None) -> Image.Image:
    """`images` in rows of `cols` (default: one row up to 4 images, else a near-square layout), each resized to
    `tile` (default: the first image's size), blank tiles after the last; capped at `pixel_limit()`.

    Usage: image_grid(pipe(prompt, num_images_per_prompt=4).images)
    """
    from diffusers.utils import make_image_grid

    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or (len(images) if len(images) <= 4 else math.ceil(math.sqrt(len(images))))
    size = (tile, tile) if isinstance(tile, int) else tuple(tile or images[0].size)
    tiles = [image.convert("RGB") if image.size == size else image.convert("RGB").resize(size, Image.Resampling.NEAREST) for image in images]
    rows = math.ceil(len(tiles) / cols)
    tiles += [Image.new("RGB", size, "white")] * (rows * cols - len(tiles))  # make_image_grid wants rows * cols images
    return cap_pixels(make_image_grid(tiles, rows=rows, cols=cols))


def labelled_grid(images: Sequence[Image.Image], rows: int, cols: int, row_labels: Sequence[str] = (),
                  column_labels: Sequence[str] = (), tile: int | tuple[int, int] | None = None) -> Image.Image:
    """A `rows` x `cols` grid (row-major `images`, resized to `tile`) with `row_labels` in a left margin and
    `column_labels` (may hold newlines) in a top margin; capped at `pixel_limit()`.

    Usage: labelled_grid(images, rows=2, cols=4, row_labels=["base", "alpha=1"], column_labels=prompts, tile=96)
    """
    if len(images) != rows * cols:
        raise ValueError(f"labelled_grid: {rows} rows x {cols} columns need {rows * cols} images, got {len(images)}")
    for name, labels, count in (("row_labels", row_labels, rows), ("column_labels", column_labels, cols)):
        if labels and len(labels) != count:
            raise ValueError(f"labelled_grid: {name} has {len(labels)} labels for {count} {name.split('_')[0]}s")
    grid = image_grid(images, cols=cols, tile=tile)
    width, height = grid.width // cols, grid.height // rows
    left = 6 * max((len(label) for label in row_labels), default=0) + 8 if row_labels else 0  # ~6 px per character
    top = LINE_HEIGHT * max((label.count("\n") + 1 for label in column_labels), default=0) + 4 if column_labels else 0
    canvas = ImageOps.expand(grid, border=(left, top, 0, 0), fill="white")
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(row_labels):
        draw.text((4, top + row * height + height // 2 - LINE_HEIGHT // 2), label, fill="black")
    for column, label in enumerate(column_labels):
        draw.text((left + column * width + 3, 2), label, fill="black")
    return cap_pixels(canvas)
