"""What every pipeline family gives the trainer, and the one diffusion loss built on it.

A `Family` wraps a loaded diffusers pipeline. It knows which component is the denoiser (UNet or transformer),
which text encoders diffusers' DreamBooth script for the family trains, their default target modules, how
captions become conditioning, and how a clean latent becomes a noisy input, a target and a per-example loss
weight. `Family.loss` is the only loss: training, mask calibration and `training.denoising_loss` all call it.

Invariant: the family reads its models through `self.modules` (name -> module), which the trainer points at
the accelerate-prepared (DDP / FSDP wrapped) modules, so gradients flow through the wrappers; the pipeline
keeps the plain modules, which share their weights, for validation images.

Usage:
    family = load_family(config)                     # families/__init__.py
    loss = family.loss(batch, generator)             # batch from data.collate
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class LossSettings:
    """The loss flags of one run (diffusers' names). `prior_loss_weight` is None without prior preservation,
    when the batch is not split into instance and class halves."""

    resolution: int
    prior_loss_weight: float | None = None
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True
    guidance_scale: float = 3.5
    max_sequence_length: int = 512


@dataclass
class Noised:
    """One noising of a batch of latents: the model input, its timesteps, what the model should predict and
    each example's loss weight (None: all 1); flow matching also keeps the noise levels σ."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None


class Family:
    """One pipeline family. Subclasses set the class attributes and implement `encode_prompts`, `noised`,
    `predict`; `loss` is shared."""

    name: ClassVar[str]
    denoiser: ClassVar[str]  # the pipeline component that is trained: "unet" or "transformer"
    text_encoders: ClassVar[tuple[str, ...]]  # what --train_text_encoder adapts, as diffusers' script for the family
    denoiser_targets: ClassVar[tuple[str, ...]]  # default --target_modules, as diffusers' script's LoRA targets
    text_encoder_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    weights_prior_term: ClassVar[bool] = True  # whether per-example loss weights also weight the prior half

    def __init__(self, pipe: Any, settings: LossSettings):
        self.pipe, self.settings = pipe, settings
        self.modules: dict[str, nn.Module] = {name: getattr(pipe, name) for name in (self.denoiser, *self.all_text_encoders)}
        # A scheduler of the training schedule, never stepped: validation's set_timesteps changes the pipeline's own.
        self.train_scheduler = self.training_scheduler(pipe.scheduler.config)
        self.text_grad = False  # set by the trainer when text encoders are trained

    # ---- what a subclass provides ---------------------------------------------------------------------------
    @property
    def all_text_encoders(self) -> tuple[str, ...]:
        """Every text encoder the pipeline has (trained or not)."""
        return tuple(name for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(self.pipe, name, None) is not None)

    @staticmethod
    def training_scheduler(config: Any) -> Any:
        raise NotImplementedError

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning keyword arguments of the denoiser for `captions`."""
        raise NotImplementedError

    def noised(self, latents: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None) -> Noised:
        """Noise `latents` at random timesteps (or the given ones) the way the family trains."""
        raise NotImplementedError

    def predict(self, noised: Noised, conditioning: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """The denoiser's prediction for `noised`, in the shape of `noised.target`."""
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pipe.vae.device

    def latents(self, pixels: torch.Tensor, generator: torch.Generator | None, sample: bool = True) -> torch.Tensor:
        """VAE latents of `pixels`, shifted and scaled as the denoiser sees them, in the denoiser's dtype."""
        vae = self.pipe.vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
            latents = posterior.sample(generator=generator) if sample else posterior.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.denoiser_dtype)

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return getattr(self.pipe, self.denoiser).dtype

    def loss(self, batch: dict, generator: torch.Generator, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The DreamBooth loss of one batch: the weighted mean squared error of the family's prediction, plus
        `prior_loss_weight` times the class half's when prior preservation split the batch."""
        latents = self.latents(batch["pixel_values"], generator, sample=timesteps is None)
        noised = self.noised(latents, generator, timesteps)
        with torch.set_grad_enabled(self.text_grad and torch.is_grad_enabled()):
            conditioning = self.encode_prompts(batch["captions"])
        prediction = self.predict(noised, conditioning, batch)
        per_example = (prediction.float() - noised.target.float()).pow(2).flatten(1).mean(1)
        weights = noised.weights if noised.weights is not None else torch.ones_like(per_example)
        if self.settings.prior_loss_weight is None:
            return (per_example * weights).mean()
        instance, prior = per_example.chunk(2)
        instance_weights, prior_weights = weights.chunk(2)
        prior_weights = prior_weights if self.weights_prior_term else torch.ones_like(prior_weights)
        return (instance * instance_weights).mean() + self.settings.prior_loss_weight * (prior * prior_weights).mean()

    def tokenize(self, tokenizer: Any, captions: list[str], max_length: int | None = None) -> torch.Tensor:
        """Token ids padded / truncated to `max_length` (default: the tokenizer's), on the family's device."""
        length = max_length or tokenizer.model_max_length
        ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)
