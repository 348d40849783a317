"""The trainer on the tiny pipelines: every mask learns, sparse == hook, exact export, resume, LoRA, errors."""

import dataclasses
import json
import math
import re
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from PIL import Image

from shira_diffusion import ShiraAdapter, add_shira_support
from shira_diffusion.cli import build_parser, main
from shira_diffusion.masks import MASK_TYPES
from shira_diffusion.testing import tiny_pipeline
from shira_diffusion.trainables import UNET_TARGETS, find_targets, prepare_trainable
from shira_diffusion.training import TrainingConfig, config_from_dict, denoising_loss, train

from .helpers import draw_style_folder, one_thread, snapshot  # noqa: F401  (one_thread: an autouse fixture)


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
        lr_scheduler="constant", lr_warmup_steps=0, report_to="none", checkpointing_steps=0, calibration_batches=2, seed=0,
        target_modules=list(UNET_TARGETS),
    )
    values.update(overrides)
    return TrainingConfig(**values)


def test_shira_defaults_and_the_cli_is_the_dataclass():
    """SHiRA's own flags default to the paper's adapter; diffusers-named flags are checked in test_families."""
    c = TrainingConfig(pretrained_model_name_or_path="m", train_data_dir="d")
    assert (c.adapter, c.mask, c.density, c.impl, c.shira_r, c.target_modules) == ("shira", "snip", 0.02, "sparse", None, None)
    args = build_parser().parse_args(["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d"])
    assert config_from_dict(vars(args)) == dataclasses.replace(c, optimizer="adamw")  # the CLI flags are the fields, same defaults
    args = build_parser().parse_args(["train", "--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--shira_r", "8",
                                      "--lora_layers", "to_q,to_v", "--train_text_encoder", "--density", "0.05", "--optimizer", "Prodigy",
                                      "--prodigy_decouple", "false"])
    parsed = config_from_dict(vars(args))
    assert (parsed.shira_r, parsed.target_modules, parsed.train_text_encoder, parsed.density) == (8, ["to_q,to_v"], True, 0.05)
    assert (parsed.train_data_dir, parsed.optimizer, parsed.prodigy_decouple) == ("d", "prodigy", False)


@pytest.mark.parametrize("mask", MASK_TYPES)
def test_every_mask_lowers_the_denoising_loss_at_the_requested_density(setup, mask):
    result = train(config(setup, f"mask_{mask}", mask=mask))
    assert result.global_step == 30 and len(result.losses) == 30 and result.steps_per_second > 0 and result.peak_memory_bytes > 0
    adapter = ShiraAdapter.load(result.adapter_path)
    assert adapter.mask_type == mask and adapter.base_model == setup["model"]
    assert adapter.components == ["unet"] and len(list(adapter.items())) == len(find_targets(tiny_pipeline("sd").unet, UNET_TARGETS))
    for _, _, delta in adapter.items():
        assert delta.numel == round(0.2 * math.prod(delta.shape))
    assert result.trainable_parameters == adapter.num_parameters
    pipe = add_shira_support(StableDiffusionPipeline.from_pretrained(setup["model"]))
    before = denoising_loss(pipe, setup["data"], 32)  # fixed images, noise and timesteps
    pipe.load_shira_weights(result.adapter_path)
    after = denoising_loss(pipe, setup["data"], 32)
    assert after < before * 0.97, (before, after)  # 0.90-0.94 observed over seeds; untrained = 1.0
    card = (result.output_dir / "README.md").read_text()
    assert setup["model"] in card and f"{mask} mask" in card and "density 0.2" in card and "steps: 30" in card


def test_sparse_and_hook_give_the_same_adapter(setup):
    sparse = train(config(setup, "impl_sparse", mask="rand", impl="sparse", max_train_steps=6, adam_weight_decay=0.5))
    hook = train(config(setup, "impl_hook", mask="rand", impl="hook", max_train_steps=6, adam_weight_decay=0.5))
    assert sparse.trainable_parameters == hook.trainable_parameters
    a_adapter, b_adapter = ShiraAdapter.load(sparse.adapter_path), ShiraAdapter.load(hook.adapter_path)
    for (_, name, a), (_, name2, b) in zip(a_adapter.items(), b_adapter.items(), strict=True):
        assert name == name2 and torch.equal(a.positions, b.positions)
        assert torch.allclose(a.deltas, b.deltas, atol=2e-5), (name, (a.deltas - b.deltas).abs().max())
    assert max(d.deltas.abs().max() for _, _, d in a_adapter.items()) > 1e-3  # it did train
    np.testing.assert_allclose(sparse.losses, hook.losses, rtol=1e-4)



def test_resumed_run_ends_with_the_same_adapter(setup):
    settings = dict(mask="snip", max_train_steps=6, checkpointing_steps=2, train_batch_size=2, random_flip=True)  # 3 steps per epoch
    full = train(config(setup, "resume_full", checkpoints_total_limit=2, **settings))
    assert sorted(p.name for p in full.output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # pruned
    interrupted = config(setup, "resume_cut", **settings)
    train(interrupted)
    shutil.rmtree(setup["root"] / "resume_cut" / "checkpoint-6")  # as if it had died after step 4 (mid-epoch) ...
    (setup["root"] / "resume_cut" / "shira_weights.safetensors").unlink()
    interrupted.resume_from_checkpoint = "latest"  # ... and was restarted
    resumed = train(interrupted)
    assert resumed.global_step == 6 and len(resumed.losses) == 2
    np.testing.assert_allclose(resumed.losses, full.losses[4:], rtol=1e-5)
    reference = ShiraAdapter.load(full.adapter_path)
    for (_, _, a), (_, _, b) in zip(reference.items(), ShiraAdapter.load(resumed.adapter_path).items(), strict=True):
        assert torch.equal(a.positions, b.positions) and torch.allclose(a.deltas, b.deltas, atol=1e-7)
    interrupted.mask = "wm"  # the stored masks belong to the snip run
    with pytest.raises(ValueError, match="made with --mask snip"):
        train(interrupted)


def test_lora_baseline_is_a_diffusers_lora_file_on_every_target(setup):
    result = train(config(setup, "lora", adapter="lora", rank=4, max_train_steps=4, lora_dropout=0.1))
    assert result.adapter_path.name == "pytorch_lora_weights.safetensors"
    targets = find_targets(tiny_pipeline("sd").unet, UNET_TARGETS)
    assert result.trainable_parameters == sum(4 * (m.in_features + m.out_features) for m in targets.values())
    pipe = StableDiffusionPipeline.from_pretrained(setup["model"])
    base = pipe("fox", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(result.output_dir), weight_name=result.adapter_path.name)
    adapted = {n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == set(targets)
    tuned = pipe("fox", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert not np.allclose(base, tuned)
    assert "LoRA (rank 4)" in (result.output_dir / "README.md").read_text()
    assert pipe.unet.peft_config[pipe.get_list_adapters()["unet"][0]].lora_dropout == 0.1  # stored with the file


def test_text_encoder_lr_and_validation_epochs(setup, monkeypatch):
    groups = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            groups.extend((g["lr"], g["weight_decay"]) for g in self.param_groups)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    # 6 images, batch 3: 2 steps per epoch; validation after each epoch (step 2) and at the end (step 4).
    result = train(config(setup, "te_lr", mask="rand", max_train_steps=4, train_text_encoder=True, text_encoder_lr=0.0,
                          validation_prompt="a shape", validation_epochs=1, validation_steps=0, num_validation_images=1,
                          validation_inference_steps=2, adam_weight_decay_text_encoder=0.5))
    assert groups == [(3e-2, 1e-2), (0.0, 0.5)]  # unet: --learning_rate / --adam_weight_decay; text encoder: its own
    adapter = ShiraAdapter.load(result.adapter_path)
    moved = {component for component, _, delta in adapter.items() if delta.deltas.abs().max() > 0}
    assert moved == {"unet"} and "text_encoder" in adapter.components  # trained at rate 0: not moved at all
    assert sorted(p.name for p in (result.output_dir / "validation").glob("*.png")) == ["step-000002-0.png", "step-000004-0.png"]


def test_sdxl_and_text_encoder_training_with_validation_images(tmp_path, setup):
    model = tmp_path / "sdxl"
    tiny_pipeline("sdxl").save_pretrained(model)
    result = train(config(
        setup, "sdxl", pretrained_model_name_or_path=str(model), mask="grad", max_train_steps=4, train_text_encoder=True,
        validation_prompt="fox", num_validation_images=2, validation_steps=2, validation_inference_steps=2, report_to="tensorboard",
        gradient_checkpointing=True,
    ))
    adapter = ShiraAdapter.load(result.adapter_path)
    assert adapter.components == ["text_encoder", "text_encoder_2", "unet"]
    pipe = tiny_pipeline("sdxl")
    before = snapshot(pipe)
    pipe.load_shira_weights(adapter)
    after = snapshot(pipe)
    for component in ("unet.", "text_encoder.", "text_encoder_2."):  # every component trained (checkpointed too)
        assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(component)), component
    pipe.unload_shira_weights()
    assert all(torch.equal(v, snapshot(pipe)[k]) for k, v in before.items())
    assert sorted(p.name for p in (result.output_dir / "validation").iterdir()) == [
        "step-000002-0.png", "step-000002-1.png", "step-000004-0.png", "step-000004-1.png"]
    card = (result.output_dir / "README.md").read_text()
    assert "samples.png" in card and "grad mask" in card and (result.output_dir / "samples.png").is_file()
    assert list((result.output_dir / "logs").rglob("events.out.tfevents.*"))


def test_bad_training_input_gives_clear_errors_before_training(setup, tmp_path, capsys):
    base = ["train", "--pretrained_model_name_or_path", setup["model"], "--output_dir", str(tmp_path / "out"), "--resolution", "32"]
    empty = tmp_path / "empty"
    empty.mkdir()
    no_captions = draw_style_folder(tmp_path / "nocap", captions=False)
    some_captions = draw_style_folder(tmp_path / "somecap")
    (some_captions / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "x"}))
    broken = draw_style_folder(tmp_path / "broken")
    (broken / "3.png").write_bytes(b"not a png")
    data = ["--train_data_dir", setup["data"]]
    cases = [
        (["--train_data_dir", str(tmp_path / "missing")], "training data folder does not exist"),
        (["--train_data_dir", str(empty)], "no images"),
        (["--train_data_dir", str(no_captions)], "no captions"),
        (["--train_data_dir", str(some_captions)], "5 of 6 images have no caption, e.g. 1.png"),
        (["--train_data_dir", str(broken)], "3.png: unreadable image"),
        (data + ["--density", "0"], r"--density must be in \(0, 1\], got 0.0"),
        (data + ["--density", "1.5"], r"--density must be in \(0, 1\], got 1.5"),
        (data + ["--target_modules", "to_q", "to_qq"], "target module 'to_qq' matches no Linear layer"),
        (data + ["--resolution", "30"], "--resolution must be a positive multiple of 8, got 30"),
        (data + ["--pretrained_model_name_or_path", str(tmp_path / "nomodel")], "nomodel: no such model folder"),
        (data + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-9")], "checkpoint-9: no such checkpoint folder"),
        (data + ["--pretrained_vae_model_name_or_path", str(tmp_path / "novae")], "novae: no such model folder"),
        (data + ["--sample_batch_size", "0"], "--sample_batch_size must be a positive integer, got 0"),
        (data + ["--hub_token", "secret", "--report_to", "wandb"], "--hub_token with --report_to wandb would expose the token"),
        (data + ["--text_encoder_lr", "1e-5"], "--text_encoder_lr 1e-05 needs --train_text_encoder"),
        (data + ["--adapter", "lora", "--lora_dropout", "1"], r"--lora_dropout must be in \[0, 1\), got 1.0"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert re.search(r"(^|\n)error: .*" + message, err), (message, err)
        assert not (tmp_path / "out" / "shira_weights.safetensors").exists()
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error for an unknown mask: also exit 2
        main(base + data + ["--mask", "magic"])
    assert exit_info.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
    ok = base + ["--train_data_dir", str(no_captions), "--instance_prompt", "blue fire style", "--max_train_steps", "1", "--report_to", "none"]
    assert main(ok) == 0
    assert "blue fire style" in (tmp_path / "out" / "README.md").read_text()


def test_user_errors_are_reported_before_any_model_loads(setup, tmp_path, capsys, monkeypatch):
    """Each case: `error: ...` and exit 2 from checks that need no weights (loading one would fail the test)."""
    import importlib.util

    from shira_diffusion.training import loop

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(loop, "load_family", no_loading)
    out = tmp_path / "out"
    base = ["train", "--pretrained_model_name_or_path", setup["model"], "--train_data_dir", setup["data"], "--output_dir", str(out),
            "--resolution", "32", "--report_to", "none"]
    not_a_model = draw_style_folder(tmp_path / "images")
    truncated = draw_style_folder(tmp_path / "truncated")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(truncated / "5.jpg", quality=95)
    (truncated / "5.jpg").write_bytes((truncated / "5.jpg").read_bytes()[:300])  # verify() passes this file
    (truncated / "metadata.jsonl").write_text((truncated / "metadata.jsonl").read_text().replace("5.png", "5.jpg"))
    (truncated / "5.png").unlink()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")

    def with_(flag, value):
        args = list(base)
        args[args.index(flag) + 1] = str(value)
        return args

    cases = [
        (with_("--pretrained_model_name_or_path", not_a_model), "images: no model_index.json in this folder"),
        (with_("--pretrained_model_name_or_path", "nonexistent_model_dir"), "nonexistent_model_dir: no such local folder, and the Hub could not"),
        (base + ["--pretrained_vae_model_name_or_path", str(not_a_model)], "images: no config.json in this folder"),
        (with_("--output_dir", a_file), "--output_dir .*a_file: exists and is not a folder"),
        (with_("--train_data_dir", truncated), "5.jpg: unreadable image"),
        (base + ["--learning_rate", "-1"], "--learning_rate must be > 0, got -1.0"),
        (base + ["--learning_rate", "nan"], "--learning_rate must be > 0, got nan"),
        (base + ["--snr_gamma", "0"], "--snr_gamma must be > 0, got 0.0"),
        (base + ["--lr_warmup_steps", "-5"], "--lr_warmup_steps must be >= 0, got -5"),
        (base + ["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be a positive integer, got 0"),
        (base + ["--max_grad_norm", "0"], "--max_grad_norm must be > 0, got 0.0"),
        (base + ["--adam_beta2", "1"], r"--adam_beta2 must be in \[0, 1\), got 1.0"),
        (base + ["--repeats", "0"], "--repeats must be a positive integer, got 0"),
        (base + ["--lr_scheduler", "piecewise_constant"], "--lr_scheduler piecewise_constant and --lr_step_rules go together"),
        (base + ["--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:x,0.1"], "--lr_step_rules '1:x,0.1': expected"),
        (base + ["--adam_weight_decay_text_encoder", "0.1"], "--adam_weight_decay_text_encoder needs --train_text_encoder"),
        (base + ["--push_to_hub", "--hub_model_id", "me/style"], "--push_to_hub: cannot create or reach the Hub repo 'me/style'"),  # offline
    ]
    if not torch.cuda.is_available():
        cases.append((base + ["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a GPU .* use bf16 or no"))
    if importlib.util.find_spec("wandb") is None:
        cases.append((base + ["--report_to", "wandb"], "--report_to wandb: wandb is not installed"))
    if importlib.util.find_spec("xformers") is None:
        cases.append((base + ["--enable_xformers_memory_efficient_attention"], "needs xformers"))
    for args, message in cases:
        assert main(args) == 2, message
        err = capsys.readouterr().err
        assert re.search(r"(^|\n)error: .*" + message, err), (message, err)
        assert "Traceback" not in err and not (out / "masks.safetensors").exists()


def test_checkpoint_folders_with_other_names_are_not_the_runs(tmp_path):
    from safetensors.torch import save_file

    from shira_diffusion.checkpoints import CHECKPOINT_FILES, find_checkpoint, prune_checkpoints

    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-best", "checkpoint-3-old"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-2", "checkpoint-10"):  # complete: 'latest' and pruning skip incomplete checkpoint-N folders
        for file in CHECKPOINT_FILES:
            if file.endswith(".safetensors"):
                save_file({"x": torch.zeros(1)}, str(tmp_path / name / file))
            else:
                torch.save({}, tmp_path / name / file)
    (tmp_path / "checkpoint-99").write_text("a file, not a checkpoint")
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint-10"  # by number, not by name
    with pytest.raises(FileNotFoundError, match="checkpoint-best: no such checkpoint folder"):
        find_checkpoint(tmp_path, "checkpoint-best")
    prune_checkpoints(tmp_path, 2)  # room for one more: keeps only the newest numbered one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-3-old", "checkpoint-99", "checkpoint-best"]


def test_prior_pairs_use_every_class_image_up_to_num_class_images(tmp_path):
    from shira_diffusion.data import DataSource, ImageCaptions, StyleDataset, load_examples
    from shira_diffusion.training.prior import PriorPairs, class_examples

    instances = draw_style_folder(tmp_path / "instances", count=2)
    classes = draw_style_folder(tmp_path / "classes", count=6, captions=False)
    (classes / "9.png").write_bytes(b"not a png")  # after the first --num_class_images: never opened
    run = TrainingConfig(pretrained_model_name_or_path="m", train_data_dir=str(instances), with_prior_preservation=True,
                         class_data_dir=classes, class_prompt="a shape", num_class_images=5)
    found = class_examples(run)
    assert [(Path(found.name(i)).name, found.captions[i]) for i in range(len(found))] == [(f"{i}.png", "a shape") for i in range(5)]
    named = ImageCaptions(found.images, [p.name for p in found.images], "class images")  # captions = file names: which image is which
    pairs = PriorPairs(StyleDataset(load_examples(DataSource(train_data_dir=str(instances))), 32, True, False, 0), StyleDataset(named, 32, True, False, 1))
    assert len(pairs) == 5  # max(2 instances, 5 class images), as diffusers' DreamBoothDataset
    seen = [(pairs[i][0]["caption"], pairs[i][1]["caption"]) for i in range(len(pairs))]
    assert [c for _, c in seen] == [f"{i}.png" for i in range(5)]
    assert [i for i, _ in seen] == ["shape 0, blue fire style", "shape 1, blue fire style"] * 2 + ["shape 0, blue fire style"]



def test_path_model_logged_loss_of_partial_accumulation_repeats_step_rules_and_no_token_in_logs(setup):
    """6 images x --repeats 2, batch 2: 6 micro-batches. Accumulating 4, the second step has only 2, and its
    logged loss is their mean. lr 1e-12 keeps the model fixed, so the per-batch losses of a run without
    accumulation are the same micro-batch losses."""
    common = {"mask": "rand", "train_batch_size": 2, "repeats": 2, "max_train_steps": None, "num_train_epochs": 1, "learning_rate": 1e-12}
    per_batch = train(config(setup, "loss_single", **common))
    assert len(per_batch.losses) == 6  # 12 examples per epoch: --repeats doubled it
    token = "hf_NOT_A_REAL_TOKEN_4b1d"
    accumulated = train(config(setup, "loss_accum", pretrained_model_name_or_path=Path(setup["model"]), gradient_accumulation_steps=4,
                               report_to="tensorboard", hub_token=token, lr_scheduler="piecewise_constant", lr_step_rules="1:1,0.5", **common))
    first, rest = per_batch.losses[:4], per_batch.losses[4:]
    np.testing.assert_allclose(accumulated.losses, [sum(first) / 4, sum(rest) / 2], rtol=1e-5)
    assert accumulated.learning_rates == pytest.approx([1e-12, 5e-13])  # x1 before step 1, then x0.5
    assert ShiraAdapter.load(accumulated.adapter_path).base_model == setup["model"]  # a Path: saved as its string
    files = [p for p in accumulated.output_dir.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in files) and any(p.name == "hparams.yml" for p in files)
    assert not [p for p in files if token.encode() in p.read_bytes()]
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        train(config(setup, "missing_path", pretrained_model_name_or_path=Path(setup["root"]) / "no_model"))


def test_prior_preservation_snr_noise_offset_accumulation_and_bf16(setup, tmp_path):
    classes = draw_style_folder(tmp_path / "class", count=2, captions=False)
    for index, name in ((0, "class_00001.png"), (1, "class_00002.png")):  # class_00000 deleted by the user: a gap
        (classes / f"{index}.png").rename(classes / name)
    kept = (classes / "class_00002.png").read_bytes()
    result = train(config(
        setup, "prior", mask="rand", max_train_steps=3, with_prior_preservation=True, class_data_dir=str(classes),
        class_prompt="a shape", num_class_images=5, sample_batch_size=2, snr_gamma=5.0, noise_offset=0.05, gradient_accumulation_steps=2,
        train_batch_size=1, mixed_precision="bf16", gradient_checkpointing=True, target_conv=True,
    ))
    assert result.global_step == 3 and len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    # 3 missing (a batch of 2, then 1), written to free names: the gap, then after the last one; none overwritten
    assert sorted(p.name for p in classes.glob("*.png")) == [f"class_{i:05d}.png" for i in range(5)]
    assert (classes / "class_00002.png").read_bytes() == kept
    adapter = ShiraAdapter.load(result.adapter_path)
    assert adapter.num_parameters == result.trainable_parameters
    names = [name for _, name, delta in adapter.items() if delta.deltas.abs().max() > 0]
    assert "conv_in.weight" in names and any(n.endswith("attn1.to_q.weight") for n in names)  # convs train too


def test_dreambooth_flags_scale_lr_schedule_cycles_vae_and_push_to_hub(setup, tmp_path, monkeypatch):
    import huggingface_hub
    from diffusers import AutoencoderKL
    from huggingface_hub.utils import filter_repo_objects

    from shira_diffusion.families import StableDiffusion, load_family
    from shira_diffusion.training import with_family_defaults

    args = build_parser().parse_args(["train", "--pretrained_model_name_or_path", "m", "--instance_data_dir", "d"])
    assert config_from_dict(vars(args)).train_data_dir == "d"  # diffusers' DreamBooth name for the data folder
    args = build_parser().parse_args([  # diffusers' flags that launchers and users pass, honoured
        "train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--local_rank", "0", "--repeats", "3",
        "--adam_weight_decay_text_encoder", "0.1", "--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:2,0.1",
        "--enable_xformers_memory_efficient_attention"])
    parsed = config_from_dict(vars(args))
    assert (parsed.repeats, parsed.adam_weight_decay_text_encoder, parsed.lr_scheduler, parsed.lr_step_rules,
            parsed.enable_xformers_memory_efficient_attention) == (3, 0.1, "piecewise_constant", "1:2,0.1", True)

    vae = AutoencoderKL.from_pretrained(setup["model"], subfolder="vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(0.5)
    vae.save_pretrained(tmp_path / "vae")
    uploads = {}

    class FakeApi:
        def __init__(self, token=None):
            uploads["token"] = token

        def create_repo(self, repo_id, exist_ok=False):
            uploads["created"] = (repo_id, exist_ok)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            uploads[repo_id] = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
            return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run = config(setup, "flags", max_train_steps=4, train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
                 scale_lr=True, lr_scheduler="cosine_with_restarts", lr_num_cycles=2, checkpointing_steps=2,
                 pretrained_vae_model_name_or_path=str(tmp_path / "vae"), push_to_hub=True, hub_model_id="me/style", hub_token="t")
    loaded = load_family(with_family_defaults(run, "sd"), StableDiffusion).pipe.vae
    assert torch.equal(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    result = train(run)
    # --scale_lr: 1e-3 x 2 accumulation x 2 per batch x 1 process; two cosine cycles over 4 steps: peak, half, peak, half
    assert result.learning_rates == pytest.approx([4e-3, 2e-3, 4e-3, 2e-3])
    assert uploads["token"] == "t" and uploads["created"] == ("me/style", True)
    assert {"shira_weights.safetensors", "README.md"} <= set(uploads["me/style"])
    assert (result.output_dir / "checkpoint-4").is_dir() and (result.output_dir / "masks.safetensors").is_file()
    assert not [f for f in uploads["me/style"] if f.startswith("checkpoint-") or f == "masks.safetensors"]  # run state stays local


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(setup, capsys):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    assert main(["train", "--pretrained_model_name_or_path", setup["model"], "--train_data_dir", setup["data"], "--use_8bit_adam"]) == 2
    assert "--use_8bit_adam needs bitsandbytes" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_data_parallel_run_sparse_and_hook_agree(setup, tmp_path):
    """`torchrun` / `accelerate launch` with 2 CPU processes (gloo DDP): both impls end with the same adapter
    and the same logged losses (which would drift if DDP's averaged full gradients moved hook weights outside
    the mask), and each process checkpoints its own noise generator."""
    import os
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    adapters, losses = {}, {}
    for impl in ("sparse", "hook"):
        out = tmp_path / impl
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "shira_diffusion", "train",
                   "--pretrained_model_name_or_path", setup["model"], "--train_data_dir", setup["data"], "--output_dir", str(out),
                   "--resolution", "32", "--center_crop", "--train_batch_size", "1", "--max_train_steps", "4", "--learning_rate", "1e-2",
                   "--density", "0.2", "--mask", "snip", "--impl", impl, "--checkpointing_steps", "2", "--report_to", "tensorboard",
                   "--calibration_batches", "1", "--adam_weight_decay", "0.3"]
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
        assert {"noise_generator_0.safetensors", "noise_generator_1.safetensors"} <= {p.name for p in (out / "checkpoint-4").iterdir()}
        adapters[impl] = ShiraAdapter.load(out / "shira_weights.safetensors")
        events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
        events.Reload()
        losses[impl] = [event.value for event in events.Scalars("loss")]
    assert len(losses["sparse"]) == 4
    np.testing.assert_allclose(losses["sparse"], losses["hook"], rtol=1e-4)
    for (_, _, a), (_, _, b) in zip(adapters["sparse"].items(), adapters["hook"].items(), strict=True):
        assert torch.equal(a.positions, b.positions) and torch.allclose(a.deltas, b.deltas, atol=2e-5)


def test_trains_from_a_hub_id_in_the_cache_while_offline(setup, tmp_path):
    # huggingface_hub's cache layout, HF_HUB_OFFLINE=1 (read at import: a fresh process). The tokenizer class comes
    # from model_index.json; AutoTokenizer would look for a config.json SD repos lack and fail offline.
    import subprocess
    import sys

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(setup["model"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "from shira_diffusion.training import TrainingConfig, train\n"
        f"result = train(TrainingConfig(pretrained_model_name_or_path='someone/tiny-sd', train_data_dir={setup['data']!r}, "
        f"output_dir={str(tmp_path / 'out')!r}, resolution=32, center_crop=True, train_batch_size=2, max_train_steps=1, "
        "density=0.2, report_to='none', checkpointing_steps=0, calibration_batches=1))\n"
        "print('adapter', result.adapter_path.name)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "adapter shira_weights.safetensors" in done.stdout


def test_no_progress_bar_leaves_the_callers_display_alone(setup, capsys):
    train(config(setup, "bar", max_train_steps=2))
    assert "training" in capsys.readouterr().err
    train(config(setup, "nobar", max_train_steps=2, no_progress_bar=True))
    assert "training" not in capsys.readouterr().err
