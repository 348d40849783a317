"""The trainer on every pipeline family: SD3 and Flux (flow matching) train SHiRA and the LoRA baseline, the
saved SHiRA adapter reproduces the trained transformer exactly, resume equals an uninterrupted run, and every
flag named like a diffusers script flag has that script's default for the family."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from shira_diffusion import add_shira_support
from shira_diffusion.cli import build_parser
from shira_diffusion.families import FAMILIES, family_of, family_of_pipeline
from shira_diffusion.format import ShiraAdapter
from shira_diffusion.testing import tiny_pipeline
from shira_diffusion.trainables import ConfigError
from shira_diffusion.training import TrainingConfig, denoising_loss, train, validate_config
from shira_diffusion.training_config import FAMILY_DEFAULTED, SCRIPT_DEFAULTS, with_family_defaults

from .helpers import draw_style_folder

FLOW = ("sd3", "flux")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The four tiny pipelines saved as diffusers folders, and a 4-image style folder."""
    root = tmp_path_factory.mktemp("families")
    for kind in FAMILIES:
        tiny_pipeline(kind).save_pretrained(root / kind)
    return root, draw_style_folder(root / "data", 4)


def _config(root: Path, kind: str, data: Path, out: Path, **overrides) -> TrainingConfig:
    values = dict(pretrained_model_name_or_path=str(root / kind), train_data_dir=str(data) if data else None, output_dir=str(out), resolution=32,
                  train_batch_size=4, max_train_steps=20, learning_rate=1e-2, lr_warmup_steps=0, report_to="none", seed=0,
                  mask="struct", target_modules=["to_q", "to_k", "to_v"], checkpointing_steps=0, no_progress_bar=True)
    if kind in FLOW:
        values["max_sequence_length"] = 16
    return TrainingConfig(**{**values, **overrides})


# ---- families and their defaults ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_each_tiny_pipeline_is_recognised_as_its_family(world, kind):
    root, _ = world
    index = DiffusionPipeline.load_config(str(root / kind))
    assert family_of(index).name == kind
    assert family_of_pipeline(tiny_pipeline(kind)).name == kind


def test_a_pipeline_of_another_family_is_refused_before_loading(world, tmp_path):
    root, data = world
    model = tmp_path / "model"
    shutil.copytree(root / "sd", model)
    index = (model / "model_index.json").read_text().replace('"unet"', '"prior"')
    (model / "model_index.json").write_text(index)
    with pytest.raises(ConfigError, match="not a family the trainer supports"):
        validate_config(_config(tmp_path, "model", data, tmp_path / "out"))


@pytest.mark.parametrize("family", list(SCRIPT_DEFAULTS))
def test_every_flag_named_like_a_diffusers_flag_has_that_scripts_default(family):
    """SCRIPT_DEFAULTS is the one copy of diffusers' defaults: the filled config and the CLI agree with it."""
    fields = {field.name: field for field in dataclasses.fields(TrainingConfig)}
    config = with_family_defaults(TrainingConfig(pretrained_model_name_or_path="m", train_data_dir="d"), family)
    parsed = build_parser("train").parse_args(["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d"])
    for flag, default in SCRIPT_DEFAULTS[family].items():
        assert flag in fields, f"{flag}: a diffusers default for a flag the trainer does not have"
        assert getattr(config, flag) == default, f"{family} --{flag}: {getattr(config, flag)!r}, diffusers {default!r}"
        if flag not in FAMILY_DEFAULTED:  # the CLI's default is TrainingConfig's (optimizer compared lower-cased)
            expected = default.lower() if flag == "optimizer" else default
            assert getattr(parsed, flag) == expected, f"--{flag} in the CLI: {getattr(parsed, flag)!r}"


def test_a_flag_given_explicitly_wins_over_the_family_default():
    config = with_family_defaults(TrainingConfig(pretrained_model_name_or_path="m", train_data_dir="d", resolution=256), "sdxl")
    assert config.resolution == 256 and config.learning_rate == 1e-4 and config.output_dir == "lora-dreambooth-model"


@pytest.mark.parametrize(("kind", "flag", "value"), [("sd3", "snr_gamma", 5.0), ("flux", "noise_offset", 0.1), ("sd", "weighting_scheme", "mode")])
def test_loss_flags_of_the_other_kind_of_training_are_refused(world, tmp_path, kind, flag, value):
    root, data = world
    with pytest.raises(ConfigError, match=f"--{flag} is for"):
        validate_config(_config(root, kind, data, tmp_path / "out", **{flag: value}))


# ---- SD3 and Flux train ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FLOW)
@pytest.mark.parametrize("adapter", ["shira", "lora"])
def test_flow_matching_families_train_an_adapter_that_lowers_the_loss(world, tmp_path, kind, adapter):
    root, data = world
    result = train(_config(root, kind, data, tmp_path / "out", adapter=adapter, learning_rate=1e-2 if adapter == "shira" else 3e-3))
    pipe = DiffusionPipeline.from_pretrained(str(root / kind))
    before = denoising_loss(pipe, data, 32, max_sequence_length=16)
    if adapter == "shira":
        add_shira_support(pipe).load_shira_weights(result.adapter_path)
        assert ShiraAdapter.load(result.adapter_path).components == ["transformer"]
    else:
        pipe.load_lora_weights(str(result.adapter_path))
    after = denoising_loss(pipe, data, 32, max_sequence_length=16)
    assert after < before, f"{kind} {adapter}: denoising loss {before:.5f} -> {after:.5f}"


@pytest.mark.parametrize("kind", FLOW)
def test_saved_shira_adapter_reproduces_the_trained_transformer_exactly(world, tmp_path, monkeypatch, kind):
    from shira_diffusion.training import loop

    root, data = world
    trained = []
    load_family = loop.load_family
    monkeypatch.setattr(loop, "load_family", lambda *args: trained.append(load_family(*args)) or trained[-1])
    result = train(_config(root, kind, data, tmp_path / "out", max_train_steps=4, train_text_encoder=True))
    family = trained[0]
    fresh = add_shira_support(DiffusionPipeline.from_pretrained(str(root / kind)))
    fresh.load_shira_weights(result.adapter_path)
    assert set(ShiraAdapter.load(result.adapter_path).components) == {"transformer", *family.text_encoders}
    for component in ("transformer", *family.text_encoders):
        reference = getattr(fresh, component).state_dict()
        live = getattr(family.pipe, component).state_dict()
        assert all(torch.equal(live[key], value) for key, value in reference.items()), component
    # the same noisy latents into both, conditioned by each pipeline's own (trained / loaded) text encoders
    reference = type(family)(fresh, family.settings)
    latents = torch.randn(2, fresh.transformer.config.in_channels // (4 if kind == "flux" else 1), 4, 4, generator=torch.Generator().manual_seed(3))
    noised = reference.noised(latents, torch.Generator().manual_seed(4), timesteps=torch.tensor([300, 700]))
    captions = ["a red square", "a blue circle"]
    with torch.no_grad():
        outputs = [f.predict(noised, f.encode_prompts(captions), {}) for f in (family, reference)]
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("kind", FLOW)
def test_resumed_flow_matching_run_ends_with_the_same_adapter(world, tmp_path, kind):
    root, data = world
    whole = train(_config(root, kind, data, tmp_path / "whole", max_train_steps=4, train_batch_size=2, checkpointing_steps=2))
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-4")
    (tmp_path / "resumed" / "shira_weights.safetensors").unlink()
    resumed = train(_config(root, kind, data, tmp_path / "resumed", max_train_steps=4, train_batch_size=2, checkpointing_steps=2,
                            resume_from_checkpoint="latest"))
    assert resumed.global_step == 4 and len(resumed.losses) == 2
    assert resumed.losses == whole.losses[2:]
    a, b = ShiraAdapter.load(whole.adapter_path), ShiraAdapter.load(resumed.adapter_path)
    for (component, name, delta), (_, _, other) in zip(a.items(), b.items()):
        assert torch.equal(delta.positions, other.positions) and torch.equal(delta.deltas, other.deltas), (component, name)


def test_an_unseeded_run_records_its_seed_and_resumes_with_it(world, tmp_path):
    root, data = world
    first = train(_config(root, "sd", data, tmp_path / "out", seed=None, max_train_steps=2, train_batch_size=2, checkpointing_steps=1))
    assert ShiraAdapter.load(first.adapter_path).extra["seed"] == first.seed
    shutil.rmtree(tmp_path / "out" / "checkpoint-2")
    again = train(_config(root, "sd", data, tmp_path / "out", seed=None, max_train_steps=2, train_batch_size=2, checkpointing_steps=1,
                          resume_from_checkpoint="latest"))
    assert again.seed == first.seed and again.losses == first.losses[1:]


def test_prodigy_trains_and_needs_its_package(world, tmp_path, monkeypatch):
    import importlib.util

    root, data = world
    result = train(_config(root, "sd", data, tmp_path / "out", optimizer="prodigy", learning_rate=1.0, max_train_steps=3))
    adapter = ShiraAdapter.load(result.adapter_path)
    assert any(delta.deltas.abs().sum() > 0 for _, _, delta in adapter.items())
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="prodigyopt"):
        validate_config(_config(root, "sd", data, tmp_path / "out2", optimizer="Prodigy"))


@pytest.mark.parametrize("source", ["save_to_disk", "imagefolder"])
def test_a_dataset_trains_through_dataset_name(world, tmp_path, source):
    """A Hub-style dataset saved with save_to_disk, and a local imagefolder folder, as --dataset_name."""
    import datasets

    root, data = world
    if source == "save_to_disk":
        images = sorted(data.glob("*.png"))
        table = datasets.Dataset.from_dict({"picture": [str(p) for p in images], "prompt": [f"shape {i}" for i in range(len(images))]})
        table.cast_column("picture", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
        name, columns = str(tmp_path / "saved"), {"image_column": "picture", "caption_column": "prompt"}
    else:  # a folder with metadata.jsonl, read by datasets' imagefolder builder
        name, columns = str(data), {"caption_column": "text"}
    result = train(_config(root, "sd", None, tmp_path / "out", dataset_name=name, max_train_steps=2, train_batch_size=2, **columns))
    assert result.global_step == 2 and ShiraAdapter.load(result.adapter_path).num_parameters == result.trainable_parameters


def test_a_mask_function_from_python_trains_and_is_recorded(world, tmp_path):
    def first_rows(weight, k, **_):  # PEFT-style mask_fn: the first k entries, i.e. whole leading rows
        return torch.arange(k)

    root, data = world
    result = train(_config(root, "sd", data, tmp_path / "out", mask=first_rows, max_train_steps=2, train_batch_size=2))
    adapter = ShiraAdapter.load(result.adapter_path)
    assert adapter.mask_type.startswith("custom:") and adapter.mask_type.endswith("first_rows")
    assert all(torch.equal(delta.positions, torch.arange(delta.numel)) for _, _, delta in adapter.items())
