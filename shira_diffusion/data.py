"""Style image folders for training: discovery, validation (clear errors before training) and loading.

A folder holds images with captions, either a `metadata.jsonl` in the Hugging Face imagefolder convention
(`{"file_name": "0001.png", "text": "a fox, blue fire style"}` per line) or a `.txt` file beside each
image. Without captions, `instance_prompt` is used for every image (DreamBooth style).

Usage:
    records = read_image_folder("bluefire/", instance_prompt=None)      # [(path, caption), ...]
    dataset = StyleDataset(records, resolution=512, center_crop=False, random_flip=True, seed=0)
"""

from __future__ import annotations

import json
import os
import random
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What decoding a bad file can raise: not an image, truncated data, a decompression bomb.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
METADATA_NAME = "metadata.jsonl"
MAX_RESOLUTION = 4096  # SD / SDXL train at <= 1024; this bounds one batch's memory before any model loads
VAE_FACTOR = 8  # SD / SDXL VAEs downsample by 8: the latent of a multiple of 8 has whole-pixel sizes


class DatasetError(ValueError):
    """A training folder is unusable; the message names the folder or file."""


def check_resolution(resolution: int, flag: str = "--resolution") -> None:
    """Refuse a square training / sampling size the VAE cannot take (not a positive multiple of 8) or too large
    to be meant (over MAX_RESOLUTION). Usage: check_resolution(512)"""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < VAE_FACTOR or resolution % VAE_FACTOR:
        raise ValueError(f"{flag} must be a positive multiple of {VAE_FACTOR}, got {resolution!r}")
    if resolution > MAX_RESOLUTION:
        raise ValueError(f"{flag} must be at most {MAX_RESOLUTION}, got {resolution} (SD / SDXL are trained at 512 to 1024)")


def list_images(folder: Path) -> list[Path]:
    """Regular image files directly in `folder` (symlinks to them too), sorted by name. Other entries with an
    image suffix (a FIFO, a socket, a device, a folder, a broken link) are left out: opening a FIFO blocks forever.
    Usage: images = list_images(Path("bluefire"))"""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())  # stat, no open


def irregular_entries(folder: Path) -> list[tuple[Path, str]]:
    """(entry, what it is) for each entry with an image suffix that `list_images` leaves out, sorted by name.
    Usage: for path, kind in irregular_entries(folder): print(path, kind)"""
    found = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.is_file():
            found.append((path, _entry_kind(path)))
    return found


def _entry_kind(path: Path) -> str:
    """'a FIFO', 'a folder', ... for an entry that is not a regular file (a link is judged by its target)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken symbolic link" if path.is_symlink() else "unreadable"
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_image(path: str | Path) -> Image.Image:
    """A file as the 8-bit RGB image a viewer shows: EXIF orientation applied (phone photos are stored
    sideways with an Orientation tag) and high-bit-depth modes scaled to 8 bits, where PIL's
    convert("RGB") would clip them (a 16-bit PNG would come out nearly white). Decodes the whole file, so
    truncated data raises here. An image whose header claims more pixels than PIL's `Image.MAX_IMAGE_PIXELS`
    raises Image.DecompressionBombError before any pixel is decoded (PIL itself only warns up to twice the limit).
    Usage: image = open_image("photo.jpg")
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            handle = Image.open(path)  # reads the header only; the size check happens here
        except Image.DecompressionBombWarning as warning:
            raise Image.DecompressionBombError(f"{warning} (PIL's Image.MAX_IMAGE_PIXELS)") from None
    with handle:
        image = ImageOps.exif_transpose(handle)
        image.load()
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey (Pillow < 10 opens those PNGs as "I")
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8))
    elif image.mode == "F":  # float: [0, 1] as written by most tools, else the 16-bit range
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1 / 257.0
        image = Image.fromarray(np.clip(np.nan_to_num(values) * scale, 0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def read_metadata(folder: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each row of folder/metadata.jsonl ([] without one), every row checked: UTF-8 JSON
    with a string "file_name" naming an image of `folder` and a non-empty string "text". Raises DatasetError
    naming the file and line. Usage: rows = read_metadata(Path("bluefire"))"""
    metadata = folder / METADATA_NAME
    if not os.path.lexists(metadata):
        return []
    if not metadata.is_file():  # a FIFO would block the read forever
        raise DatasetError(f"{metadata}: {_entry_kind(metadata)}, not a regular file")
    images = {p.name for p in list_images(folder)}
    rows = []
    # bytes.splitlines splits at \n / \r only (str.splitlines also at \x1c, \u2028 ...: line numbers would drift)
    for number, raw in enumerate(metadata.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is allowed at the start of the file
        except UnicodeDecodeError as error:
            raise DatasetError(f"{metadata}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})") from None
        if line.strip():
            rows.append((number, _metadata_row(metadata, number, line, images)))
    return rows


def _metadata_row(metadata: Path, number: int, line: str, images: set[str]) -> dict:
    """One metadata.jsonl line as a checked row (see read_metadata)."""
    try:
        row = json.loads(line)
        name, text = row["file_name"], row["text"]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError):  # RecursionError: absurdly nested JSON
        raise DatasetError(f"{metadata}:{number}: expected {{\"file_name\": ..., \"text\": ...}}") from None
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{metadata}:{number}: \"file_name\" must be a file name, got {json.dumps(name)}")
    if not isinstance(text, str) or not text.strip():  # null would otherwise train the caption "None"
        raise DatasetError(f"{metadata}:{number}: \"text\" of {name} must be a non-empty string, got {json.dumps(text)}")
    if name not in images:  # a row for a missing image is a typo or a deleted file: never silently dropped
        path = metadata.parent / name
        found = "no such file" if not os.path.lexists(path) else f"{_entry_kind(path)}, not an image file ({', '.join(IMAGE_SUFFIXES)}) directly in the folder"
        raise DatasetError(f"{metadata}:{number}: \"file_name\" {name!r}: {found}")
    return row


def read_captions(folder: Path, images: list[Path]) -> dict[str, str]:
    """file name -> caption, from metadata.jsonl (imagefolder convention) and .txt files beside images."""
    captions = {row["file_name"]: row["text"] for _, row in read_metadata(folder)}
    for image in images:
        text_file = image.with_suffix(".txt")
        if image.name not in captions and text_file.is_file():
            try:
                captions[image.name] = text_file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as error:
                raise DatasetError(f"{text_file}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})") from None
    return captions


def read_image_folder(folder: str | Path, instance_prompt: str | None = None, limit: int | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) for every image (the first `limit` by name, if given), each decoded once so a
    truncated or unreadable file is reported now, not at its first batch; raises DatasetError naming what
    is wrong. Entries that are not regular files are skipped with a warning.
    Usage: records = read_image_folder("bluefire/", instance_prompt="blue fire style")"""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: training data folder does not exist")
    for path, kind in irregular_entries(folder):
        warnings.warn(f"{path}: {kind}, not a regular file; skipped", stacklevel=2)
    images = list_images(folder)[:limit]
    if not images:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the training data folder")
    captions = read_captions(folder, images)
    if captions:
        missing = [p.name for p in images if p.name not in captions]
        if missing:
            if instance_prompt is None:
                raise DatasetError(
                    f"{folder}: {len(missing)} of {len(images)} images have no caption, e.g. {missing[0]} "
                    "(add it to metadata.jsonl or a .txt file beside it, or pass --instance_prompt)"
                )
            captions.update({name: instance_prompt for name in missing})
    elif instance_prompt is None:
        raise DatasetError(f"{folder}: no captions (metadata.jsonl or .txt files) and no --instance_prompt")
    for image in images:  # a full decode: verify() does not read JPEG data, so it passes truncated files
        try:
            open_image(image)
        except IMAGE_ERRORS as error:
            raise DatasetError(f"{image}: unreadable image ({error})") from None
    return [(image, captions.get(image.name, instance_prompt)) for image in images]


class StyleDataset(torch.utils.data.Dataset):
    """Images resized to `resolution` (shorter side), cropped and flipped, in [-1, 1].

    Crops and flips draw from a generator seeded by (seed, epoch, index), not the global RNG, so a run
    resumed from a checkpoint sees exactly the augmentations of an uninterrupted one.
    """

    def __init__(self, records: list[tuple[Path, str]], resolution: int, center_crop: bool, random_flip: bool, seed: int):
        check_resolution(resolution, "resolution")
        self.records, self.resolution = records, resolution
        self.center_crop, self.random_flip, self.seed, self.epoch = center_crop, random_flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        path, caption = self.records[index]
        rng = random.Random(hash((self.seed, self.epoch, index)))
        image = open_image(path)
        original_size = (image.height, image.width)  # SDXL micro-conditioning: the size before resizing
        scale = self.resolution / min(image.size)
        width, height = max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left, top = rng.randint(0, width - self.resolution), rng.randint(0, height - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"pixel_values": pixels, "caption": caption, "original_size": original_size, "crop_top_left": (top, left)}


def collate(batch: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "captions": [item["caption"] for item in batch],
        "original_sizes": [item["original_size"] for item in batch],
        "crops_top_left": [item["crop_top_left"] for item in batch],
    }
