"""The training run: one accelerate loop over the family's loss, for SHiRA (sparse or hook) and the LoRA baseline.

What is trained lives in `trainables` (one class per kind, one protocol), how a family noises, conditions and
predicts in `families`, the checks before anything loads in `checks`, the optimizer in `optimization`, the mask
file in `run_masks`, prior preservation in `prior`, and what the run writes in `outputs`. This module sets the
run up and reads top to bottom as the loop.

Invariant: a run resumed from checkpoint-N draws the same batches, noise and timesteps as an uninterrupted one
(the sampler is reseeded per epoch, augmentations are seeded by (seed, epoch, index), the noise generator is in
the checkpoint), so both end with the same adapter.

Usage:
    result = train(TrainingConfig(pretrained_model_name_or_path="model/", train_data_dir="img/", output_dir="out"))
    pipe.load_shira_weights(result.adapter_path)
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CHECKPOINT_NAME, TrainedState, checkpoint_seed, find_checkpoint, remove_stale_temps, save_checkpoint
from ..data import DataSource, ImageCaptions, StyleDataset, collate, load_examples
from ..families import Family, load_family
from ..trainables import SHIRA_IMPLS, ConfigError, Trainable, find_targets, make_trainable
from ..training_config import TrainingConfig
from .checks import validate_config
from .optimization import make_lr_scheduler, make_optimizer
from .outputs import OUTPUT_FILES, create_hub_repo, push_to_hub, save_adapter, validation_images
from .prior import PriorPairs, class_examples, collate_pairs, generate_class_images
from .run_masks import load_or_build_masks


@dataclass
class TrainingResult:
    """What `train` produced and measured. `losses` has one entry per optimizer step (mean over the
    accumulated micro-batches and processes), `learning_rates` the denoiser's rate at each of those steps;
    `peak_memory_bytes` is torch.cuda.max_memory_allocated on GPU, the process's max RSS on CPU;
    `steps_per_second` excludes validation and checkpoint saving; `seed` is --seed, or the one drawn for the run."""

    adapter_path: Path
    output_dir: Path
    global_step: int
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    steps_per_second: float = 0.0
    seed: int = 0


def train(config: TrainingConfig) -> TrainingResult:
    """Run one training job (SHiRA or the LoRA baseline) on an SD 1.x/2.x, SDXL, SD3 or Flux pipeline.

    Usage: result = train(TrainingConfig(pretrained_model_name_or_path="model/", train_data_dir="img/", output_dir="out"))
    """
    from accelerate.utils import DistributedType, set_seed

    # 1. Everything that can fail before a model loads: flags, the model's family, the data, the checkpoint.
    config, family_class = validate_config(config)
    examples = load_examples(_data_source(config))
    output_dir = Path(config.output_dir)
    checkpoint = find_checkpoint(output_dir, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    seed = _run_seed(config, checkpoint)
    accelerator = _make_accelerator(config, output_dir)
    hub_repo_id = create_hub_repo(config, output_dir) if config.push_to_hub and accelerator.is_main_process else None
    set_seed(seed)
    if config.scale_lr:  # diffusers' --scale_lr: the rate per sample, times the samples of one optimizer step
        config = replace(config, learning_rate=config.learning_rate * config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes)

    # 2. Models, data, what is trained, the optimizer.
    family = load_family(config, family_class)
    components = _freeze_and_place(config, family, accelerator)
    dataloader, order = _make_dataloader(config, examples, seed, accelerator)
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        remove_stale_temps(output_dir, OUTPUT_FILES)
    trainables = _make_trainables(config, seed, family, components, dataloader, accelerator)
    optimizer, decay = make_optimizer(config, trainables, family.denoiser)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):  # they swap weights / values
        for trainable in trainables.values():  # behind the optimizer: there every forward writes (trainables/sparse.py)
            trainable.track(optimizer)  # sparse: W0 + v is rewritten once per optimizer step, not once per forward
    batches_per_process = math.ceil(len(dataloader) / accelerator.num_processes)  # prepare() shards the loader
    max_steps = config.max_train_steps or config.num_train_epochs * math.ceil(batches_per_process / config.gradient_accumulation_steps)
    lr_scheduler = make_lr_scheduler(config, optimizer, max_steps, accelerator.num_processes)
    prepared = accelerator.prepare(*components.values(), optimizer, dataloader, lr_scheduler)
    models, (optimizer, dataloader, lr_scheduler) = list(prepared[: len(components)]), prepared[len(components):]
    family.modules.update(zip(components, models))  # the loss runs through the wrappers (DDP's gradient sync)
    # after prepare: FSDP2 replaces parameters with DTensors (clipping and checkpoints must see those)
    named = [(f"{c}::{n}", p) for c, t in trainables.items() for n, p in t.named_parameters()]
    noise_generator = torch.Generator(device=accelerator.device).manual_seed(seed + 1 + 1000 * accelerator.process_index)
    TrainedState(accelerator, named, noise_generator, seed).register()
    updates_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)
    global_step = _resume(accelerator, checkpoint, output_dir, config)
    first_epoch, skip_batches = global_step // updates_per_epoch, (global_step % updates_per_epoch) * config.gradient_accumulation_steps

    # 3. The loop.
    log = _StepLog(config, accelerator, max_steps, global_step)
    step_loss, micro_batches = torch.zeros((), device=accelerator.device), 0
    for epoch in range(first_epoch, math.ceil(max_steps / updates_per_epoch)):
        order.manual_seed(seed + epoch)
        # accelerate's loader sets the dataset's epoch (crops, flips) from its own counter when an iteration starts,
        # a counter that restarts at 0 in a resumed process: set the counter itself
        dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if epoch == first_epoch and skip_batches else dataloader
        for model in models:
            model.train()
        for batch in batches:
            with accelerator.accumulate(*models):
                loss = family.loss(batch, noise_generator)
                accelerator.backward(loss)
                step_loss, micro_batches = step_loss + loss.detach(), micro_batches + 1
                if accelerator.sync_gradients:
                    for (component, trainable), group in zip(trainables.items(), optimizer.param_groups):  # one group each
                        trainable.decay_toward_base(group["lr"], decay[component])  # hook impl: masked decay
                    accelerator.clip_grad_norm_([p for _, p in named], config.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]  # the denoiser's rate for this optimizer step
                optimizer.step()
                if accelerator.sync_gradients and accelerator.optimizer_step_was_skipped:
                    for trainable in trainables.values():
                        trainable.undo_decay()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            # the mean over the micro-batches this step had (an epoch's last step may have fewer)
            log.step(global_step, float(accelerator.gather(step_loss / micro_batches).mean()), lr)
            step_loss, micro_batches = torch.zeros_like(step_loss), 0
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, config.checkpoints_total_limit, OUTPUT_FILES)
            if config.validation_prompt and config.validation_steps and global_step % config.validation_steps == 0 and global_step < max_steps:
                validation_images(config, accelerator, family, global_step, seed)
            log.resume_clock()
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
        if config.validation_prompt and (epoch + 1) % config.validation_epochs == 0:
            validation_images(config, accelerator, family, global_step, seed)
    log.close()

    # 4. Final validation, the adapter, its model card, the upload.
    accelerator.wait_for_everyone()
    if config.validation_prompt:
        validation_images(config, accelerator, family, global_step, seed)
    adapter_path = save_adapter(config, accelerator, family, trainables, global_step, seed, repo_id=hub_repo_id)
    if hub_repo_id is not None:
        push_to_hub(config, output_dir, hub_repo_id)
    accelerator.end_training()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    parameters = sum(t.num_parameters for t in trainables.values())
    return TrainingResult(adapter_path, output_dir, global_step, parameters, log.losses, log.learning_rates, peak, log.steps_per_second, seed)


# ---- set-up ---------------------------------------------------------------------------------------------
def _data_source(config: TrainingConfig) -> DataSource:
    """The run's data flags (DataSource's fields are TrainingConfig fields of the same names)."""
    return DataSource(**{field.name: getattr(config, field.name) for field in dataclasses.fields(DataSource)})


def _run_seed(config: TrainingConfig, checkpoint: Path | None) -> int:
    """--seed; else the resumed run's own; else a fresh one (diffusers' default: unseeded), recorded in the
    checkpoints, the mask file, the adapter and its card, so the run can be resumed and repeated."""
    if config.seed is not None:
        return config.seed
    stored = checkpoint_seed(checkpoint) if checkpoint is not None else None
    return stored if stored is not None else int.from_bytes(os.urandom(4), "little") >> 1


def _make_accelerator(config: TrainingConfig, output_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, ProjectConfiguration

    # accelerate keeps one AcceleratorState per process; forget a previous train() call's precision / plugins
    # so that several runs (tests, sweeps, the demo) can differ. The process group (PartialState) is kept.
    if getattr(AcceleratorState, "_shared_state", None) and hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:  # e.g. an FSDP config on CPU: N independent runs into one folder
        raise ConfigError(f"{world} processes were launched but accelerate runs each alone ({accelerator.distributed_type.value}): "
                          "FSDP / DeepSpeed need GPUs in accelerate; on CPU run DDP with torchrun and ACCELERATE_USE_CPU=true")
    if _trains_full_weights(config) and accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise ConfigError(f"--impl {config.impl} masks .grad of full weights, which DeepSpeed / FSDP own; use --impl sparse")
    if "fp16" in (config.mixed_precision, accelerator.mixed_precision) and accelerator.device.type == "cpu":
        # accelerate turns fp16 AMP off on CPU (no autocast, no loss scaling) while the models would still be
        # cast to fp16: pure fp16 training without scaling, or dtype errors with --impl hook.
        raise ConfigError("--mixed_precision fp16 needs a GPU (on CPU there is no fp16 autocast or loss scaling); use bf16 or no")
    if config.allow_tf32:  # Ampere+ GPUs: TF32 matmuls, as diffusers' --allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return accelerator


def _trains_full_weights(config: TrainingConfig) -> bool:
    return config.adapter == "shira" and SHIRA_IMPLS[config.impl].trains_full_weights


def _freeze_and_place(config: TrainingConfig, family: Family, accelerator: Any) -> dict[str, torch.nn.Module]:
    """Every model frozen, on the device, in the compute dtype; returns the components to train (the denoiser,
    and with --train_text_encoder the family's text encoders). The hook impl trains full weights, which stay
    fp32 (autocast still computes in fp16 / bf16); SHiRA values and LoRA factors are fp32 anyway."""
    trained = (family.denoiser, *(family.text_encoders if config.train_text_encoder else ()))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    full_weights = _trains_full_weights(config)
    for name in ("vae", family.denoiser, *family.all_text_encoders):
        model = getattr(family.pipe, name)
        model.requires_grad_(False)
        model.to(accelerator.device)
        dtype = torch.float32 if full_weights and name in trained else weight_dtype
        if model.dtype != dtype:  # only when it changes anything (diffusers warns on every cast)
            model.to(dtype=dtype)
    denoiser = getattr(family.pipe, family.denoiser)
    if config.enable_xformers_memory_efficient_attention:  # xformers presence was checked in validate_config
        denoiser.enable_xformers_memory_efficient_attention()
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name in trained[1:]:  # non-reentrant: the trainable values are not inputs of the blocks
            encoder = getattr(family.pipe, name)
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5
                encoder.activation_checkpointing_enable({"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    family.text_grad = config.train_text_encoder
    return {name: getattr(family.pipe, name) for name in trained}


def _make_dataloader(config: TrainingConfig, examples: ImageCaptions, seed: int, accelerator: Any) -> tuple[Any, torch.Generator]:
    """The shuffled loader and its order generator (reseeded per epoch by the loop). With prior preservation each
    example pairs an instance image with a class image, generated first where --class_data_dir lacks them."""
    dataset = StyleDataset(examples, config.resolution, config.center_crop, config.random_flip, seed, repeats=config.repeats)
    if config.with_prior_preservation:
        if accelerator.is_main_process:
            generate_class_images(config, accelerator.device, seed)
        accelerator.wait_for_everyone()
        dataset = PriorPairs(dataset, StyleDataset(class_examples(config), config.resolution, config.center_crop, config.random_flip, seed + 1))
    order = torch.Generator().manual_seed(seed)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, sampler=torch.utils.data.RandomSampler(dataset, generator=order),
        collate_fn=collate_pairs if config.with_prior_preservation else collate, num_workers=config.dataloader_num_workers,
    )
    return dataloader, order


def _make_trainables(config: TrainingConfig, seed: int, family: Family, components: dict[str, torch.nn.Module], dataloader: Any,
                     accelerator: Any) -> dict[str, Trainable]:
    """One trainable per trained component, on the family's target modules (or --target_modules)."""
    given = [p for entry in config.target_modules or () for p in entry.split(",") if p]  # --lora_layers a,b as well
    targets = {name: find_targets(model, tuple(given or family.denoiser_targets) if name == family.denoiser else family.text_encoder_targets,
                                  include_conv=config.target_conv and name == family.denoiser, strict=bool(given) and name == family.denoiser)
               for name, model in components.items()}
    if config.adapter == "lora":
        return {c: make_trainable(components[c], "lora", module_names=sorted(targets[c]), rank=config.rank, dropout=config.lora_dropout)
                for c in targets}
    masks = load_or_build_masks(config, seed, targets, Path(config.output_dir), dataloader, family, accelerator)
    # pop: the trainables keep the positions (int32 for sparse), so the int64 masks need not stay alive
    return {c: make_trainable(components[c], "shira", positions=masks.pop(c), impl=config.impl) for c in targets}


def _resume(accelerator: Any, checkpoint: Path | None, output_dir: Path, config: TrainingConfig) -> int:
    """The optimizer step to continue from: a checkpoint's (its states loaded), else 0."""
    if checkpoint is None:
        if config.resume_from_checkpoint:
            accelerator.print(f"no checkpoint in {output_dir}; starting a new run")
        return 0
    accelerator.load_state(str(checkpoint))
    return int(CHECKPOINT_NAME.fullmatch(checkpoint.name).group(1))


class _StepLog:
    """Per optimizer step: the loss and rate lists, the progress bar, the trackers, the training clock (which
    leaves out checkpoint saving and validation)."""

    def __init__(self, config: TrainingConfig, accelerator: Any, max_steps: int, first_step: int):
        from tqdm.auto import tqdm

        if accelerator.is_main_process:
            accelerator.init_trackers("shira-diffusion", config=config.loggable())  # no --hub_token in the logs
        self.accelerator = accelerator
        self.bar = tqdm(range(max_steps), initial=first_step, desc="training", disable=config.no_progress_bar or not accelerator.is_local_main_process)
        self.losses: list[float] = []
        self.learning_rates: list[float] = []
        self.seconds, self.steps, self.tick = 0.0, 0, time.perf_counter()

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self.seconds, self.steps = self.seconds + time.perf_counter() - self.tick, self.steps + 1
        self.losses.append(loss)
        self.learning_rates.append(lr)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.accelerator.log({"loss": loss, "lr": lr}, step=global_step)

    def resume_clock(self) -> None:
        self.tick = time.perf_counter()

    @property
    def steps_per_second(self) -> float:
        return self.steps / max(self.seconds, 1e-9)

    def close(self) -> None:
        self.bar.close()
