"""Embedded tiny diffusers pipelines, built offline from configs shipped in the package.

Real SD 1.5 / SDXL / SD3 / Flux weights are never needed to exercise the code paths: these pipelines have
the same component layout (UNet or transformer with attention + feed-forward linears and convs, VAE,
CLIP/T5 text encoders, a real CLIPTokenizer over a tiny shipped vocabulary) with random weights drawn
from a seed. They build in about a second on a CPU and can be saved with `save_pretrained` to give the
CLIs a model path.

Usage:
    from shira_diffusion.testing import tiny_pipeline
    pipe = tiny_pipeline("sdxl")
    image = pipe("a red fox", num_inference_steps=2).images[0]
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import diffusers
import torch
import transformers

KINDS = ("sd", "sdxl", "sd3", "flux")
# kind -> (pipeline class name in shira_diffusion.loaders, tokenizer slots)
_PIPELINES = {
    "sd": ("ShiraStableDiffusionPipeline", ("tokenizer",)),
    "sdxl": ("ShiraStableDiffusionXLPipeline", ("tokenizer", "tokenizer_2")),
    "sd3": ("ShiraStableDiffusion3Pipeline", ("tokenizer", "tokenizer_2", "tokenizer_3")),
    "flux": ("ShiraFluxPipeline", ("tokenizer", "tokenizer_2")),
}
_EXTRA = {"sd": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}}


def _config(kind: str, component: str) -> dict[str, Any]:
    text = resources.files("shira_diffusion").joinpath(f"_tiny/{kind}/{component}.json").read_text()
    return json.loads(text)


def _components_of(kind: str) -> list[str]:
    folder = resources.files("shira_diffusion").joinpath(f"_tiny/{kind}")
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def tiny_tokenizer() -> transformers.CLIPTokenizer:
    """A real CLIPTokenizer over the package's tiny byte-level vocabulary (619 tokens, max length 77)."""
    with resources.as_file(resources.files("shira_diffusion").joinpath("_tiny/tokenizer")) as folder:
        return transformers.CLIPTokenizer.from_pretrained(str(folder))


def _build(config: dict[str, Any]) -> Any:
    config = dict(config)
    class_name = config.pop("_class_name")
    if hasattr(diffusers, class_name) and "Scheduler" in class_name:
        return getattr(diffusers, class_name).from_config(config)
    if hasattr(diffusers, class_name):
        return getattr(diffusers, class_name).from_config(config).eval()
    model_class = getattr(transformers, class_name)
    return model_class(model_class.config_class(**config)).eval()


def tiny_components(kind: str = "sd", seed: int = 0) -> dict[str, Any]:
    """Components of the tiny pipeline of `kind`; the same seed gives bit-identical weights.

    Usage: components = tiny_components("sd", seed=1); pipe = StableDiffusionPipeline(**components)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of {list(KINDS)}")
    components: dict[str, Any] = {}
    for index, name in enumerate(_components_of(kind)):
        torch.manual_seed(seed * 1000 + index)  # each module drawn from its own seed: adding one moves no other
        components[name] = _build(_config(kind, name))
    for slot in _PIPELINES[kind][1]:
        components[slot] = tiny_tokenizer()
    components.update(_EXTRA.get(kind, {}))
    return components


def tiny_pipeline(kind: str = "sd", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A deterministic tiny Shira pipeline of `kind` ("sd", "sdxl", "sd3" or "flux") on the CPU.

    Usage: pipe = tiny_pipeline("sd"); pipe.load_shira_weights(adapter)
    """
    from . import loaders  # the pipeline classes; imported here so `testing` stays light to import

    components = tiny_components(kind, seed)
    pipe = getattr(loaders, _PIPELINES[kind][0])(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
