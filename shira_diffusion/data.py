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
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """A training folder is unusable; the message names the folder or file."""


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_captions(folder: Path, images: list[Path]) -> dict[str, str]:
    """file name -> caption, from metadata.jsonl (imagefolder convention) and .txt files beside images."""
    captions: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[row["file_name"]] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DatasetError(f"{metadata}:{number}: expected {{\"file_name\": ..., \"text\": ...}}") from None
    for image in images:
        text_file = image.with_suffix(".txt")
        if image.name not in captions and text_file.is_file():
            captions[image.name] = text_file.read_text().strip()
    return captions


def read_image_folder(folder: str | Path, instance_prompt: str | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) for every image; raises DatasetError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: training data folder does not exist")
    images = list_images(folder)
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
    for image in images:
        try:
            with Image.open(image) as handle:
                handle.verify()
        except (UnidentifiedImageError, OSError) as error:
            raise DatasetError(f"{image}: unreadable image ({error})") from None
    return [(image, captions.get(image.name, instance_prompt)) for image in images]


class StyleDataset(torch.utils.data.Dataset):
    """Images resized to `resolution` (shorter side), cropped and flipped, in [-1, 1].

    Crops and flips draw from a generator seeded by (seed, epoch, index), not the global RNG, so a run
    resumed from a checkpoint sees exactly the augmentations of an uninterrupted one.
    """

    def __init__(self, records: list[tuple[Path, str]], resolution: int, center_crop: bool, random_flip: bool, seed: int):
        self.records, self.resolution = records, resolution
        self.center_crop, self.random_flip, self.seed, self.epoch = center_crop, random_flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        path, caption = self.records[index]
        rng = random.Random(hash((self.seed, self.epoch, index)))
        image = Image.open(path).convert("RGB")
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
