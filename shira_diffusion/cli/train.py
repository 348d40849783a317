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
    "mask": "SHiRA mask (default snip)",
    "density": "fraction of each target weight to train (default 0.02)",
    "shira_r": "PEFT-style budget r*(m+n) per weight instead of --density (a rank-r LoRA's parameter count)",
    "impl": "sparse: only the masked values are parameters (default); hook: full weights + gradient mask",
    "target_modules": "UNet module name suffixes to adapt (default: to_q to_k to_v to_out.0 ff.net.0.proj ff.net.2)",
    "target_conv": "also adapt every Conv2d weight of the UNet (viewed as out x in*kh*kw)",
    "calibration_batches": "training batches used to score weights for the grad and snip masks",
    "rank": "LoRA rank for --adapter lora (default 64)",
    "resume_from_checkpoint": "a checkpoint-N folder, or 'latest' (starts fresh when there is none)",
    "report_to": "tensorboard (default), wandb, all or none",
    "validation_steps": "generate validation images every N optimizer steps (and at the end)",
    "train_text_encoder": "also adapt the text encoder(s): q_proj k_proj v_proj out_proj fc1 fc2",
    "pretrained_vae_model_name_or_path": "a VAE folder or Hub id to use instead of the model's (e.g. an fp16-safe SDXL VAE)",
    "scale_lr": "multiply --learning_rate by accumulation steps x batch size x processes",
    "lr_num_cycles": "restarts of cosine_with_restarts (default 1)",
    "lr_power": "power of the polynomial schedule (default 1.0)",
    "allow_tf32": "TF32 matmuls on Ampere+ GPUs",
    "sample_batch_size": "batch size for generating prior-preservation class images (default 4)",
    "prior_generation_precision": "dtype for generating class images (default fp16 on GPU, fp32 on CPU)",
    "push_to_hub": "upload the output folder (adapter, model card, samples; not checkpoints) to the Hub at the end",
    "hub_model_id": "Hub repo for --push_to_hub (default: the output folder's name)",
    "no_progress_bar": "no training progress bar (e.g. inside a caller's own progress display)",
    "license": "licence for the model card (default: the base model's, read offline, else 'other')",
    "hub_token": "Hub token (prefer `hf auth login`; refused with --report_to wandb)",
    "text_encoder_lr": "learning rate of the text encoder(s) with --train_text_encoder (default: --learning_rate)",
    "validation_epochs": "also generate validation images after every N epochs (diffusers' DreamBooth scripts' unit)",
    "lora_dropout": "dropout of the LoRA baseline's layers (default 0)",
    "repeats": "repeat each training image this many times per epoch (diffusers' SDXL script; default 1)",
    "adam_weight_decay_text_encoder": "weight decay of the text encoder(s) with --train_text_encoder (default: --adam_weight_decay)",
    "enable_xformers_memory_efficient_attention": "use xformers' attention in the UNet (needs xformers installed)",
    "lr_scheduler": "a diffusers get_scheduler name (default cosine); piecewise_constant takes --lr_step_rules",
    "lr_step_rules": "piecewise_constant rules 'multiplier:until_step,...,last_multiplier' in optimizer steps, e.g. 1:500,0.1:800,0.01",
    "num_class_images": "class images for prior preservation: generated up to this count, and at most this many used (default 100)",
}
ALIASES = {"train_data_dir": ("--instance_data_dir",)}  # diffusers' DreamBooth scripts call it that
CHOICES = {
    "adapter": ("shira", "lora"),
    "mask": ("struct", "rand", "wm", "grad", "snip"),
    "impl": ("sparse", "hook"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "prior_generation_precision": ("no", "fp32", "fp16", "bf16"),
    "lr_scheduler": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "piecewise_constant"),
}


def _flag_type(annotation: str):
    for name, kind in (("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training_config import TrainingConfig

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
            parser.add_argument(flag, *ALIASES.get(field.name, ()), type=_flag_type(annotation), default=default, required=required,
                                choices=CHOICES.get(field.name), help=help_text or f"(default: {default})")
    # Launchers such as torch.distributed.launch pass --local_rank; accelerate reads LOCAL_RANK itself, so the
    # value is accepted and not otherwise used (not a TrainingConfig field).
    parser.add_argument("--local_rank", type=int, default=-1, help="accepted for launchers that pass it (accelerate reads LOCAL_RANK)")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..training import config_from_dict, train

    result = train(config_from_dict(vars(args)))
    if PartialState().is_main_process:  # one line under `accelerate launch`, not one per process
        print(f"saved {result.adapter_path} after {result.global_step} steps ({result.trainable_parameters:,} trainable parameters)")
    return 0
