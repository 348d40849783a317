"""How well a pipeline denoises a folder's images: the training loss at fixed noise and timesteps, to compare
adapters (or none, or a fusion) fairly.

Invariant: the same images, noise and timesteps for every call with the same seed, and the same loss the trainer
minimises (`Family.loss`), so a lower value means the model reconstructs that style better.

Usage: denoising_loss(pipe, "heldout/", resolution=512)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import DataSource, StyleDataset, collate, load_examples
from ..families import LossSettings, family_of_pipeline


@torch.no_grad()
def denoising_loss(pipe: Any, data_dir: str | Path, resolution: int, seed: int = 0, instance_prompt: str | None = None,
                   timesteps: tuple[int, ...] = (100, 300, 500, 700, 900), max_sequence_length: int = 77) -> float:
    """Mean training loss of `pipe` on a folder's images, over `timesteps` (DDPM timesteps; for flow-matching
    families the training schedule's nearest), with fixed noise and the latents' means (no sampling)."""
    examples = load_examples(DataSource(train_data_dir=str(data_dir), instance_prompt=instance_prompt))
    dataset = StyleDataset(examples, resolution, center_crop=True, random_flip=False, seed=seed)
    batch = collate([dataset[i] for i in range(len(dataset))])
    family = family_of_pipeline(pipe)(pipe, LossSettings(resolution=resolution, max_sequence_length=max_sequence_length))
    generator = torch.Generator().manual_seed(seed)
    losses = [family.loss(batch, generator, timesteps=torch.full((len(dataset),), step)).item() for step in timesteps]
    return sum(losses) / len(losses)
