"""The embedded tiny pipelines: deterministic, runnable, savable as plain diffusers pipelines."""

import diffusers
import numpy as np
import pytest
import torch

from shira_diffusion.testing import KINDS, tiny_components, tiny_pipeline, tiny_tokenizer


def run(pipe, kind, seed=0):
    size = {"height": 32, "width": 32} if kind in ("sd3", "flux") else {}
    return pipe("a red fox", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed), **size).images


@pytest.mark.parametrize("kind", KINDS)
def test_kinds_are_deterministic_and_run(kind):
    first, second, other = tiny_pipeline(kind), tiny_pipeline(kind), tiny_pipeline(kind, seed=1)
    denoiser = "unet" if kind in ("sd", "sdxl") else "transformer"
    a, b, c = (getattr(p, denoiser).state_dict() for p in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    images = run(first, kind)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert np.array_equal(images, run(second, kind))


@pytest.mark.parametrize("kind, base", [("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")])
def test_saved_tiny_pipeline_loads_with_plain_diffusers(tmp_path, kind, base):
    pipe = tiny_pipeline(kind)
    pipe.save_pretrained(tmp_path)
    for loader in (getattr(diffusers, base), diffusers.DiffusionPipeline):
        reloaded = loader.from_pretrained(tmp_path)
        assert type(reloaded).__name__ == base
        saved, original = reloaded.unet.state_dict(), pipe.unet.state_dict()
        assert all(torch.equal(saved[k], original[k]) for k in original)


def test_tokenizer_is_a_real_clip_tokenizer_that_truncates():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("a red fox, blue fire style").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) < 20
    long = tokenizer("fox " * 200, truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert len(long) == 77


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown tiny pipeline kind 'sd4'; choose one of \['sd', 'sdxl', 'sd3', 'flux'\]"):
        tiny_components("sd4")
