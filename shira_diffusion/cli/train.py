"""`shira-diffusion train`: flags are TrainingConfig's fields (diffusers' DreamBooth names where one exists).

Usage: shira-diffusion train --pretrained_model_name_or_path PATH --train_data_dir DIR --output_dir OUT --mask struct
"""

from __future__ import annotations

import argparse
import dataclasses


HELP = {
    "pretrained_model_name_or_path": "diffusers model folder or Hub id (SD 1.x/2.x or SDXL)",
    "train_data_dir": "image folder with metadata.jsonl (file_name, text) or a .txt caption beside each image",
    "instance_prompt": "caption for images without one (DreamBooth trigger prompt)",
    "adapter": "shira (default) or lora: the LoRA baseline on the same loop, targets and schedule",
    "mask": "SHiRA mask: struct, rand, wm, grad or snip",
    "density": "fraction of each target weight to train (default 0.02)",
    "shira_r": "PEFT-style budget r*(m+n) per weight instead of --density (equals a rank-r LoRA's count)",
    "impl": "sparse (only masked values are parameters; default) or hook (gradient masking)",
    "target_modules": "module name suffixes to adapt (default: to_q to_k to_v to_out.0 ff.net.0.proj ff.net.2)",
    "target_conv": "also adapt every Conv2d weight of the UNet",
    "calibration_batches": "batches used to score weights for the grad and snip masks",
    "rank": "LoRA rank for --adapter lora",
    "resume_from_checkpoint": "a checkpoint folder, or 'latest'",
    "report_to": "tensorboard (default), wandb, all or none",
}


def _flag_type(annotation: str):
    for name, kind in (("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training import TrainingConfig  # light: the training module imports torch lazily where heavy

    for field in dataclasses.fields(TrainingConfig):
        flag, annotation = f"--{field.name}", str(field.type)
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        help_text = HELP.get(field.name, "")
        if annotation == "bool":
            parser.add_argument(flag, action="store_true", help=help_text)
        elif annotation.startswith("list"):
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            default = None if required else field.default
            parser.add_argument(flag, type=_flag_type(annotation), default=default, required=required, help=help_text or f"(default: {default})")


def run(args: argparse.Namespace) -> int:
    from ..training import config_from_dict, train

    result = train(config_from_dict(vars(args)))
    print(f"saved {result.adapter_path} after {result.global_step} steps ({result.trainable_parameters:,} trainable parameters)")
    return 0



