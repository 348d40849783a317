"""Style adapters on the world model: one training recipe for SHiRA and the LoRA baseline, and the four
adapters that ship in the package (SHiRA and LoRA, blue fire and painting), trained with that recipe by
the package's own `train` command.

The recipe is the same for both methods (the paper's convention: same optimizer, learning rate, schedule
and steps; LoRA rank r against SHiRA's budget r·(m+n) per weight, so both train the same number of values).
`training_config` builds the `TrainingConfig`, `train_command` the equivalent `shira-diffusion train` line
(the README shows it), and `shipped_adapter` finds a packaged adapter file.

Usage:
    config = training_config("blue fire", "data/blue_fire", "out/blue_fire", method="shira")
    result = train(config)
    pipe.load_shira_weights(shipped_adapter("shira", "painting"), adapter_name="painting")
"""

from __future__ import annotations

from dataclasses import fields
from importlib import resources
from pathlib import Path

from ..trainables import ADAPTERS
from ..training import TrainingConfig
from .model import RESOLUTION, model_dir

RECIPE = dict(
    resolution=RESOLUTION, random_flip=True, train_batch_size=8, max_train_steps=250, learning_rate=3e-3,
    lr_scheduler="constant", lr_warmup_steps=0, rank=4, shira_r=4, mask="struct", report_to="none",
    checkpointing_steps=0, seed=0,
    # the world UNet's attention and feed-forward linears (the shipped adapters were trained on these)
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
)
METHODS = ADAPTERS


def training_config(style: str, data_dir: str | Path, output_dir: str | Path, method: str = "shira", **overrides) -> TrainingConfig:
    """The recipe's TrainingConfig for `style`'s dataset in `data_dir` (see `write_style_dataset`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    values = {"pretrained_model_name_or_path": str(model_dir()), **RECIPE, "adapter": method, **overrides}
    return TrainingConfig(train_data_dir=str(data_dir), output_dir=str(output_dir), **values)


def train_command(data_dir: str, output_dir: str, method: str = "shira", **overrides) -> str:
    """The `shira-diffusion train` command line equivalent to `training_config` (values that differ from
    the trainer's defaults only)."""
    config = training_config("", data_dir, output_dir, method, **overrides)
    defaults = TrainingConfig(pretrained_model_name_or_path="", train_data_dir="")
    parts = ["shira-diffusion train", "--pretrained_model_name_or_path $(python -c 'import shira_diffusion.world as w; print(w.model_dir())')",
             f"--train_data_dir {data_dir}", f"--output_dir {output_dir}"]
    skip = {"pretrained_model_name_or_path", "train_data_dir", "output_dir"} | ({"rank"} if method == "shira" else {"shira_r", "mask"})
    for field in fields(TrainingConfig):
        value = getattr(config, field.name)
        if field.name in skip or value == getattr(defaults, field.name):
            continue
        text = " ".join(value) if isinstance(value, list) else value
        parts.append(f"--{field.name}" if value is True else f"--{field.name} {text}")
    return " ".join(parts)


def shipped_adapter(method: str, style: str) -> Path:
    """The packaged adapter file trained with the recipe: SHiRA's shira_weights.safetensors or the LoRA
    baseline's pytorch_lora_weights.safetensors, under world/adapters/<method>_<style>/."""
    folder = Path(str(resources.files("shira_diffusion").joinpath(f"world/adapters/{method}_{style.replace(' ', '_')}")))
    name = "shira_weights.safetensors" if method == "shira" else "pytorch_lora_weights.safetensors"
    if not (folder / name).is_file():
        raise FileNotFoundError(f"{folder / name}: no shipped {method} adapter for style {style!r}")
    return folder / name
