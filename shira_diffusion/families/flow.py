"""Transformer families trained with flow matching: SD3 and Flux, as diffusers' train_dreambooth_lora_sd3.py and
train_dreambooth_lora_flux.py train them. Timesteps are drawn with `compute_density_for_timestep_sampling` and
losses weighted with `compute_loss_weighting_for_sd3` (diffusers.training_utils); the input is
(1 - σ)·x + σ·noise and the target noise - x (SD3 with --precondition_outputs: x, from the preconditioned
prediction). Flux packs latents into 2x2 patches, gives position ids and, for guidance-distilled models, the
guidance scale.

Invariant: as unet.py, the random draws come from the run's generator in a fixed order (latent sample, noise,
timesteps).

Usage: family = Flux(pipe, LossSettings(resolution=512, max_sequence_length=512)); loss = family.loss(batch, generator)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Family, Noised
from .unet import _randn


class FlowMatching(Family):
    """What SD3 and Flux share: the flow-matching noising and its loss weights."""

    denoiser = "transformer"

    @staticmethod
    def training_scheduler(config: Any) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def noised(self, latents: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None) -> Noised:
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        scheduler, settings = self.train_scheduler, self.settings
        noise = _randn(tuple(latents.shape), generator, latents)
        if timesteps is None:
            u = compute_density_for_timestep_sampling(settings.weighting_scheme, latents.shape[0], settings.logit_mean, settings.logit_std,
                                                      settings.mode_scale, device=generator.device, generator=generator)
            indices = (u * scheduler.config.num_train_timesteps).long().cpu()
        else:  # the schedule's timesteps nearest the requested ones
            indices = (scheduler.timesteps[None, :] - timesteps.cpu().float()[:, None]).abs().argmin(dim=1)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        model_input = (1.0 - sigmas) * latents + sigmas * noise
        weights = compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas).flatten().float()
        return Noised(model_input, scheduler.timesteps[indices].to(latents.device), noise - latents, weights, sigmas)


class StableDiffusion3(FlowMatching):
    name = "sd3"
    text_encoders = ("text_encoder", "text_encoder_2")  # the two CLIPs; T5 stays frozen, as diffusers' script
    denoiser_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Both CLIPs' penultimate hidden states (concatenated, zero-padded to T5's width) followed by T5's
        tokens; the pooled projections of both CLIPs, concatenated."""
        hidden, pooled = [], []
        for name, tokenizer in (("text_encoder", self.pipe.tokenizer), ("text_encoder_2", self.pipe.tokenizer_2)):
            output = self.modules[name](self.tokenize(tokenizer, captions), output_hidden_states=True)
            pooled.append(output[0])
            hidden.append(output.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        length = self.settings.max_sequence_length
        if "text_encoder_3" in self.modules:
            t5 = self.modules["text_encoder_3"](self.tokenize(self.pipe.tokenizer_3, captions, length))[0]
        else:  # a pipeline saved without T5: zeros, as StableDiffusion3Pipeline does
            width = self.pipe.transformer.config.joint_attention_dim
            t5 = torch.zeros(len(captions), length, width, device=clip.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)}

    def noised(self, latents: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None) -> Noised:
        noised = super().noised(latents, generator, timesteps)
        if self.settings.precondition_outputs:  # the prediction becomes x (EDM preconditioning), so is the target
            noised.target = latents
        return noised

    def predict(self, noised: Noised, conditioning: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        prediction = self.modules["transformer"](hidden_states=noised.model_input, timestep=noised.timesteps, return_dict=False, **conditioning)[0]
        if self.settings.precondition_outputs:
            prediction = prediction * (-noised.sigmas) + noised.model_input
        return prediction


class Flux(FlowMatching):
    name = "flux"
    text_encoders = ("text_encoder",)  # the CLIP; T5 stays frozen, as diffusers' script
    denoiser_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """CLIP's pooled output, T5's tokens and their (zero) position ids."""
        pooled = self.modules["text_encoder"](self.tokenize(self.pipe.tokenizer, captions), output_hidden_states=False).pooler_output
        t5 = self.modules["text_encoder_2"](self.tokenize(self.pipe.tokenizer_2, captions, self.settings.max_sequence_length))[0]
        text_ids = torch.zeros(t5.shape[1], 3, device=t5.device, dtype=t5.dtype)
        return {"pooled_projections": pooled, "encoder_hidden_states": t5, "txt_ids": text_ids}

    def predict(self, noised: Noised, conditioning: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """Packed 2x2 latent patches in, unpacked prediction out (as FluxPipeline's own helpers do)."""
        from diffusers import FluxPipeline

        x = noised.model_input
        batch_size, channels, height, width = x.shape
        packed = FluxPipeline._pack_latents(x, batch_size, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, x.device, x.dtype)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((batch_size,), self.settings.guidance_scale, device=x.device)
        prediction = self.modules["transformer"](hidden_states=packed, timestep=noised.timesteps / 1000, guidance=guidance, img_ids=image_ids,
                                                 return_dict=False, **conditioning)[0]
        scale = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(prediction, height * scale, width * scale, scale)
