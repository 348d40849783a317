"""The trainer's settings: every `shira-diffusion train` flag, as one dataclass (no torch: the CLI builds its
parser from these fields without importing the trainer), and diffusers' defaults per pipeline family.

Invariant: a flag named like a flag of diffusers' DreamBooth LoRA script for the family being trained means
what it means there and has that script's default. `SCRIPT_DEFAULTS` is the one copy of those defaults: a
field whose default differs between families is None here and filled from the table by `with_family_defaults`
(the trainer does that once it knows the family); every other field's default here equals the table's.
`training.validate_config` checks a config before any model loads.

Usage: config = with_family_defaults(TrainingConfig(pretrained_model_name_or_path="model/", train_data_dir="images/"), "sdxl")
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

class ConfigError(ValueError):
    """A training option is invalid; raised before anything is trained."""


SECRET_FIELDS = ("hub_token",)  # never logged: not in tracker configs, hparams files or the model card
PATH_FIELDS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "train_data_dir", "output_dir",
               "class_data_dir", "logging_dir", "resume_from_checkpoint", "cache_dir")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")
OPTIMIZERS = ("adamw", "prodigy")  # --optimizer, matched case-insensitively as diffusers' scripts do ("AdamW")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")  # diffusers.training_utils
MIXED_PRECISIONS = ("no", "fp16", "bf16")  # --mixed_precision (None: accelerate's config)
PRIOR_PRECISIONS = ("no", "fp32", "fp16", "bf16")  # --prior_generation_precision (None: fp16 on GPU, fp32 on CPU)

# The defaults of diffusers' examples/dreambooth/train_dreambooth_lora.py (sd), _sdxl.py, _sd3.py and _flux.py
# (main at 58eb52c, 2026-08-23) for every flag of theirs this trainer has (store_true flags default to off in
# all of them and are not listed). A family whose script lacks a flag takes this trainer's own default.
_COMMON = dict(
    train_batch_size=4, sample_batch_size=4, num_train_epochs=1, max_train_steps=None, gradient_accumulation_steps=1,
    checkpointing_steps=500, checkpoints_total_limit=None, resume_from_checkpoint=None, lr_scheduler="constant",
    lr_warmup_steps=500, lr_num_cycles=1, lr_power=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
    max_grad_norm=1.0, rank=4, lora_dropout=0.0, num_validation_images=4, validation_epochs=50, validation_prompt=None,
    prior_loss_weight=1.0, num_class_images=100, class_prompt=None, class_data_dir=None, instance_prompt=None,
    report_to="tensorboard", logging_dir="logs", seed=None, mixed_precision=None, prior_generation_precision=None,
    revision=None, variant=None, hub_model_id=None, hub_token=None,
)
_DATASET_AND_OPTIMIZER = dict(  # the SDXL, SD3 and Flux scripts' data and optimizer flags
    dataset_name=None, dataset_config_name=None, cache_dir=None, image_column="image", caption_column=None, repeats=1,
    optimizer="AdamW", prodigy_beta3=None, prodigy_decouple=True, prodigy_use_bias_correction=True,
    prodigy_safeguard_warmup=True, text_encoder_lr=5e-6, adam_weight_decay=1e-4, adam_weight_decay_text_encoder=1e-3,
)
_FLOW = dict(logit_mean=0.0, logit_std=1.0, mode_scale=1.29)  # SD3's and Flux's timestep sampling
SCRIPT_DEFAULTS: dict[str, dict[str, object]] = {
    # SD 1.x/2.x: the text encoder trains at --learning_rate with --adam_weight_decay (no separate flags)
    "sd": dict(_COMMON, output_dir="lora-dreambooth-model", resolution=512, learning_rate=5e-4, adam_weight_decay=1e-2,
               text_encoder_lr=None, adam_weight_decay_text_encoder=None),
    "sdxl": dict(_COMMON, **_DATASET_AND_OPTIMIZER, output_dir="lora-dreambooth-model", resolution=1024, learning_rate=1e-4,
                 snr_gamma=None, pretrained_vae_model_name_or_path=None),
    "sd3": dict(_COMMON, **_DATASET_AND_OPTIMIZER, **_FLOW, output_dir="sd3-dreambooth", resolution=512, learning_rate=1e-4,
                max_sequence_length=77, weighting_scheme="logit_normal", precondition_outputs=1),
    "flux": dict(_COMMON, **_DATASET_AND_OPTIMIZER, **_FLOW, output_dir="flux-dreambooth-lora", resolution=512,
                 learning_rate=1e-4, max_sequence_length=512, weighting_scheme="none", guidance_scale=3.5),
}
FAMILIES = tuple(SCRIPT_DEFAULTS)
# Flags whose default differs between the families that have them: None in TrainingConfig, filled per family.
FAMILY_DEFAULTED = tuple(sorted({flag for table in SCRIPT_DEFAULTS.values() for flag in table
                                 if len({repr(t[flag]) for t in SCRIPT_DEFAULTS.values() if flag in t}) > 1}))


@dataclass
class TrainingConfig:
    """Every `shira-diffusion train` flag; names and meanings follow diffusers' train_dreambooth_lora.py.

    Usage: TrainingConfig(pretrained_model_name_or_path="model/", train_data_dir="images/", mask="struct")
    """

    pretrained_model_name_or_path: str
    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    image_column: str = "image"
    caption_column: str | None = None
    cache_dir: str | None = None
    output_dir: str | None = None
    revision: str | None = None
    variant: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    instance_prompt: str | None = None
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4
    prior_generation_precision: str | None = None
    resolution: int | None = None
    center_crop: bool = False
    random_flip: bool = False
    repeats: int = 1
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int = 1
    learning_rate: float | None = None
    text_encoder_lr: float | None = None
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_step_rules: str | None = None
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float | None = None
    adam_weight_decay_text_encoder: float | None = None
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optimizer: str = "AdamW"
    prodigy_beta3: float | None = None
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    use_8bit_adam: bool = False
    mixed_precision: str | None = None
    allow_tf32: bool = False
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    weighting_scheme: str | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: int = 1
    guidance_scale: float = 3.5
    max_sequence_length: int | None = None
    seed: int | None = None
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_steps: int | None = None
    validation_epochs: int = 50
    validation_inference_steps: int = 25
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    train_text_encoder: bool = False
    dataloader_num_workers: int = 0
    push_to_hub: bool = False
    hub_model_id: str | None = None
    license: str | None = None
    no_progress_bar: bool = False
    hub_token: str | None = None
    adapter: str = "shira"
    mask: str | Callable = "snip"  # from Python also a mask function or masks.Mask (see masks.MaskFn)
    density: float = 0.02
    shira_r: int | None = None
    impl: str = "sparse"
    target_modules: list[str] | None = None
    target_conv: bool = False
    calibration_batches: int = 4
    rank: int = 4
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        # pathlib.Path (any os.PathLike) from Python callers: stored as str, which is what the Hub / diffusers
        # calls, string checks and the adapter's JSON metadata expect.
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))

    def loggable(self) -> dict[str, str]:
        """The settings as strings for trackers and hparams files, without secrets (--hub_token)."""
        return {k: str(v) for k, v in asdict(self).items() if k not in SECRET_FIELDS}


def with_family_defaults(config: TrainingConfig, family: str) -> TrainingConfig:
    """`config` with each flag left at None that diffusers' script for `family` gives a default filled with it.

    Usage: config = with_family_defaults(config, "flux")   # resolution 512, learning rate 1e-4, ...
    """
    table = SCRIPT_DEFAULTS[family]
    return replace(config, **{flag: table[flag] for flag in FAMILY_DEFAULTED if flag in table and getattr(config, flag) is None})


def family_default_help(flag: str) -> str:
    """'sd 512, sdxl 1024, sd3 512, flux 512': the per-family defaults of a FAMILY_DEFAULTED flag, for --help."""
    return ", ".join(f"{family} {table[flag]}" for family, table in SCRIPT_DEFAULTS.items() if flag in table)


def config_from_dict(values: dict) -> TrainingConfig:
    """A TrainingConfig from a dict (e.g. argparse vars), ignoring unknown keys."""
    names = {field.name for field in fields(TrainingConfig)}
    return TrainingConfig(**{k: v for k, v in values.items() if k in names})
