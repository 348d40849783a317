"""Every check of a training config that can fail before a model loads, and the family defaults it fills in.

Invariant: `validate_config` raises (ConfigError, FileNotFoundError) before anything is loaded or written, naming
the flag, what it got and what it takes; it returns the config with the family's diffusers defaults filled in,
which is the config the run uses, logs and writes into the model card.

Usage: config, family = validate_config(TrainingConfig(pretrained_model_name_or_path="model/", train_data_dir="img/"))
"""

from __future__ import annotations

import math
from pathlib import Path

from ..checkpoints import find_checkpoint
from ..data import check_resolution
from ..families import FAMILIES, Family, UnknownFamilyError, family_of
from ..masks import MASK_TYPES
from ..trainables import ADAPTERS, IMPLS, SHIRA_IMPLS, ConfigError
from ..training_config import (MIXED_PRECISIONS, OPTIMIZERS, PRIOR_PRECISIONS, TRACKERS, WEIGHTING_SCHEMES, TrainingConfig,
                               with_family_defaults)

POSITIVE_INTS = ("shira_r", "rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "calibration_batches",
                 "sample_batch_size", "lr_num_cycles", "validation_epochs", "repeats", "num_class_images", "checkpoints_total_limit",
                 "num_validation_images", "validation_inference_steps", "max_sequence_length")
NON_NEGATIVE_INTS = ("lr_warmup_steps", "checkpointing_steps", "dataloader_num_workers", "validation_steps")  # 0: off
POSITIVE_FLOATS = ("learning_rate", "max_grad_norm", "lr_power", "snr_gamma", "logit_std", "guidance_scale")
NON_NEGATIVE_FLOATS = ("adam_weight_decay", "adam_weight_decay_text_encoder", "adam_epsilon", "noise_offset", "prior_loss_weight",
                       "text_encoder_lr")
FINITE = POSITIVE_FLOATS + NON_NEGATIVE_FLOATS + ("logit_mean", "mode_scale", "prodigy_beta3")


def validate_config(config: TrainingConfig) -> tuple[TrainingConfig, type[Family]]:
    """(the config with its family's defaults, the family) or a ConfigError / FileNotFoundError naming the flag."""
    _check_choices(config)
    _check_flag_pairs(config)
    _check_output_dir(config)
    family = _check_model_family(config)
    config = with_family_defaults(config, family.name)
    _check_family_flags(config, family)
    check_resolution(config.resolution)
    _check_numbers(config)
    _check_scheduler(config)
    _check_optional_packages(config)
    if config.max_train_steps is None and config.num_train_epochs < 1:
        raise ConfigError("give --max_train_steps or --num_train_epochs >= 1")
    if config.pretrained_vae_model_name_or_path:
        _check_model(config.pretrained_vae_model_name_or_path, "config.json", config.revision, "--pretrained_vae_model_name_or_path")
    if config.resume_from_checkpoint and config.resume_from_checkpoint != "latest":
        find_checkpoint(Path(config.output_dir), config.resume_from_checkpoint)
    return config, family


def _check_choices(config: TrainingConfig) -> None:
    """Each flag with a list of choices has one of them (the lists come from the registries the CLI uses too)."""
    from diffusers.optimization import SchedulerType

    choices = {"adapter": ADAPTERS, "impl": IMPLS, "mixed_precision": (None, *MIXED_PRECISIONS),
               "prior_generation_precision": (None, *PRIOR_PRECISIONS), "weighting_scheme": (None, *WEIGHTING_SCHEMES),
               "lr_scheduler": tuple(kind.value for kind in SchedulerType)}
    if not callable(config.mask):  # a mask function from Python is checked on what it returns
        choices["mask"] = MASK_TYPES
    for flag, allowed in choices.items():
        if getattr(config, flag) not in allowed:
            raise ConfigError(f"--{flag} must be one of {[a for a in allowed if a is not None]}, got {getattr(config, flag)!r}")
    if config.optimizer.lower() not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {list(OPTIMIZERS)} (any case), got {config.optimizer!r}")
    if config.report_to not in ("none", "all", *TRACKERS):
        raise ConfigError(f"--report_to must be none, all or one of {list(TRACKERS)}, got {config.report_to!r}")


def _check_flag_pairs(config: TrainingConfig) -> None:
    """Flags that need, or exclude, another one (checked on the flags as given, before defaults are filled)."""
    if (config.train_data_dir is None) == (config.dataset_name is None):
        raise ConfigError("give exactly one of --dataset_name (a Hub or saved dataset) and --train_data_dir / --instance_data_dir (a folder)")
    if config.text_encoder_lr is not None and not config.train_text_encoder:
        raise ConfigError(f"--text_encoder_lr {config.text_encoder_lr} needs --train_text_encoder")
    if config.adam_weight_decay_text_encoder is not None and not config.train_text_encoder:
        raise ConfigError("--adam_weight_decay_text_encoder needs --train_text_encoder")
    if config.with_prior_preservation and (not config.class_data_dir or not config.class_prompt):
        raise ConfigError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if config.hub_token is not None and config.report_to in ("wandb", "all"):  # diffusers' scripts refuse it too
        raise ConfigError("--hub_token with --report_to wandb would expose the token in the run's config; log in with `hf auth login` instead")
    if (config.lr_scheduler == "piecewise_constant") != (config.lr_step_rules is not None):
        raise ConfigError("--lr_scheduler piecewise_constant and --lr_step_rules go together")
    if config.optimizer.lower() == "prodigy" and config.use_8bit_adam:
        raise ConfigError("--use_8bit_adam is for --optimizer adamw, not prodigy")
    if config.optimizer.lower() == "prodigy" and config.adapter == "shira" and SHIRA_IMPLS[config.impl].trains_full_weights:
        # the hook impl applies AdamW's decay by hand at the rate it is given; Prodigy's rate is its own estimate
        raise ConfigError("--optimizer prodigy trains SHiRA with --impl sparse (the default), not --impl hook")


def _check_output_dir(config: TrainingConfig) -> None:
    if config.output_dir is None:
        return  # the family's default folder name, relative to the working directory
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir}: exists and is not a folder")
    existing = next((parent for parent in output_dir.absolute().parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():  # mkdir would fail only after the models load
        raise ConfigError(f"--output_dir {output_dir}: {existing} is a file, not a folder")


def _check_model_family(config: TrainingConfig) -> type[Family]:
    index = _check_model(config.pretrained_model_name_or_path, "model_index.json", config.revision, "--pretrained_model_name_or_path")
    try:
        return family_of(index)
    except UnknownFamilyError as error:
        raise ConfigError(f"{config.pretrained_model_name_or_path}: {error}") from None


def _check_family_flags(config: TrainingConfig, family: type[Family]) -> None:
    """Loss flags of one kind of training given to a family trained the other way."""
    flow = [name for name, f in FAMILIES.items() if f.denoiser == "transformer"]
    ddpm = [name for name in FAMILIES if name not in flow]
    if family.name in flow:
        given = [flag for flag in ("snr_gamma", "noise_offset") if getattr(config, flag)]
        kind, others = "DDPM", ddpm
    else:
        given = [flag for flag in ("weighting_scheme", "max_sequence_length") if getattr(config, flag) is not None]
        kind, others = "flow-matching", flow
    if given:
        raise ConfigError(f"--{given[0]} is for {kind} families ({', '.join(others)}); "
                          f"{config.pretrained_model_name_or_path} is a {family.name} model")


def _check_numbers(config: TrainingConfig) -> None:
    """Counts, rates and weights in range. `not x > 0` (not `x <= 0`) so that nan is refused too."""
    for flag in POSITIVE_INTS:
        value = getattr(config, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag} must be a positive integer, got {value}")
    for flag in NON_NEGATIVE_INTS:
        if getattr(config, flag) is not None and getattr(config, flag) < 0:
            raise ConfigError(f"--{flag} must be >= 0, got {getattr(config, flag)}")
    for flag in POSITIVE_FLOATS:
        value = getattr(config, flag)
        if value is not None and not value > 0:
            raise ConfigError(f"--{flag} must be > 0, got {value}")
    for flag in NON_NEGATIVE_FLOATS:
        value = getattr(config, flag)
        if value is not None and not value >= 0:
            raise ConfigError(f"--{flag} must be >= 0, got {value}")
    for flag in FINITE:  # after the ranges: inf passes `> 0`
        value = getattr(config, flag)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{flag} must be a finite number, got {value}")
    if not 0 < config.density <= 1:
        raise ConfigError(f"--density must be in (0, 1], got {config.density}")
    for flag in ("adam_beta1", "adam_beta2", "lora_dropout"):
        if not 0 <= getattr(config, flag) < 1:
            raise ConfigError(f"--{flag} must be in [0, 1), got {getattr(config, flag)}")
    if config.prodigy_beta3 is not None and not 0 < config.prodigy_beta3 < 1:
        raise ConfigError(f"--prodigy_beta3 must be in (0, 1), got {config.prodigy_beta3}")


def _check_scheduler(config: TrainingConfig) -> None:
    if config.lr_step_rules is not None:
        parse_step_rules(config.lr_step_rules)


def parse_step_rules(rules: str) -> tuple[list[tuple[float, int]], float]:
    """diffusers' "multiplier:until_step,...,last_multiplier" rules as ([(multiplier, step), ...], last)."""
    *pairs, last = rules.split(",")
    try:
        parsed = [(float(m), int(n)) for m, n in (pair.split(":") for pair in pairs)]
        return parsed, float(last)
    except ValueError:
        raise ConfigError(f"--lr_step_rules {rules!r}: expected multiplier:step,...,multiplier, e.g. 1:100,0.1:200,0.01") from None


def _check_optional_packages(config: TrainingConfig) -> None:
    """Flags that need a package this install may lack: an error now, not a silent no-op or a late crash."""
    import importlib.util

    import accelerate.utils

    name = config.report_to
    if name not in ("none", "all") and not getattr(accelerate.utils, f"is_{name}_available")():  # as diffusers: not a silent no-op
        raise ConfigError(f"--report_to {name}: {name} is not installed (pip install {name.replace('_', '-')}), or use --report_to none")
    needs = []
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        needs.append(("--use_8bit_adam", "bitsandbytes", ""))
    if config.optimizer.lower() == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        needs.append(("--optimizer prodigy", "prodigyopt", " (or pip install 'shira-diffusion[prodigy]')"))
    if config.enable_xformers_memory_efficient_attention:
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            needs.append(("--enable_xformers_memory_efficient_attention", "xformers",
                          "; without the flag, PyTorch's scaled_dot_product_attention is used"))
    if needs:
        flag, package, hint = needs[0]
        raise ConfigError(f"{flag} needs {package} (pip install {package}){hint}")


def _check_model(model: str, config_name: str, revision: str | None, flag: str) -> dict:
    """The model's config (model_index.json for a pipeline, config.json for a VAE), from a local folder or the
    Hub, before any weights load; a clear error for a missing folder, a folder that is not a diffusers model
    or a Hub id that cannot be reached."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    path = Path(model)
    if path.is_dir():
        if not (path / config_name).is_file():
            kind = "diffusers model folder (e.g. saved with pipe.save_pretrained)" if config_name == "model_index.json" else "diffusers VAE folder"
            raise ConfigError(f"{flag} {model}: no {config_name} in this folder; expected a {kind}")
    elif path.exists() or model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1:
        raise FileNotFoundError(f"{model}: no such model folder (give a diffusers model folder or a Hub id)")
    loader = DiffusionPipeline if config_name == "model_index.json" else AutoencoderKL
    try:
        return loader.load_config(str(path) if path.is_dir() else model, revision=revision)
    except (OSError, ValueError) as error:  # diffusers raises EnvironmentError for missing / unreachable files
        if path.is_dir():
            raise ConfigError(f"{flag} {model}: unreadable {config_name} ({error})") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{flag} {model}: no such local folder, and the Hub could not provide it as a model id "
                          f"(offline, not logged in, or no such repo?): {reason}") from None
