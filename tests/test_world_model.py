"""The shipped world model and what adapters do to its images, as the judge sees them (the product, not only
the arithmetic): the base draws the prompted content and no style on plain prompts; a short SHiRA run of the
world recipe puts its style into images of the same prompts; alpha 0 is the base, alpha 0.5 is less style
than alpha 1; the LoRA baseline learns too."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from shira_diffusion import world
from shira_diffusion.training import train
from shira_diffusion.world.adapters import training_config
from shira_diffusion.world.evaluate import generate, measure, style_prompts

SEEDS = range(2)
STEPS = 150  # a short run of the world recipe (250 steps)


@pytest.fixture(scope="module")
def pipe():
    return world.pipeline()


@pytest.fixture(scope="module")
def judge():
    return world.Judge.load()


@pytest.fixture(scope="module")
def blue_fire(tmp_path_factory):
    return world.write_style_dataset(tmp_path_factory.mktemp("data") / "blue_fire", "blue fire")


@pytest.fixture(scope="module")
def trained(blue_fire, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    return {method: train(training_config("blue fire", blue_fire, out / method, method, max_train_steps=STEPS)).adapter_path for method in ("shira", "lora")}


def test_the_model_loads_with_plain_diffusers_in_sd15_layout():
    pipe = StableDiffusionPipeline.from_pretrained(str(world.model_dir()), safety_checker=None)
    names = {name.rsplit(".", 1)[-1] for name, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v", "0", "proj", "2"} <= names and type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and pipe.tokenizer.tokenize("triangle") == ["triangle</w>"]
    image = pipe("a red circle on a gray background", num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (world.RESOLUTION, world.RESOLUTION)


def test_base_model_draws_the_prompted_content_and_no_style(pipe, judge):
    prompts = [world.Scene(*c).caption for c in world.combinations("train")[::6]]
    summary = measure(pipe, judge, prompts, SEEDS)
    assert summary["shape_accuracy"] >= 0.9 and summary["colour_accuracy"] >= 0.9 and summary["background_accuracy"] >= 0.9
    assert all(values["mean"] < 0.15 for values in summary["styles"].values())


def _fire(pipe, judge, seeds=SEEDS) -> float:
    return measure(pipe, judge, style_prompts("blue fire", seen=True), seeds)["styles"]["blue fire"]["mean"]


def test_a_short_shira_run_learns_the_style_and_alpha_scales_it(pipe, judge, trained):
    base = _fire(pipe, judge)  # the same prompts: the trigger's word "blue" alone tints some base images
    pipe.load_shira_weights(trained["shira"], adapter_name="fire")
    try:
        full = _fire(pipe, judge)
        pipe.set_shira_adapters("fire", 0.5)
        half = _fire(pipe, judge)
        pipe.set_shira_adapters("fire", 0.0)
        zero = generate(pipe, style_prompts("blue fire")[:3], [0])
    finally:
        pipe.unload_shira_weights()
    assert full > base + 0.15, (base, full)
    assert base < half < full, (base, half, full)
    plain = generate(pipe, style_prompts("blue fire")[:3], [0])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(zero, plain))


def test_the_lora_baseline_learns_the_style_too(pipe, judge, trained):
    base = _fire(pipe, judge)
    pipe.load_lora_weights(str(trained["lora"].parent), adapter_name="fire_lora")
    try:
        learned = _fire(pipe, judge)
    finally:
        pipe.unload_lora_weights()
    assert learned > base + 0.15, (base, learned)
