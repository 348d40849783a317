"""shira-diffusion: Sparse High Rank Adapters (SHiRA) for diffusers pipelines.

Usage:
    from shira_diffusion import ShiraStableDiffusionPipeline
    pipe = ShiraStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_shira_weights("style.safetensors", alpha=1.0)
"""

from .engine import ScatterEngine, ShiraLoadError
from .format import SHIRA_WEIGHT_NAME, ShiraAdapter, ShiraFormatError, SparseDelta
from .loaders import (
    ShiraFluxPipeline,
    ShiraLoaderMixin,
    ShiraStableDiffusion3Pipeline,
    ShiraStableDiffusionPipeline,
    ShiraStableDiffusionXLPipeline,
    add_shira_support,
)

__version__ = "0.1.0"

__all__ = [
    "SHIRA_WEIGHT_NAME",
    "ScatterEngine",
    "ShiraAdapter",
    "ShiraFluxPipeline",
    "ShiraFormatError",
    "ShiraLoadError",
    "ShiraLoaderMixin",
    "ShiraStableDiffusion3Pipeline",
    "ShiraStableDiffusionPipeline",
    "ShiraStableDiffusionXLPipeline",
    "SparseDelta",
    "add_shira_support",
]
