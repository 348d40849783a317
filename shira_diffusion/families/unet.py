"""UNet families trained with DDPM noise prediction: SD 1.x/2.x and SDXL, as diffusers' train_dreambooth_lora.py
and train_dreambooth_lora_sdxl.py train them (epsilon or v target, optional Min-SNR weighting and noise offset;
SDXL's two CLIP encoders and size / crop micro-conditioning).

Invariant: the random draws of one training loss come from the run's generator in a fixed order (latent sample,
noise, noise offset, timesteps), so a resumed run draws what an uninterrupted one draws.

Usage: family = StableDiffusion(pipe, LossSettings(resolution=512)); loss = family.loss(batch, generator)
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Family, Noised


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Normal noise drawn on the generator's device (the same numbers whatever device the model is on)."""
    return torch.randn(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


class StableDiffusion(Family):
    name = "sd"
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    denoiser_targets = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    weights_prior_term = False  # Min-SNR weights the instance term only, as diffusers' scripts

    @staticmethod
    def training_scheduler(config: Any) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(config)

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text encoder's last hidden state."""
        return {"encoder_hidden_states": self.modules["text_encoder"](self.tokenize(self.pipe.tokenizer, captions))[0]}

    def noised(self, latents: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None) -> Noised:
        scheduler, settings = self.train_scheduler, self.settings
        noise = _randn(tuple(latents.shape), generator, latents)
        training = timesteps is None
        if training and settings.noise_offset:
            noise = noise + settings.noise_offset * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents)
        if training:
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=generator.device)
        timesteps = timesteps.to(latents.device)
        velocity = scheduler.config.prediction_type == "v_prediction"
        target = scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
        weights = self._min_snr_weights(timesteps, velocity) if training and settings.snr_gamma is not None else None
        return Noised(scheduler.add_noise(latents, noise, timesteps), timesteps, target, weights)

    def _min_snr_weights(self, timesteps: torch.Tensor, velocity: bool) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023), as diffusers' scripts compute them."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.train_scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.settings.snr_gamma)
        return clipped / (snr + 1) if velocity else clipped / snr

    def predict(self, noised: Noised, conditioning: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        return self.modules["unet"](noised.model_input, noised.timesteps, **conditioning).sample


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    text_encoders = ("text_encoder", "text_encoder_2")
    denoiser_targets = ("to_k", "to_q", "to_v", "to_out.0")

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Both encoders' penultimate hidden states, concatenated, and the second one's pooled projection."""
        hidden, pooled = [], None
        for name, tokenizer in (("text_encoder", self.pipe.tokenizer), ("text_encoder_2", self.pipe.tokenizer_2)):
            output = self.modules[name](self.tokenize(tokenizer, captions), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def predict(self, noised: Noised, conditioning: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """With SDXL's micro-conditioning: original size, crop top-left, target size of each image."""
        size = self.settings.resolution
        time_ids = [list(original) + list(crop) + [size, size] for original, crop in zip(batch["original_sizes"], batch["crops_top_left"])]
        hidden = conditioning["encoder_hidden_states"]
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": torch.tensor(time_ids, device=hidden.device, dtype=hidden.dtype)}
        return self.modules["unet"](noised.model_input, noised.timesteps, hidden, added_cond_kwargs=added).sample
