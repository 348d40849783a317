"""The trainer on the tiny pipelines: every mask learns, sparse == hook, exact export, resume, LoRA, errors."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from shira_diffusion import ShiraAdapter
from shira_diffusion.cli import main
from shira_diffusion.masks import MASK_TYPES
from shira_diffusion.testing import tiny_pipeline
from shira_diffusion.training import ShiraTrainable, TrainingConfig, denoising_loss, find_targets, train

from .helpers import snapshot


def draw_style_folder(folder, count=6, captions=True):
    """Small procedural images: an orange square on a blue ground, moved per image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        pixels = np.zeros((40, 48, 3), np.uint8)
        pixels[..., 2] = 200
        pixels[8 + i : 28 + i, 6 + 3 * i : 26 + 3 * i] = (255, 140, 20)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"shape {i}, blue fire style"})
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = root / "model"
    tiny_pipeline("sd").save_pretrained(model)
    return {"model": str(model), "data": str(draw_style_folder(root / "data")), "root": root}


def config(setup, name, **overrides):
    values = dict(
        pretrained_model_name_or_path=setup["model"], train_data_dir=setup["data"], output_dir=str(setup["root"] / name),
        resolution=32, center_crop=True, train_batch_size=3, max_train_steps=30, learning_rate=3e-2, density=0.2,
        lr_scheduler="constant", report_to="none", checkpointing_steps=0, calibration_batches=2,
    )
    values.update(overrides)
    return TrainingConfig(**values)


@pytest.mark.parametrize("mask", MASK_TYPES)
def test_every_mask_lowers_the_denoising_loss_at_the_requested_density(setup, mask):
    result = train(config(setup, f"mask_{mask}", mask=mask))
    adapter = ShiraAdapter.load(result.adapter_path)
    assert adapter.mask_type == mask
    for _, _, delta in adapter.items():
        assert delta.numel == round(0.2 * math.prod(delta.shape))
    pipe = StableDiffusionPipeline.from_pretrained(setup["model"])
    from shira_diffusion import add_shira_support

    add_shira_support(pipe)
    before = denoising_loss(pipe, setup["data"], 32)
    pipe.load_shira_weights(result.adapter_path)
    after = denoising_loss(pipe, setup["data"], 32)
    assert after < before * 0.95, (before, after)


def test_sparse_and_hook_give_the_same_adapter(setup):
    sparse = ShiraAdapter.load(train(config(setup, "impl_sparse", mask="rand", impl="sparse", max_train_steps=6)).adapter_path)
    hook = ShiraAdapter.load(train(config(setup, "impl_hook", mask="rand", impl="hook", max_train_steps=6)).adapter_path)
    for (_, name, a), (_, name2, b) in zip(sparse.items(), hook.items()):
        assert name == name2 and torch.equal(a.positions, b.positions)
        assert torch.allclose(a.deltas, b.deltas, atol=2e-5), (name, (a.deltas - b.deltas).abs().max())
    assert max(d.deltas.abs().max() for _, _, d in sparse.items()) > 1e-3  # it did train


@pytest.mark.parametrize("impl", ["sparse", "hook"])
def test_exported_adapter_reproduces_the_trained_unet_and_hook_leaves_the_rest_alone(impl):
    pipe = tiny_pipeline("sd")
    trained = tiny_pipeline("sd").unet
    base_weights = {n: p.detach().clone() for n, p in trained.named_parameters()}
    targets = find_targets(trained, ("to_q", "to_v", "ff.net.2"))
    generator = torch.Generator().manual_seed(0)
    positions = {n: torch.randperm(m.weight.numel(), generator=generator)[:50].sort().values for n, m in targets.items()}
    trainable = ShiraTrainable(trained, positions, impl)
    optimizer = torch.optim.AdamW([trainable.param_group(0.1)], lr=1e-2)
    size = trained.config.sample_size
    inputs = (torch.randn(2, 4, size, size, generator=generator), torch.tensor([10, 700]), torch.randn(2, 5, 32, generator=generator))
    for _ in range(3):
        trained(*inputs).sample.square().mean().backward()
        trainable.decay_toward_base(1e-2, 0.1)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        expected = trained(*inputs).sample
    if impl == "hook":  # outside the mask, neither gradients, Adam's moments nor weight decay moved anything
        for name, module in targets.items():
            moved = torch.nonzero(module.weight.detach().view(-1) != base_weights[f"{name}.weight"].view(-1)).flatten()
            assert set(moved.tolist()) <= set(positions[name].tolist())
    pipe.load_shira_weights(ShiraAdapter({"unet": trainable.deltas()}))
    with torch.no_grad():
        ours = pipe.unet(*inputs).sample
    if impl == "sparse":
        assert torch.equal(ours, expected)  # W0 + v in fp32 both ways: bit-identical
    else:
        assert torch.allclose(ours, expected, atol=1e-6)  # W - W0 then W0 + delta: one rounding


def test_resumed_run_ends_with_the_same_adapter(setup):
    full = train(config(setup, "resume_full", mask="snip", max_train_steps=6, checkpointing_steps=3, train_batch_size=2))
    reference = ShiraAdapter.load(full.adapter_path)
    interrupted = config(setup, "resume_cut", mask="snip", max_train_steps=6, checkpointing_steps=3, train_batch_size=2)
    train(interrupted)
    import shutil

    shutil.rmtree(setup["root"] / "resume_cut" / "checkpoint-6")  # as if it had died after step 3
    (setup["root"] / "resume_cut" / "shira_weights.safetensors").unlink()
    interrupted.resume_from_checkpoint = "latest"
    resumed = ShiraAdapter.load(train(interrupted).adapter_path)
    for (_, _, a), (_, _, b) in zip(reference.items(), resumed.items()):
        assert torch.equal(a.positions, b.positions) and torch.allclose(a.deltas, b.deltas, atol=1e-7)


def test_lora_baseline_is_a_diffusers_lora_file(setup):
    result = train(config(setup, "lora", adapter="lora", rank=4, max_train_steps=4))
    assert result.adapter_path.name == "pytorch_lora_weights.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(setup["model"])
    base = pipe("fox", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(result.output_dir), weight_name=result.adapter_path.name)
    tuned = pipe("fox", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert not np.allclose(base, tuned)
    assert "LoRA (rank 4)" in (result.output_dir / "README.md").read_text()


def test_sdxl_and_text_encoder_training(tmp_path, setup):
    model = tmp_path / "sdxl"
    tiny_pipeline("sdxl").save_pretrained(model)
    result = train(config(setup, "sdxl", pretrained_model_name_or_path=str(model), mask="wm", max_train_steps=3, train_text_encoder=True, validation_prompt="fox", num_validation_images=1, validation_inference_steps=2))
    adapter = ShiraAdapter.load(result.adapter_path)
    assert adapter.components == ["text_encoder", "text_encoder_2", "unet"]
    pipe = tiny_pipeline("sdxl")
    before = snapshot(pipe)
    pipe.load_shira_weights(adapter)
    pipe.unload_shira_weights()
    assert all(torch.equal(v, snapshot(pipe)[k]) for k, v in before.items())
    card = (result.output_dir / "README.md").read_text()
    assert "samples.png" in card and "wm mask" in card and (result.output_dir / "samples.png").is_file()


def test_bad_training_input_gives_clear_errors_before_training(setup, tmp_path, capsys):
    base = ["train", "--pretrained_model_name_or_path", setup["model"], "--output_dir", str(tmp_path / "out"), "--resolution", "32"]
    empty = tmp_path / "empty"
    empty.mkdir()
    no_captions = draw_style_folder(tmp_path / "nocap", captions=False)
    some_captions = draw_style_folder(tmp_path / "somecap")
    (some_captions / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "x"}))
    broken = draw_style_folder(tmp_path / "broken")
    (broken / "3.png").write_bytes(b"not a png")
    cases = [
        (["--train_data_dir", str(tmp_path / "missing")], "training data folder does not exist"),
        (["--train_data_dir", str(empty)], "no images"),
        (["--train_data_dir", str(no_captions)], "no captions"),
        (["--train_data_dir", str(some_captions)], "5 of 6 images have no caption, e.g. 1.png"),
        (["--train_data_dir", str(broken)], "3.png: unreadable image"),
        (["--train_data_dir", setup["data"], "--density", "0"], r"--density must be in \(0, 1\], got 0.0"),
        (["--train_data_dir", setup["data"], "--density", "1.5"], r"--density must be in \(0, 1\], got 1.5"),
        (["--train_data_dir", setup["data"], "--target_modules", "to_q", "to_qq"], "target module 'to_qq' matches no Linear layer"),
        (["--train_data_dir", setup["data"], "--resolution", "30"], "--resolution must be a multiple of 8, got 30"),
    ]
    import re

    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert re.search(r"(^|\n)error: .*" + message, err), (message, err)
        assert not (tmp_path / "out" / "shira_weights.safetensors").exists()
    assert main(base + ["--train_data_dir", str(no_captions), "--instance_prompt", "blue fire style", "--max_train_steps", "1", "--report_to", "none"]) == 0


def test_prior_preservation_snr_noise_offset_and_tensorboard(setup, tmp_path):
    classes = draw_style_folder(tmp_path / "class", count=3, captions=False)
    result = train(config(
        setup, "prior", mask="rand", max_train_steps=3, with_prior_preservation=True, class_data_dir=str(classes),
        class_prompt="a shape", num_class_images=3, snr_gamma=5.0, noise_offset=0.05, report_to="tensorboard",
    ))
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert list((result.output_dir / "logs").rglob("events.out.tfevents.*"))


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(setup, capsys):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    assert main(["train", "--pretrained_model_name_or_path", setup["model"], "--train_data_dir", setup["data"], "--use_8bit_adam"]) == 2
    assert "--use_8bit_adam needs bitsandbytes" in capsys.readouterr().err
