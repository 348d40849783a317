"""`shira-diffusion train`: flags are TrainingConfig's fields (diffusers' DreamBooth names and defaults where one
exists); every list of choices comes from the registry the trainer checks against.

Usage: shira-diffusion train --pretrained_model_name_or_path PATH --instance_data_dir DIR --instance_prompt "in sks style" --mask struct
"""

from __future__ import annotations

import argparse
import dataclasses

HELP = {
    "pretrained_model_name_or_path": "diffusers model folder or Hub id: an SD 1.x/2.x, SDXL, SD3 or Flux pipeline (found from its model_index.json)",
    "train_data_dir": "image folder: metadata.jsonl (file_name, text), a .txt caption beside each image, or --instance_prompt for all",
    "dataset_name": "a Hub dataset id, a dataset folder, or a dataset saved with save_to_disk (read with the datasets library)",
    "dataset_config_name": "the dataset's configuration, if it has several",
    "image_column": "the dataset's image column (default image)",
    "caption_column": "the dataset's caption column (default: every image gets --instance_prompt)",
    "cache_dir": "where the datasets library caches downloaded datasets",
    "instance_prompt": "caption for images without one (DreamBooth trigger prompt)",
    "adapter": "shira (default) or lora: the LoRA baseline on the same loop, targets and schedule",
    "density": "fraction of each target weight to train (default 0.02)",
    "shira_r": "PEFT-style budget r*(m+n) per weight instead of --density (a rank-r LoRA's parameter count)",
    "impl": "sparse: only the masked values are parameters (default); hook: full weights + gradient mask",
    "target_modules": "denoiser module name suffixes to adapt (default: the family's diffusers LoRA targets); also comma-separated",
    "target_conv": "also adapt every Conv2d weight of the UNet (viewed as out x in*kh*kw)",
    "calibration_batches": "training batches used to score weights for the gradient masks",
    "rank": "LoRA rank for --adapter lora (default 4)",
    "resume_from_checkpoint": "a checkpoint-N folder, or 'latest' (starts fresh when there is none)",
    "report_to": "tensorboard (default), wandb, all or none",
    "validation_steps": "also generate validation images every N optimizer steps (default: only per --validation_epochs and at the end)",
    "validation_epochs": "generate validation images after every N epochs (default 50) and at the end",
    "train_text_encoder": "also adapt the text encoders the family's diffusers script trains (q/k/v/out_proj)",
    "pretrained_vae_model_name_or_path": "a VAE folder or Hub id to use instead of the model's (e.g. an fp16-safe SDXL VAE)",
    "scale_lr": "multiply --learning_rate by accumulation steps x batch size x processes",
    "optimizer": "AdamW (default) or prodigy (pip install 'shira-diffusion[prodigy]'; usually with --learning_rate 1.0)",
    "allow_tf32": "TF32 matmuls on Ampere+ GPUs",
    "prior_generation_precision": "dtype for generating class images (default fp16 on GPU, fp32 on CPU)",
    "push_to_hub": "upload the output folder (adapter, model card, samples; not checkpoints) to the Hub at the end",
    "no_progress_bar": "no training progress bar (e.g. inside a caller's own progress display)",
    "license": "licence for the model card (default: the base model's, read offline, else 'other')",
    "hub_token": "Hub token (prefer `hf auth login`; refused with --report_to wandb)",
    "text_encoder_lr": "learning rate of the text encoders with --train_text_encoder",
    "adam_weight_decay_text_encoder": "weight decay of the text encoders with --train_text_encoder",
    "lora_dropout": "dropout of the LoRA baseline's layers (default 0)",
    "repeats": "repeat each training image this many times per epoch (default 1)",
    "enable_xformers_memory_efficient_attention": "use xformers' attention in the denoiser (needs xformers installed)",
    "lr_scheduler": "any diffusers get_scheduler name (default constant, as diffusers' scripts); piecewise_constant takes --lr_step_rules",
    "lr_step_rules": "piecewise_constant rules 'multiplier:until_step,...,last_multiplier' in optimizer steps, e.g. 1:500,0.1:800,0.01",
    "num_class_images": "class images for prior preservation: generated up to this count, and at most this many used (default 100)",
    "snr_gamma": "Min-SNR weighting gamma (UNet families; recommended 5.0)",
    "noise_offset": "noise offset (UNet families)",
    "weighting_scheme": "flow-matching timestep sampling / loss weighting (SD3, Flux)",
    "precondition_outputs": "SD3: 1 precondition the prediction to x (EDM style), 0 predict noise - x",
    "guidance_scale": "Flux: the guidance a guidance-distilled transformer is trained at",
    "max_sequence_length": "T5 tokens per prompt (SD3, Flux)",
    "seed": "random seed (default: a fresh one per run, recorded in the adapter and its card)",
}
ALIASES = {"train_data_dir": ("--instance_data_dir",), "target_modules": ("--lora_layers",)}  # diffusers' scripts' names


def _choices() -> dict[str, tuple]:
    """Each flag's choices, from the torch-free registries the trainer validates against (one source each).
    --lr_scheduler is any name of diffusers' get_scheduler, checked by the trainer (diffusers is the source)."""
    from ..masks import MASK_TYPES
    from ..trainables import ADAPTERS, IMPLS
    from ..training_config import MIXED_PRECISIONS, PRIOR_PRECISIONS, WEIGHTING_SCHEMES

    return {"adapter": ADAPTERS, "mask": MASK_TYPES, "impl": IMPLS, "mixed_precision": MIXED_PRECISIONS,
            "prior_generation_precision": PRIOR_PRECISIONS, "weighting_scheme": WEIGHTING_SCHEMES}


def _mask_help() -> str:
    from ..masks import MASKS

    return "SHiRA mask (default snip): " + "; ".join(f"{name}: {mask.help}" for name, mask in MASKS.items())


def _flag_type(annotation: str):
    for name, kind in (("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


def _boolean(text: str) -> bool:
    """argparse type for on-by-default switches: --prodigy_decouple false (diffusers' type=bool reads 'False' as True)."""
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text}")
    return lowered in ("true", "1", "yes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training_config import FAMILY_DEFAULTED, OPTIMIZERS, TrainingConfig, family_default_help

    choices = _choices()
    help_texts = {**HELP, "mask": _mask_help()}
    for field in dataclasses.fields(TrainingConfig):
        flag, annotation = f"--{field.name}", str(field.type)
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        help_text = help_texts.get(field.name, "")
        if field.name in FAMILY_DEFAULTED:
            help_text = f"{help_text} (default per family, as diffusers' scripts: {family_default_help(field.name)})".lstrip()
        if annotation == "bool" and field.default is True:
            parser.add_argument(flag, type=_boolean, nargs="?", const=True, default=True, help=help_text or "(default: true)")
        elif annotation == "bool":
            parser.add_argument(flag, action="store_true", help=help_text)
        elif annotation.startswith("list"):
            parser.add_argument(flag, *ALIASES.get(field.name, ()), nargs="+", default=None, help=help_text)
        else:
            default = None if required else field.default
            kwargs = {"choices": choices.get(field.name)}
            if field.name == "optimizer":  # diffusers' scripts compare it lower-cased: AdamW, adamw, ...
                kwargs = {"type": str.lower, "choices": OPTIMIZERS}
            parser.add_argument(flag, *ALIASES.get(field.name, ()), **{"type": _flag_type(annotation), **kwargs}, default=default,
                                required=required, help=help_text or f"(default: {default})")
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
