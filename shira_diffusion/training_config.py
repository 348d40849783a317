"""The trainer's settings: every `shira-diffusion train` flag, as one dataclass (no torch: the CLI builds its
parser from these fields without importing the trainer).

Invariant: names and meanings follow diffusers' DreamBooth LoRA scripts; `training.validate_config` checks a
config before any model loads.

Usage: TrainingConfig(pretrained_model_name_or_path="model/", train_data_dir="images/", mask="struct")
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

SECRET_FIELDS = ("hub_token",)  # never logged: not in tracker configs, hparams files or the model card
PATH_FIELDS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "train_data_dir", "output_dir",
               "class_data_dir", "logging_dir", "resume_from_checkpoint")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class TrainingConfig:
    """Every `shira-diffusion train` flag; names and meanings follow diffusers' train_dreambooth_lora.py.

    Usage: TrainingConfig(pretrained_model_name_or_path="model/", train_data_dir="images/", mask="struct")
    """

    pretrained_model_name_or_path: str
    train_data_dir: str
    output_dir: str = "shira-model"
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
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    repeats: int = 1
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int = 1
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None
    scale_lr: bool = False
    lr_scheduler: str = "cosine"
    lr_step_rules: str | None = None
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_weight_decay_text_encoder: float | None = None
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    mixed_precision: str | None = None
    allow_tf32: bool = False
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    seed: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_steps: int = 100
    validation_epochs: int | None = None
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
    mask: str = "snip"
    density: float = 0.02
    shira_r: int | None = None
    impl: str = "sparse"
    target_modules: list[str] | None = None
    target_conv: bool = False
    calibration_batches: int = 4
    rank: int = 64
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
