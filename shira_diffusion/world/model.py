"""The world model: a Stable Diffusion 1.5-layout text-to-image pipeline trained on the shapes world.

Components are the diffusers / transformers classes SD 1.5 uses, at toy size: `UNet2DConditionModel`
(cross-attention down/up blocks with to_q / to_k / to_v / to_out.0 and ff.net.0.proj / ff.net.2),
`AutoencoderKL` (one downsampling: 32 px images, 4 x 16 x 16 latents), `CLIPTextModel` with the world
tokenizer, and a DDIM scheduler with SD's scaled-linear betas. The trained weights ship in the package
(`MODEL_DIR`, the folder `save_pretrained` writes), so `StableDiffusionPipeline.from_pretrained(MODEL_DIR)`
loads it offline; `pipeline()` is the one-call form with the SHiRA verbs attached.
`shira_diffusion/world/train_base.py` trained it; the configs below are its single source.

Usage:
    from shira_diffusion import world
    pipe = world.pipeline()
    image = pipe("a red circle on a gray background", num_inference_steps=25).images[0]
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

RESOLUTION = 32  # image side in pixels; latents are RESOLUTION // 2
GUIDANCE_SCALE = 5.0  # what the README's accuracy was measured with
INFERENCE_STEPS = 25

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=16, sample_size=RESOLUTION,
)
TEXT_CONFIG = dict(
    hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, projection_dim=96,
    hidden_act="quick_gelu",
)
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_CONFIG["hidden_size"], attention_head_dim=4, norm_num_groups=16,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def model_dir() -> Path:
    """The shipped pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    return Path(str(resources.files("shira_diffusion").joinpath("world/weights")))


def pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", folder: str | Path | None = None):
    """The trained world model (or another export of it in `folder`) as a ShiraStableDiffusionPipeline with
    progress bars off. Offline.

    Usage: pipe = pipeline(); pipe.load_shira_weights("blue_fire/shira_weights.safetensors")
    """
    from ..loaders import ShiraStableDiffusionPipeline

    folder = Path(folder) if folder is not None else model_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: the world model's weights are missing from this installation (no model_index.json)")
    pipe = ShiraStableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        return pipe  # as loaded (diffusers warns on every cast, even a no-op one)
    return pipe.to(device, dtype)  # cast after loading: from_pretrained's dtype keyword changed name across diffusers versions
