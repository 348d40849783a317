"""shira-diffusion: Sparse High Rank Adapters (SHiRA) for diffusers pipelines.

Usage:
    from shira_diffusion import ShiraStableDiffusionPipeline
    pipe = ShiraStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_shira_weights("style.safetensors", alpha=1.0)
"""

import importlib
from typing import TYPE_CHECKING

# Names resolve on first use (PEP 562): `shira-diffusion --help` and other light imports of the package must not
# pay for importing torch and diffusers.
_EXPORTS = {
    "ScatterEngine": "engine", "ShiraLoadError": "engine",
    "SHIRA_WEIGHT_NAME": "format", "ShiraAdapter": "format", "ShiraFormatError": "format", "SparseDelta": "format",
    "ShiraFluxPipeline": "loaders", "ShiraLoaderMixin": "loaders", "ShiraStableDiffusion3Pipeline": "loaders",
    "ShiraStableDiffusionPipeline": "loaders", "ShiraStableDiffusionXLPipeline": "loaders", "add_shira_support": "loaders",
}

if TYPE_CHECKING:
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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [  # = sorted(_EXPORTS)
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
