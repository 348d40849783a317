"""What a run leaves: validation images, the adapter file (SHiRA format, or a diffusers LoRA file for the
baseline), the model card with its sample grid, and the Hub upload.

Invariant: every file is written atomically (durable.write_atomically) by the main process only; the Hub repo is
created before training, so a missing login fails the run before it spends any time.

Usage:
    images = validation_images(config, accelerator, family, step)
    path = save_adapter(config, accelerator, family, trainables, step, repo_id)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..durable import write_atomically
from ..families import Family
from ..format import SHIRA_WEIGHT_NAME, ShiraAdapter
from ..trainables import ConfigError, Trainable
from ..training_config import TrainingConfig
from .run_masks import MASK_FILE, mask_label

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
OUTPUT_FILES = ("README.md", "samples.png", MASK_FILE, LORA_WEIGHT_NAME)  # written with durable.write_atomically


@torch.no_grad()
def validation_images(config: TrainingConfig, accelerator: Any, family: Family, step: int, seed: int) -> list:
    """Images of --validation_prompt from the live model: PNGs in output_dir/validation and TensorBoard."""
    if not accelerator.is_main_process:
        return []
    pipe = family.pipe  # holds the plain (unwrapped) modules, whose weights are the ones being trained
    models = [getattr(pipe, name) for name in family.modules]
    training = [model.training for model in models]
    for model in models:
        model.eval()  # no LoRA dropout in the images
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    try:
        with accelerator.autocast():  # the hook impl keeps an fp32 denoiser next to an fp16 VAE
            images = [pipe(config.validation_prompt, num_inference_steps=config.validation_inference_steps, generator=generator,
                           height=config.resolution, width=config.resolution).images[0] for _ in range(config.num_validation_images)]
    finally:
        for model, was_training in zip(models, training):
            model.train(was_training)
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        write_atomically(folder / f"step-{step:06d}-{index}.png", lambda temp, image=image: image.save(temp, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    return images


def save_adapter(config: TrainingConfig, accelerator: Any, family: Family, trainables: dict[str, Trainable], step: int, seed: int,
                 repo_id: str | None = None) -> Path:
    """output_dir/shira_weights.safetensors (ShiraAdapter.save) or pytorch_lora_weights.safetensors, + card."""
    output_dir = Path(config.output_dir)
    path = output_dir / (SHIRA_WEIGHT_NAME if config.adapter == "shira" else LORA_WEIGHT_NAME)
    if not accelerator.is_main_process:
        return path
    if config.adapter == "shira":
        adapter = ShiraAdapter(
            {c: t.export() for c, t in trainables.items()}, mask_type=mask_label(config.mask), base_model=config.pretrained_model_name_or_path,
            extra={"impl": config.impl, "steps": step, "instance_prompt": config.instance_prompt, "family": family.name, "seed": seed,
                   "density_requested": None if config.shira_r else config.density, "shira_r": config.shira_r,
                   "target_modules": list(config.target_modules or family.denoiser_targets), "learning_rate": config.learning_rate},
        )
        path = adapter.save(path)
    else:
        _save_lora(output_dir, path, family, trainables)
    _write_model_card(config, family, path, step, seed, sum(t.num_parameters for t in trainables.values()), repo_id=repo_id)
    return path


def _save_lora(output_dir: Path, path: Path, family: Family, trainables: dict[str, Trainable]) -> None:
    """The family pipeline's save_lora_weights, with PEFT-style keys and each component's LoraConfig as metadata:
    diffusers reloads them exactly (files written with convert_state_dict_to_diffusers lose their attention
    layers in diffusers 0.42)."""
    layers = {f"{c}_lora_layers": t.export() for c, t in trainables.items()}
    metadata = {f"{c}_lora_adapter_metadata": t.config_dict() for c, t in trainables.items()}
    staging = output_dir / ".lora.tmp"  # diffusers writes in place: write into a folder beside, then move it over
    shutil.rmtree(staging, ignore_errors=True)
    try:
        type(family.pipe).save_lora_weights(staging, **layers, **metadata)
        write_atomically(path, lambda temp: os.replace(staging / LORA_WEIGHT_NAME, temp))  # synced, then renamed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def create_hub_repo(config: TrainingConfig, output_dir: Path) -> str:
    """Create (or reach) the --push_to_hub repo before training, as diffusers' scripts do, so that being
    offline or logged out is an error now rather than after the whole run. Returns the repo id."""
    import huggingface_hub

    repo = config.hub_model_id or output_dir.resolve().name
    try:
        return huggingface_hub.HfApi(token=config.hub_token).create_repo(repo, exist_ok=True).repo_id
    except Exception as error:  # noqa: BLE001 -- offline mode, no token, HTTP 401/403, no network: each stops the run
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(f"--push_to_hub: cannot create or reach the Hub repo {repo!r} ({type(error).__name__}: {reason}); "
                          "log in with `hf auth login`, check --hub_model_id, or drop --push_to_hub") from None


def push_to_hub(config: TrainingConfig, output_dir: Path, repo_id: str) -> str:
    """Upload the run's folder (adapter, model card, samples, validation images, logs; not the checkpoints or
    the mask file) to the repo made by `create_hub_repo`, as diffusers' scripts do."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=config.hub_token)
    try:
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="End of training",
                                     ignore_patterns=["checkpoint-*", MASK_FILE]))
    except Exception as error:  # noqa: BLE001 -- the adapter is saved: say where, and how to upload it later
        raise ConfigError(f"--push_to_hub: the upload to {repo_id} failed ({type(error).__name__}: {error}); the run is saved in "
                          f"{output_dir}, upload it with `hf upload {repo_id} {output_dir}`") from None


def _write_samples_grid(config: TrainingConfig, output_dir: Path, step: int) -> list:
    """output_dir/samples.png: the last validation round's images (step `step`) in one grid (grids.image_grid, so
    never above PIL's pixel limit); returns them as the card's gallery (cards.Sample), [] when there are none."""
    from PIL import Image

    from ..cards import Sample
    from ..grids import image_grid

    paths = sorted((output_dir / "validation").glob(f"step-{step:06d}-*.png"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not paths:
        return []
    tiles = []
    for path in paths:
        with Image.open(path) as image:
            tiles.append(image.convert("RGB"))
    grid = image_grid(tiles)
    write_atomically(output_dir / "samples.png", lambda temp: grid.save(temp, format="PNG"))
    return [Sample(config.validation_prompt, f"validation/{path.name}") for path in paths]


def _write_model_card(config: TrainingConfig, family: Family, adapter_path: Path, step: int, seed: int, parameters: int,
                      repo_id: str | None = None) -> None:
    """output_dir/README.md (cards.adapter_card) and samples.png. The usage block loads the adapter from `repo_id`
    (the Hub repo --push_to_hub made), else --hub_model_id when it names the owner, else from output_dir."""
    from ..cards import adapter_card

    output_dir = Path(config.output_dir)
    samples = _write_samples_grid(config, output_dir, step)
    if repo_id is None and config.push_to_hub and config.hub_model_id and "/" in config.hub_model_id:
        repo_id = config.hub_model_id  # without an owner, only the Hub knows the full id ("<user>/name")
    targets = ", ".join(config.target_modules or family.denoiser_targets) + (" + all Conv2d" if config.target_conv else "")
    if config.adapter == "shira":
        budget = f"r={config.shira_r} budget" if config.shira_r else f"density {config.density}"
        kind = f"SHiRA ({mask_label(config.mask)} mask, {budget}, {config.impl} impl)"
        summary = (f"A {kind} style adapter trained with shira-diffusion: {parameters:,} trainable parameters. The file is "
                   "shira-diffusion's SHiRA format and loads with its `load_shira_weights` (below).")
    else:
        kind = f"LoRA (rank {config.rank})"
        summary = (f"A {kind} style adapter, the baseline shira-diffusion trains in the same loop and settings as SHiRA: "
                   f"{parameters:,} trainable parameters. The file is a plain diffusers LoRA file: diffusers' "
                   "`load_lora_weights` loads it (below).")
    text = f" + {', '.join(family.text_encoders)} {', '.join(family.text_encoder_targets)}" if config.train_text_encoder else ""
    details = [
        f"adapter: {kind}, {parameters:,} trainable parameters",
        f"targets: {family.denoiser} {targets}{text}",
        f"steps: {step}, learning rate {config.learning_rate} ({config.lr_scheduler}, {config.optimizer}), batch {config.train_batch_size} x "
        f"{config.gradient_accumulation_steps} accumulation, resolution {config.resolution}, seed {seed}",
        f"captions: {'instance prompt `' + config.instance_prompt + '` where an image has none' if config.instance_prompt else 'per image'}",
    ]
    card = adapter_card(
        config.adapter, weight_name=adapter_path.name, load_from=repo_id or str(output_dir.resolve()),
        base_model=config.pretrained_model_name_or_path, title=f"{kind} style adapter", summary=summary, details=details,
        license=config.license, instance_prompt=config.instance_prompt, samples=samples, grid="samples.png" if samples else None,
        local=repo_id is None,
    )
    write_atomically(output_dir / "README.md", lambda temp: card.save(temp))
