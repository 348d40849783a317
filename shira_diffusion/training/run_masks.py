"""The SHiRA positions of a run: built once (scored on the training data for gradient masks) and stored in
output_dir/masks.safetensors, so a resumed run trains exactly the same positions.

Invariant: a stored mask file is reused only when its settings (mask, density, r, seed) are this run's; it is
written atomically by the main process.

Usage: positions = load_or_build_masks(config, seed, targets, output_dir, dataloader, family, accelerator)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..durable import write_atomically
from ..families import Family
from ..masks import Mask, build_masks, needs_gradients
from ..trainables import ConfigError
from ..training_config import TrainingConfig

MASK_FILE = "masks.safetensors"


def mask_label(mask: Any) -> str:
    """The mask's name, or 'custom:<name>' for a Mask or mask function passed from Python."""
    if isinstance(mask, Mask):
        return f"custom:{mask.name}"
    return mask if isinstance(mask, str) else f"custom:{getattr(mask, '__module__', '?')}.{getattr(mask, '__qualname__', type(mask).__name__)}"


def load_or_build_masks(config: TrainingConfig, seed: int, targets: dict[str, dict[str, torch.nn.Module]], output_dir: Path,
                        dataloader: Any, family: Family, accelerator: Any) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module name: positions}}; reused from output_dir/masks.safetensors when resuming."""
    from safetensors.torch import save_file

    mask_file = output_dir / MASK_FILE
    settings = {"mask": mask_label(config.mask), "density": str(config.density), "shira_r": str(config.shira_r), "seed": str(seed)}
    if config.resume_from_checkpoint and mask_file.is_file():
        return _stored_masks(mask_file, settings, targets)
    gradients = calibration_gradients(config, seed, targets, dataloader, family, accelerator) if needs_gradients(config.mask) else {}
    masks = {}
    for component, modules in targets.items():
        weights = {name: module.weight for name, module in modules.items()}
        masks[component] = build_masks(weights, config.mask, density=config.density, r=config.shira_r, seed=seed, gradients=gradients.get(component))
        gradients.pop(component, None)  # free this component's |grad| sums before the next one's masks
    if accelerator.is_main_process:
        tensors = {f"{c}::{n}": p.contiguous() for c in masks for n, p in masks[c].items()}
        write_atomically(mask_file, lambda temp: save_file(tensors, temp, metadata=settings))
    return masks


def _stored_masks(mask_file: Path, settings: dict[str, str], targets: dict) -> dict[str, dict[str, torch.Tensor]]:
    try:
        handle = safe_open(str(mask_file), "pt")
    except (SafetensorError, OSError) as error:  # e.g. cut short by an older version killed while writing it
        raise ConfigError(f"{mask_file}: unreadable mask file ({error}); delete it and the checkpoint-N folders to start over") from None
    with handle:
        stored = handle.metadata() or {}
        different = [k for k, v in settings.items() if stored.get(k, v) != v]
        if different:
            raise ConfigError(f"{mask_file}: made with --{different[0]} {stored[different[0]]}, this run has {settings[different[0]]}")
        keys = set(handle.keys())
        missing = [f"{c}::{n}" for c in targets for n in targets[c] if f"{c}::{n}" not in keys]
        if missing:
            raise ConfigError(f"{mask_file}: no mask for {missing[0]} (different --target_modules?)")
        return {c: {n: handle.get_tensor(f"{c}::{n}") for n in targets[c]} for c in targets}


def calibration_gradients(config: TrainingConfig, seed: int, targets: dict[str, dict[str, torch.nn.Module]], dataloader: Any,
                          family: Family, accelerator: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Accumulated |dL/dW| per target weight over `calibration_batches` batches of the training data, on the
    base model, with the training loss. Each weight's gradient is folded into its fp32 accumulator as soon as
    it is complete and then dropped, so besides the accumulators at most the gradients of one backward's
    in-flight layers exist."""
    sums = {c: {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in mods.items()} for c, mods in targets.items()}
    handles = []
    for c, mods in targets.items():
        for n, module in mods.items():
            module.weight.requires_grad_(True)
            handles.append(module.weight.register_post_accumulate_grad_hook(_folder(sums[c][n])))
    generator = torch.Generator(device=accelerator.device).manual_seed(seed + 2)
    # fp16 gradients of a loss ~0.1 underflow; top-k only needs the ranking, so a constant scale is free.
    scale = 256.0 if any(m.weight.dtype == torch.float16 for mods in targets.values() for m in mods.values()) else 1.0
    text_grad, family.text_grad = family.text_grad, any(component != family.denoiser for component in targets)
    try:
        with accelerator.autocast():
            for index, batch in enumerate(dataloader):
                if index >= config.calibration_batches:
                    break
                (family.loss(batch, generator) * scale).backward()
    finally:
        family.text_grad = text_grad
        for handle in handles:
            handle.remove()
        for mods in targets.values():
            for module in mods.values():
                module.weight.requires_grad_(False)
    return sums


def _folder(accumulator: torch.Tensor):
    """A post-accumulate-grad hook adding |grad| into `accumulator` and dropping the gradient."""
    def fold(parameter: torch.Tensor) -> None:
        accumulator.add_(parameter.grad.abs())
        parameter.grad = None

    return fold
