"""The pipeline families the trainer trains, one class each, and how a model folder names its family.

Invariant: `FAMILIES` (name -> class) has exactly the families of `training_config.SCRIPT_DEFAULTS`, whose
diffusers defaults they train with; a family is recognised from model_index.json alone, before any weights load.

Usage:
    family_class = family_of(model_index)            # e.g. StableDiffusionXL
    family = load_family(config, family_class)       # the pipeline loaded, wrapped in its family
"""

from __future__ import annotations

from typing import Any

from ..training_config import SCRIPT_DEFAULTS, TrainingConfig
from .base import Family, LossSettings, Noised
from .flow import Flux, StableDiffusion3
from .unet import StableDiffusion, StableDiffusionXL

FAMILIES: dict[str, type[Family]] = {family.name: family for family in (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)}
if set(FAMILIES) != set(SCRIPT_DEFAULTS):  # one list of families: a new one needs its diffusers defaults too
    raise ImportError(f"families {sorted(FAMILIES)} and SCRIPT_DEFAULTS {sorted(SCRIPT_DEFAULTS)} differ")

__all__ = ["FAMILIES", "Family", "LossSettings", "Noised", "family_of", "family_of_pipeline", "load_family", "loss_settings"]


class UnknownFamilyError(ValueError):
    """A model folder is not one of the families the trainer supports."""


def family_of(model_index: dict[str, Any]) -> type[Family]:
    """The family of a diffusers pipeline from its model_index.json: UNet + one or two CLIPs (SD, SDXL),
    transformer + three text encoders (SD3) or + two under a Flux class (Flux)."""
    present = {name for name, value in model_index.items() if isinstance(value, (list, tuple)) and value and value[0] is not None}
    class_name = str(model_index.get("_class_name", ""))
    if "unet" in present:
        return StableDiffusionXL if "text_encoder_2" in present else StableDiffusion
    if "transformer" in present and "Flux" in class_name:
        return Flux
    if "transformer" in present and "StableDiffusion3" in class_name:
        return StableDiffusion3
    raise UnknownFamilyError(f"{class_name or 'this pipeline'}: not a family the trainer supports; it trains "
                             f"{', '.join(FAMILIES)} pipelines (SD 1.x/2.x, SDXL, SD3, Flux)")


def family_of_pipeline(pipe: Any) -> type[Family]:
    """The family of a loaded pipeline (its config is its model_index)."""
    return family_of({**pipe.config, "_class_name": type(pipe).__name__.removeprefix("Shira")})


def loss_settings(config: TrainingConfig) -> LossSettings:
    """The loss flags of a config already filled with its family's defaults."""
    return LossSettings(
        resolution=config.resolution, prior_loss_weight=config.prior_loss_weight if config.with_prior_preservation else None,
        snr_gamma=config.snr_gamma, noise_offset=config.noise_offset, weighting_scheme=config.weighting_scheme or "none",
        logit_mean=config.logit_mean, logit_std=config.logit_std, mode_scale=config.mode_scale,
        precondition_outputs=bool(config.precondition_outputs), guidance_scale=config.guidance_scale,
        max_sequence_length=config.max_sequence_length or 77,
    )


def load_family(config: TrainingConfig, family: type[Family]) -> Family:
    """The run's pipeline, loaded as diffusers' scripts load its parts (an optional separate VAE; no safety
    checker), wrapped in `family`."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    from ..quiet import quiet_libraries

    kwargs: dict[str, Any] = {"revision": config.revision, "variant": config.variant}
    if config.pretrained_vae_model_name_or_path:  # e.g. SDXL's fp16-safe VAE, as diffusers' SDXL script takes it
        kwargs["vae"] = AutoencoderKL.from_pretrained(config.pretrained_vae_model_name_or_path, revision=config.revision)
    index = DiffusionPipeline.load_config(config.pretrained_model_name_or_path, revision=config.revision)
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # never used in training or validation images
    with quiet_libraries():
        pipe = DiffusionPipeline.from_pretrained(config.pretrained_model_name_or_path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return family(pipe, loss_settings(config))
