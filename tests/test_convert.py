"""LoRA -> SHiRA conversion and extraction from full fine-tunes."""

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from shira_diffusion import ShiraAdapter
from shira_diffusion.cli import main
from shira_diffusion.convert import extract_shira, lora_to_shira
from shira_diffusion.testing import tiny_pipeline

from .helpers import random_adapter


def images(pipe):
    return pipe("a fox", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA on the tiny UNet (attention linears and 1x1 conv proj_in) and text encoder, alpha != rank."""
    folder = tmp_path_factory.mktemp("lora")
    pipe = tiny_pipeline("sd")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_out.0", "proj_in"], init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "out_proj"], init_lora_weights=False))
    unet, text = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet, text_encoder_lora_layers=text,
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    kohya = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in text.items()}})
    for key in kohya:  # Kohya keeps alpha per module
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(4.0 if key.startswith("lora_unet") else 2.0)
    save_file(kohya, str(folder / "kohya.safetensors"))
    return folder


def test_full_density_conversion_reproduces_fuse_lora(lora):
    fused = tiny_pipeline("sd")
    fused.load_lora_weights(str(lora))
    fused.fuse_lora()
    adapter, report = lora_to_shira(lora / "pytorch_lora_weights.safetensors", density=1.0)
    assert adapter.components == ["text_encoder", "unet"] and report.overall == 0.0
    ours = tiny_pipeline("sd")
    base = images(ours)
    ours.load_shira_weights(adapter)
    assert np.abs(images(ours) - images(fused)).max() < 1e-5
    assert np.abs(images(ours) - base).max() > 1e-2
    for component in ("unet", "text_encoder"):
        for name, parameter in getattr(ours, component).named_parameters():
            assert torch.allclose(parameter, getattr(fused, component).get_parameter(name), atol=1e-6), name


def test_kohya_file_converts_to_the_same_adapter(lora):
    diffusers_style, _ = lora_to_shira(lora / "pytorch_lora_weights.safetensors", density=0.3)
    kohya_style, _ = lora_to_shira(lora / "kohya.safetensors", density=0.3)
    pairs = list(zip(diffusers_style.items(), kohya_style.items()))
    assert len(pairs) == 32
    for (c1, n1, a), (c2, n2, b) in pairs:
        assert (c1, n1) == (c2, n2) and torch.equal(a.positions, b.positions) and torch.allclose(a.deltas, b.deltas)


def test_budgets_errors_and_cli(lora, tmp_path, capsys):
    matched, report = lora_to_shira(lora / "pytorch_lora_weights.safetensors", match_params=True, components=["unet"])
    for _, name, delta in matched.items():
        rows, cols = delta.shape[0], delta.to_dense().numel() // delta.shape[0]
        assert delta.numel == 2 * (rows + cols), name
    assert 0 < report.overall < 1 and all(0 <= e <= 1 for e in report.errors.values())
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(lora / "pytorch_lora_weights.safetensors"), str(out), "--density", "0.05"]) == 0
    assert "overall" in capsys.readouterr().out and ShiraAdapter.load(out).deltas["unet"]
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    for argv, message in [
        (["convert", str(tmp_path / "missing.safetensors"), str(out)], "missing.safetensors: no such LoRA file"),
        (["convert", str(plain), str(out)], "no LoRA keys"),
        (["convert", str(lora / "pytorch_lora_weights.safetensors"), str(out), "--density", "1.5"], r"density must be in \(0, 1\]"),
        (["convert", str(lora / "pytorch_lora_weights.safetensors"), str(out), "--components", "transformer"], "no LoRA layers for component 'transformer'"),
        (["convert", str(lora / "pytorch_lora_weights.safetensors"), str(out), "--pipeline", "Nope"], "'Nope' is not a diffusers pipeline class"),
    ]:
        assert main(argv) == 2
        assert re.search(message, capsys.readouterr().err), message


@pytest.mark.parametrize("kind, pipeline, components", [("sdxl", "StableDiffusionXLPipeline", ("unet", "text_encoder", "text_encoder_2")),
                                                         ("flux", "FluxPipeline", ("transformer",))])
def test_other_pipelines_convert_to_what_fuse_lora_gives(tmp_path, kind, pipeline, components):
    # SDXL: text_encoder_2 is a CLIPTextModelWithProjection (its weights keep `text_model.`); Flux: its own loader,
    # which returns alphas only on request.
    import diffusers

    pipe = tiny_pipeline(kind)
    torch.manual_seed(0)
    config = dict(r=2, lora_alpha=4, init_lora_weights=False)
    layers = {}
    for component in components:
        module = getattr(pipe, component)
        module.add_adapter(LoraConfig(target_modules=["q_proj"] if "text" in component else ["to_q", "to_k"], **config))
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(module)
    getattr(diffusers, pipeline).save_lora_weights(tmp_path, **layers)
    fused = tiny_pipeline(kind)
    fused.load_lora_weights(str(tmp_path))
    fused.fuse_lora()
    adapter, report = lora_to_shira(tmp_path / "pytorch_lora_weights.safetensors", density=1.0, pipeline=pipeline)
    ours = tiny_pipeline(kind)
    ours.load_shira_weights(adapter)
    assert report.overall == 0.0 and len(adapter.components) == len(layers)
    for component in adapter.components:
        for name, parameter in getattr(ours, component).named_parameters():
            assert torch.equal(parameter, getattr(fused, component).get_parameter(name)), f"{component}.{name}"


def test_dora_and_unknown_pipelines_are_refused(tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"], use_dora=True, init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    with pytest.raises(ValueError, match="a DoRA file .*lora_magnitude_vector.* depends on the base weights"):
        lora_to_shira(tmp_path / "pytorch_lora_weights.safetensors", density=1.0)
    with pytest.raises(ValueError, match="'NoSuchPipeline' is not a diffusers pipeline class with LoRA loading"):
        lora_to_shira(tmp_path / "pytorch_lora_weights.safetensors", density=1.0, pipeline="NoSuchPipeline")


def test_extraction_recovers_a_sparse_fine_tune_exactly(tmp_path):
    base = tiny_pipeline("sd")
    planted = random_adapter(base, 0, components=("unet", "text_encoder"), density=0.03)
    base.save_pretrained(tmp_path / "base")
    base.load_shira_weights(planted)
    base.save_pretrained(tmp_path / "tuned")  # the fine-tune: base + planted, in fp32
    extracted, report = extract_shira(tmp_path / "base", tmp_path / "tuned", density=0.05)
    assert report.overall < 1e-6  # every changed entry kept; what is left is fp32 rounding of the norms
    assert [(c, n) for c, n, _ in extracted.items()] == [(c, n) for c, n, _ in planted.items()]
    for (_, name, got), (_, _, want) in zip(extracted.items(), planted.items()):
        assert torch.equal(got.positions, want.positions), name
    fresh = tiny_pipeline("sd")
    fresh.load_shira_weights(extracted)
    tuned = StableDiffusionPipeline.from_pretrained(tmp_path / "tuned")
    for component in ("unet", "text_encoder"):
        for name, parameter in getattr(fresh, component).named_parameters():
            assert torch.allclose(parameter, getattr(tuned, component).get_parameter(name), rtol=0, atol=1e-6), name
    assert main(["extract", str(tmp_path / "base"), str(tmp_path / "base"), str(tmp_path / "x.safetensors")]) == 2
