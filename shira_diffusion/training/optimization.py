"""The optimizer (AdamW, bitsandbytes' 8-bit AdamW or Prodigy, as diffusers' scripts choose them) and the
learning-rate schedule of a run.

Invariant: one param group per trained component, in the order of `trainables` (the denoiser first), each with
its own learning rate and weight decay; every schedule length counts optimizer steps, scaled by the process count
because the prepared scheduler steps once per process per optimizer step.

Usage:
    optimizer, decay = make_optimizer(config, trainables, denoiser="unet")
    scheduler = make_lr_scheduler(config, optimizer, max_steps, num_processes)
"""

from __future__ import annotations

import warnings

import torch

from ..trainables import Trainable
from ..training_config import TrainingConfig
from .checks import parse_step_rules


def make_optimizer(config: TrainingConfig, trainables: dict[str, Trainable], denoiser: str) -> tuple[torch.optim.Optimizer, dict[str, float]]:
    """(the optimizer, {component: weight decay}). Text encoders take --text_encoder_lr and
    --adam_weight_decay_text_encoder where given (diffusers' SDXL / SD3 / Flux scripts); under Prodigy every
    group takes --learning_rate, as there."""
    prodigy = config.optimizer.lower() == "prodigy"
    decay, groups = {}, []
    for component, trainable in trainables.items():
        text = component != denoiser
        decay[component] = config.adam_weight_decay_text_encoder if text and config.adam_weight_decay_text_encoder is not None else config.adam_weight_decay
        group = trainable.param_group(decay[component])
        if text and config.text_encoder_lr is not None and not prodigy:
            group["lr"] = config.text_encoder_lr
        groups.append(group)
    betas = (config.adam_beta1, config.adam_beta2)
    if prodigy:
        import prodigyopt

        if config.learning_rate <= 0.1:  # as diffusers' scripts: Prodigy's rate is a multiplier of its own estimate
            warnings.warn(f"--optimizer prodigy with --learning_rate {config.learning_rate}: Prodigy is usually run at 1.0", stacklevel=2)
        optimizer = prodigyopt.Prodigy(groups, lr=config.learning_rate, betas=betas, beta3=config.prodigy_beta3, eps=config.adam_epsilon,
                                       decouple=config.prodigy_decouple, use_bias_correction=config.prodigy_use_bias_correction,
                                       safeguard_warmup=config.prodigy_safeguard_warmup)
    elif config.use_8bit_adam:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(groups, lr=config.learning_rate, betas=betas, eps=config.adam_epsilon)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, eps=config.adam_epsilon)
    return optimizer, decay


def make_lr_scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer, max_steps: int, num_processes: int):
    """diffusers' get_scheduler for --lr_scheduler, every length (warmup, total, step rules) in optimizer steps."""
    from diffusers.optimization import get_scheduler

    step_rules = None
    if config.lr_step_rules is not None:
        pairs, last = parse_step_rules(config.lr_step_rules)
        step_rules = ",".join([f"{m}:{n * num_processes}" for m, n in pairs] + [str(last)])
    return get_scheduler(config.lr_scheduler, optimizer=optimizer, step_rules=step_rules,
                         num_warmup_steps=config.lr_warmup_steps * num_processes, num_training_steps=max_steps * num_processes,
                         num_cycles=config.lr_num_cycles, power=config.lr_power)
