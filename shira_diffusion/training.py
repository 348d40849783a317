"""DreamBooth-style style training of SHiRA adapters (and a LoRA baseline in the same loop), on accelerate.

What is trained (`--adapter shira --impl sparse|hook`, or `--adapter lora`) lives in `trainables.py`;
this module is the run around it: options, data, masks, one accelerate loop, checkpoints, validation,
the adapter file and its model card.

Usage:
    from shira_diffusion.training import TrainingConfig, train
    result = train(TrainingConfig(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                  train_data_dir="bluefire/", output_dir="out", max_train_steps=1000))
    pipe.load_shira_weights(result.adapter_path)
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .data import StyleDataset, check_resolution, collate, list_images, read_image_folder
from .checkpoints import CHECKPOINT_NAME, find_checkpoint, remove_stale_temps, save_checkpoint
from .durable import write_atomically
from .format import SHIRA_WEIGHT_NAME, ShiraAdapter
from .masks import MASK_TYPES, build_masks
from .training_config import TRACKERS, TrainingConfig
from .trainables import TEXT_ENCODER_TARGETS, UNET_TARGETS, ConfigError, LoraTrainable, ShiraTrainable, find_targets

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MASK_FILE = "masks.safetensors"
OUTPUT_FILES = ("README.md", "samples.png", MASK_FILE, LORA_WEIGHT_NAME)  # written with durable.write_atomically


@dataclass
class TrainingResult:
    """What `train` produced and measured. `losses` has one entry per optimizer step (mean over the
    accumulated micro-batches and processes), `learning_rates` the UNet's rate at each of those steps;
    `peak_memory_bytes` is torch.cuda.max_memory_allocated on GPU, the process's max RSS on CPU;
    `steps_per_second` excludes validation and checkpoint saving."""

    adapter_path: Path
    output_dir: Path
    global_step: int
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    steps_per_second: float = 0.0


# ---- the run --------------------------------------------------------------------------------------------
def validate_config(config: TrainingConfig) -> None:
    """Every check that can fail before loading a model; raises ConfigError / FileNotFoundError."""
    check_resolution(config.resolution)
    if config.adapter not in ("shira", "lora"):
        raise ConfigError(f"--adapter must be shira or lora, got {config.adapter!r}")
    if config.mask not in MASK_TYPES:
        raise ConfigError(f"--mask must be one of {list(MASK_TYPES)}, got {config.mask!r}")
    if config.impl not in ("sparse", "hook"):
        raise ConfigError(f"--impl must be sparse or hook, got {config.impl!r}")
    if not 0 < config.density <= 1:
        raise ConfigError(f"--density must be in (0, 1], got {config.density}")
    for name in ("shira_r", "rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "calibration_batches",
                 "sample_batch_size", "lr_num_cycles", "validation_epochs", "repeats", "num_class_images", "checkpoints_total_limit",
                 "num_validation_images", "validation_inference_steps"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name} must be a positive integer, got {value}")
    for name in ("lr_warmup_steps", "checkpointing_steps", "validation_steps", "dataloader_num_workers"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(config, name)}")
    # `not x > 0` (not `x <= 0`) so that nan is refused too.
    for name in ("learning_rate", "max_grad_norm", "lr_power", "snr_gamma"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name} must be > 0, got {value}")
    for name in ("adam_weight_decay", "adam_weight_decay_text_encoder", "adam_epsilon", "noise_offset", "prior_loss_weight"):
        value = getattr(config, name)
        if value is not None and not value >= 0:
            raise ConfigError(f"--{name} must be >= 0, got {value}")
    _check_finite(config)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(config, name) < 1:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(config, name)}")
    if config.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ConfigError(f"--mixed_precision must be no, fp16 or bf16, got {config.mixed_precision!r}")
    if config.text_encoder_lr is not None and (not config.text_encoder_lr >= 0 or not config.train_text_encoder):
        raise ConfigError(f"--text_encoder_lr {config.text_encoder_lr}: needs --train_text_encoder and a rate >= 0")
    if config.adam_weight_decay_text_encoder is not None and not config.train_text_encoder:
        raise ConfigError("--adam_weight_decay_text_encoder needs --train_text_encoder")
    if not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"--lora_dropout must be in [0, 1), got {config.lora_dropout}")
    if config.prior_generation_precision not in (None, "no", "fp32", "fp16", "bf16"):
        raise ConfigError(f"--prior_generation_precision must be no, fp32, fp16 or bf16, got {config.prior_generation_precision!r}")
    _check_scheduler(config)
    if config.hub_token is not None and config.report_to in ("wandb", "all"):  # diffusers' scripts refuse it too
        raise ConfigError("--hub_token with --report_to wandb would expose the token in the run's config; log in with `hf auth login` instead")
    _check_trackers(config)
    if config.with_prior_preservation and (not config.class_data_dir or not config.class_prompt):
        raise ConfigError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if config.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from None
    if config.enable_xformers_memory_efficient_attention:
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise ConfigError("--enable_xformers_memory_efficient_attention needs xformers (pip install xformers); "
                              "without the flag, PyTorch's scaled_dot_product_attention is used")
    if config.max_train_steps is None and config.num_train_epochs < 1:
        raise ConfigError("give --max_train_steps or --num_train_epochs >= 1")
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir}: exists and is not a folder")
    existing = next((parent for parent in output_dir.absolute().parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():  # mkdir would fail only after the models load
        raise ConfigError(f"--output_dir {output_dir}: {existing} is a file, not a folder")
    index = _check_model(config.pretrained_model_name_or_path, "model_index.json", config.revision, "--pretrained_model_name_or_path")
    if "unet" not in index:
        raise ConfigError(f"{config.pretrained_model_name_or_path}: {index.get('_class_name')} has no UNet; the trainer supports SD 1.x/2.x and SDXL")
    if config.pretrained_vae_model_name_or_path:
        _check_model(config.pretrained_vae_model_name_or_path, "config.json", config.revision, "--pretrained_vae_model_name_or_path")
    if config.resume_from_checkpoint and config.resume_from_checkpoint != "latest":
        find_checkpoint(output_dir, config.resume_from_checkpoint)


def _check_finite(config: TrainingConfig) -> None:
    """Rates, decays and loss weights are finite: inf passes the range checks and trains NaNs."""
    for name in ("learning_rate", "text_encoder_lr", "lr_power", "snr_gamma", "adam_epsilon", "adam_weight_decay",
                 "adam_weight_decay_text_encoder", "noise_offset", "prior_loss_weight"):
        value = getattr(config, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value}")


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


def _check_scheduler(config: TrainingConfig) -> None:
    """--lr_scheduler is one of diffusers' get_scheduler names; piecewise_constant needs parseable --lr_step_rules."""
    from diffusers.optimization import SchedulerType

    names = [kind.value for kind in SchedulerType]
    if config.lr_scheduler not in names:
        raise ConfigError(f"--lr_scheduler must be one of {names}, got {config.lr_scheduler!r}")
    if (config.lr_scheduler == "piecewise_constant") != (config.lr_step_rules is not None):
        raise ConfigError("--lr_scheduler piecewise_constant and --lr_step_rules go together")
    if config.lr_step_rules is not None:
        _parse_step_rules(config.lr_step_rules)


def _parse_step_rules(rules: str) -> tuple[list[tuple[float, int]], float]:
    """diffusers' "multiplier:until_step,...,last_multiplier" rules as ([(multiplier, step), ...], last)."""
    *pairs, last = rules.split(",")
    try:
        parsed = [(float(m), int(n)) for m, n in (pair.split(":") for pair in pairs)]
        return parsed, float(last)
    except ValueError:
        raise ConfigError(f"--lr_step_rules {rules!r}: expected multiplier:step,...,multiplier, e.g. 1:100,0.1:200,0.01") from None


def _check_trackers(config: TrainingConfig) -> None:
    """Each --report_to tracker is known and installed (accelerate would silently drop a missing one)."""
    import accelerate.utils

    if config.report_to in ("none", "all"):
        return
    name = config.report_to
    if name not in TRACKERS:
        raise ConfigError(f"--report_to must be none, all or one of {list(TRACKERS)}, got {name!r}")
    if not getattr(accelerate.utils, f"is_{name}_available")():  # as diffusers' scripts: an error, not a silent no-op
        raise ConfigError(f"--report_to {name}: {name} is not installed (pip install {name.replace('_', '-')}), or use --report_to none")


def _load_models(config: TrainingConfig, model_path: str):
    """Tokenizers, text encoders, VAE, UNet and a DDPMScheduler from `model_path` (diffusers' script layout)."""
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    index = DiffusionPipeline.load_config(model_path, revision=config.revision)
    if "unet" not in index:
        raise ConfigError(f"{model_path}: {index.get('_class_name')} has no UNet; the trainer supports SD 1.x/2.x and SDXL")
    is_sdxl = "text_encoder_2" in index and index.get("text_encoder_2", [None])[0] is not None
    kw = {"revision": config.revision}

    def text_encoder(subfolder: str, default: str):
        architectures = transformers.AutoConfig.from_pretrained(model_path, subfolder=subfolder, **kw).architectures
        model_class = getattr(transformers, (architectures or [default])[0])
        return model_class.from_pretrained(model_path, subfolder=subfolder, variant=config.variant, **kw)

    suffixes = ["", "_2"] if is_sdxl else [""]
    # The class model_index.json names (CLIPTokenizer): AutoTokenizer would look for a config.json these repos lack,
    # which fails offline even with the model in the Hub cache.
    tokenizer_classes = [getattr(transformers, (index.get(f"tokenizer{s}") or [None, "AutoTokenizer"])[1]) for s in suffixes]
    tokenizers = [cls.from_pretrained(model_path, subfolder=f"tokenizer{s}", **kw) for cls, s in zip(tokenizer_classes, suffixes)]
    defaults = ["CLIPTextModel", "CLIPTextModelWithProjection"]
    text_encoders = [text_encoder(f"text_encoder{s}", d) for s, d in zip(suffixes, defaults)]
    if config.pretrained_vae_model_name_or_path:  # e.g. SDXL's fp16-safe VAE, as diffusers' SDXL scripts take it
        vae = AutoencoderKL.from_pretrained(config.pretrained_vae_model_name_or_path, **kw)
    else:
        vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", variant=config.variant, **kw)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", variant=config.variant, **kw)
    noise_scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw)
    return is_sdxl, tokenizers, text_encoders, vae, unet, noise_scheduler


def _encode_prompts(captions, tokenizers, text_encoders, is_sdxl):
    """SD: the last hidden state. SDXL: both encoders' penultimate hidden states, concatenated, and the
    second encoder's pooled projection (as diffusers' SDXL scripts)."""
    embeddings, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        output = encoder(ids.to(encoder.device), output_hidden_states=is_sdxl)
        if is_sdxl:
            embeddings.append(output.hidden_states[-2])
            pooled = output[0]
        else:
            embeddings.append(output[0])
    return torch.cat(embeddings, dim=-1), pooled


def _generate_class_images(config: TrainingConfig, model_path: str, device: torch.device) -> None:
    """DreamBooth prior preservation: fill class_data_dir up to num_class_images with base-model images."""
    from diffusers import DiffusionPipeline

    folder = Path(config.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    existing = list_images(folder)  # regular files only: a FIFO named like an image is no class image
    missing = config.num_class_images - len(existing)
    if missing <= 0:
        return
    names = _free_class_names(folder, missing)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(config.prior_generation_precision)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    pipe = DiffusionPipeline.from_pretrained(model_path, revision=config.revision, variant=config.variant).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    for start in range(0, missing, config.sample_batch_size):
        count = min(config.sample_batch_size, missing - start)
        images = pipe([config.class_prompt] * count, generator=generator, height=config.resolution, width=config.resolution).images
        for image, name in zip(images, names[start : start + count]):
            image.save(folder / name)
    del pipe


def _free_class_names(folder: Path, count: int) -> list[str]:
    """`count` names class_NNNNN.png not used in `folder` (by any suffix): a top-up after deleting a few
    class images fills the gaps instead of overwriting the images that follow them."""
    taken = {p.stem for p in folder.iterdir()}
    names, index = [], 0
    while len(names) < count:
        if f"class_{index:05d}" not in taken:
            names.append(f"class_{index:05d}.png")
        index += 1
    return names


class _PriorPairs(torch.utils.data.Dataset):
    """Example i: instance i % n_instance with class image i % n_class, max(n_instance, n_class) per epoch
    (diffusers' DreamBoothDataset), so every class image is used whichever set is larger."""

    def __init__(self, instances: StyleDataset, classes: StyleDataset):
        self.instances, self.classes = instances, classes

    def set_epoch(self, epoch: int) -> None:
        self.instances.set_epoch(epoch)
        self.classes.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int):
        return self.instances[index % len(self.instances)], self.classes[index % len(self.classes)]


def _class_records(config: TrainingConfig) -> list[tuple[Path, str]]:
    """The first --num_class_images class images (by name), each captioned with --class_prompt."""
    found = read_image_folder(config.class_data_dir, config.class_prompt, limit=config.num_class_images)
    return [(path, config.class_prompt) for path, _ in found]


def _collate_pairs(batch):
    return collate([pair[0] for pair in batch] + [pair[1] for pair in batch])


def train(config: TrainingConfig) -> TrainingResult:
    """Run one training job (SHiRA or the LoRA baseline); returns where the adapter went and what was measured.

    Usage: result = train(TrainingConfig(pretrained_model_name_or_path="model/", train_data_dir="img/", output_dir="out"))
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from tqdm.auto import tqdm

    # 1. Everything that can be checked before loading a model.
    validate_config(config)
    records = read_image_folder(config.train_data_dir, config.instance_prompt)
    records = [record for record in records for _ in range(config.repeats)]  # --repeats, as diffusers' SDXL script
    if config.with_prior_preservation and Path(config.class_data_dir).is_dir() and any(Path(config.class_data_dir).iterdir()):
        _class_records(config)  # errors early, before generation
    output_dir = Path(config.output_dir)
    # accelerate keeps one AcceleratorState per process; forget a previous train() call's precision / plugins
    # so that several runs (tests, sweeps, the demo) can differ. The process group (PartialState) is kept.
    if getattr(AcceleratorState, "_shared_state", None) and hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
    )
    if config.adapter == "shira" and config.impl == "hook" and accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise ConfigError("--impl hook masks .grad of full weights, which DeepSpeed / FSDP own; use --impl sparse")
    if "fp16" in (config.mixed_precision, accelerator.mixed_precision) and accelerator.device.type == "cpu":
        # accelerate turns fp16 AMP off on CPU (no autocast, no loss scaling) while the models would still be
        # cast to fp16: pure fp16 training without scaling, or dtype errors with --impl hook.
        raise ConfigError("--mixed_precision fp16 needs a GPU (on CPU there is no fp16 autocast or loss scaling); use bf16 or no")
    hub_repo_id = _create_hub_repo(config, output_dir) if config.push_to_hub and accelerator.is_main_process else None
    set_seed(config.seed)
    if config.allow_tf32:  # Ampere+ GPUs: TF32 matmuls, as diffusers' --allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.scale_lr:  # diffusers' --scale_lr: the rate per sample, times the samples of one optimizer step
        scaled = config.learning_rate * config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
        config = replace(config, learning_rate=scaled)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model_path = config.pretrained_model_name_or_path

    # 2. Models: frozen in the compute dtype; trainable SHiRA values / LoRA factors stay fp32. The hook impl
    # trains full weights, which must stay fp32 (autocast still computes in fp16 / bf16).
    is_sdxl, tokenizers, text_encoders, vae, unet, noise_scheduler = _load_models(config, model_path)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    keep_fp32 = config.adapter == "shira" and config.impl == "hook"
    for model in (vae, unet, *text_encoders):
        model.requires_grad_(False)
        model.to(accelerator.device)
        dtype = torch.float32 if keep_fp32 and model is not vae else weight_dtype
        if model.dtype != dtype:  # only when it changes anything (diffusers warns on every cast)
            model.to(dtype=dtype)
    if config.enable_xformers_memory_efficient_attention:  # xformers presence was checked in validate_config
        unet.enable_xformers_memory_efficient_attention()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in text_encoders:  # non-reentrant: the trainable values are not inputs of the blocks
                if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5
                    encoder.activation_checkpointing_enable({"use_reentrant": False})
                else:
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    components = {"unet": unet}
    if config.train_text_encoder:
        components.update({f"text_encoder{s}": te for s, te in zip(["", "_2"], text_encoders)})
    targets = {}
    for name, model in components.items():
        patterns = (config.target_modules or UNET_TARGETS) if name == "unet" else TEXT_ENCODER_TARGETS
        targets[name] = find_targets(model, tuple(patterns), include_conv=config.target_conv and name == "unet")

    # 3. Data. The sampler's generator is reseeded per epoch and augmentations are seeded by (seed, epoch,
    # index), so a resumed run sees exactly the batches of an uninterrupted one.
    if config.with_prior_preservation:
        if accelerator.is_main_process:
            _generate_class_images(config, model_path, accelerator.device)
        accelerator.wait_for_everyone()
        class_records = _class_records(config)
    dataset = StyleDataset(records, config.resolution, config.center_crop, config.random_flip, config.seed)
    if config.with_prior_preservation:
        dataset = _PriorPairs(dataset, StyleDataset(class_records, config.resolution, config.center_crop, config.random_flip, config.seed + 1))
    order = torch.Generator().manual_seed(config.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=torch.utils.data.RandomSampler(dataset, generator=order),
        collate_fn=_collate_pairs if config.with_prior_preservation else collate,
        num_workers=config.dataloader_num_workers,
    )

    def diffusion_loss(batch, noise_generator) -> torch.Tensor:
        """The DreamBooth noise-prediction loss of one batch (Min-SNR weighting and prior term when asked)."""
        pixels = batch["pixel_values"].to(accelerator.device, dtype=vae.dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=noise_generator) * vae.config.scaling_factor
        latents = latents.to(weight_dtype)
        noise = torch.randn(latents.shape, generator=noise_generator, device=latents.device, dtype=latents.dtype)
        if config.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=noise_generator, device=latents.device)
            noise = noise + config.noise_offset * offset.to(latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=noise_generator, device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(config.train_text_encoder and torch.is_grad_enabled()):
            hidden, pooled = _encode_prompts(batch["captions"], tokenizers, text_encoders, is_sdxl)
        extra = {}
        if is_sdxl:  # micro-conditioning: original size, crop top-left, target size
            time_ids = [list(size) + list(crop) + [config.resolution, config.resolution] for size, crop in zip(batch["original_sizes"], batch["crops_top_left"])]
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor(time_ids, device=latents.device, dtype=hidden.dtype)}
        prediction = unet(noisy, timesteps, hidden, **extra).sample
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        if config.with_prior_preservation:
            prediction, prior_prediction = prediction.chunk(2)
            target, prior_target = target.chunk(2)
            timesteps = timesteps.chunk(2)[0]
        if config.snr_gamma is None:
            loss = F.mse_loss(prediction.float(), target.float())
        else:  # Min-SNR weighting (Hang et al. 2023), as in diffusers' scripts
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.stack([snr, config.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
            weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
            loss = (F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=[1, 2, 3]) * weights).mean()
        if config.with_prior_preservation:
            loss = loss + config.prior_loss_weight * F.mse_loss(prior_prediction.float(), prior_target.float())
        return loss

    # 4. Masks (computed once and stored with the run, so a resumed run trains exactly the same positions)
    # and trainables.
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        remove_stale_temps(output_dir, OUTPUT_FILES)
    if config.adapter == "shira":
        masks = _load_or_build_masks(config, targets, output_dir, dataloader, diffusion_loss, accelerator)
        trainables = {c: ShiraTrainable(components[c], masks.pop(c), config.impl) for c in targets}  # pop: the
        # trainables keep the positions (int32 for sparse), so the int64 masks need not stay alive
    else:
        trainables = {c: LoraTrainable(components[c], sorted(targets[c]), config.rank, config.lora_dropout) for c in targets}
    named = [(f"{c}::{n}", p) for c, t in trainables.items() for n, p in t.named_parameters()]
    trainable_parameters = sum(t.num_parameters for t in trainables.values())

    # 5. Optimizer, schedule, accelerate.
    optimizer_class = torch.optim.AdamW
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    # --adam_weight_decay_text_encoder (diffusers' SDXL script) for the text encoders, else --adam_weight_decay
    decay = {c: config.adam_weight_decay if c == "unet" or config.adam_weight_decay_text_encoder is None else config.adam_weight_decay_text_encoder
             for c in trainables}
    groups = [t.param_group(decay[c]) for c, t in trainables.items()]
    for group, component in zip(groups, trainables):
        if component != "unet" and config.text_encoder_lr is not None:  # as diffusers' SDXL script (not --scale_lr'd)
            group["lr"] = config.text_encoder_lr
    optimizer = optimizer_class(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    for trainable in trainables.values():
        trainable.track(optimizer)  # sparse: W0 + v is rewritten once per optimizer step, not once per forward
    batches_per_process = math.ceil(len(dataloader) / accelerator.num_processes)  # prepare() shards the loader
    max_steps = config.max_train_steps or config.num_train_epochs * math.ceil(batches_per_process / config.gradient_accumulation_steps)
    # The prepared scheduler steps once per process per optimizer step, so every step count is scaled by the
    # process count (diffusers' scripts scale warmup and total; the step rules are scaled here as well, so
    # they count optimizer steps whatever the launch).
    step_rules = None
    if config.lr_step_rules is not None:
        pairs, last = _parse_step_rules(config.lr_step_rules)
        step_rules = ",".join([f"{m}:{n * accelerator.num_processes}" for m, n in pairs] + [str(last)])
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer, step_rules=step_rules,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes, num_training_steps=max_steps * accelerator.num_processes,
        num_cycles=config.lr_num_cycles, power=config.lr_power,
    )
    models = list(components.values())
    prepared = accelerator.prepare(*models, optimizer, dataloader, lr_scheduler)
    models, (optimizer, dataloader, lr_scheduler) = list(prepared[: len(models)]), prepared[len(models):]
    unet = models[0]
    updates_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)
    epochs = math.ceil(max_steps / updates_per_epoch)
    noise_generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + 1 + 1000 * accelerator.process_index)

    # Checkpoints hold only what training changes (not the frozen base model): the trainable tensors and the
    # noise generator; accelerate adds optimizer, scheduler, sampler and RNG states.
    def save_hook(hooked_models, weights, directory):
        from safetensors.torch import save_file

        weights.clear()
        if accelerator.is_main_process:
            save_file({name: p.detach().contiguous() for name, p in named}, str(Path(directory) / "trainable.safetensors"))
        save_file({"state": noise_generator.get_state()}, str(Path(directory) / f"noise_generator_{accelerator.process_index}.safetensors"))

    def load_hook(hooked_models, directory):
        from safetensors.torch import load_file

        hooked_models.clear()
        state = load_file(str(Path(directory) / "trainable.safetensors"))
        missing = [name for name, _ in named if name not in state]
        if missing:
            raise ConfigError(f"{directory}: checkpoint does not match this run (no {missing[0]!r}); same --adapter / --mask / targets?")
        with torch.no_grad():
            for name, p in named:
                p.copy_(state[name])
        noise_generator.set_state(load_file(str(Path(directory) / f"noise_generator_{accelerator.process_index}.safetensors"))["state"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, first_epoch, skip_batches = 0, 0, 0
    checkpoint = find_checkpoint(output_dir, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        global_step = int(CHECKPOINT_NAME.fullmatch(checkpoint.name).group(1))
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * config.gradient_accumulation_steps
    elif config.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {output_dir}; starting a new run")

    # 6. The loop.
    if accelerator.is_main_process:
        accelerator.init_trackers("shira-diffusion", config=config.loggable())  # no --hub_token in the logs
    progress = tqdm(range(max_steps), initial=global_step, desc="training",
                    disable=config.no_progress_bar or not accelerator.is_local_main_process)
    losses: list[float] = []
    learning_rates: list[float] = []
    step_loss, micro_batches = torch.zeros((), device=accelerator.device), 0
    train_seconds, steps_timed, tick = 0.0, 0, time.perf_counter()
    for epoch in range(first_epoch, epochs):
        order.manual_seed(config.seed + epoch)
        # accelerate's loader sets the dataset's epoch (crops, flips) from its own counter when an iteration starts,
        # a counter that restarts at 0 in a resumed process: set the counter itself
        dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if epoch == first_epoch and skip_batches else dataloader
        for model in models:
            model.train()
        for batch in batches:
            with accelerator.accumulate(*models):
                loss = diffusion_loss(batch, noise_generator)
                accelerator.backward(loss)
                step_loss += loss.detach()
                micro_batches += 1
                if accelerator.sync_gradients:
                    lr = optimizer.param_groups[0]["lr"]  # the UNet's rate for this optimizer step
                    for (component, trainable), group in zip(trainables.items(), optimizer.param_groups):  # one group each
                        trainable.decay_toward_base(group["lr"], decay[component])  # hook impl: masked decay
                    accelerator.clip_grad_norm_([p for _, p in named], config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and accelerator.optimizer_step_was_skipped:
                    for trainable in trainables.values():
                        trainable.undo_decay()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            # the mean over the micro-batches this step had (an epoch's last step may have fewer than
            # --gradient_accumulation_steps)
            losses.append(float(accelerator.gather(step_loss / micro_batches).mean()))
            step_loss.zero_()
            micro_batches = 0
            learning_rates.append(lr)
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": losses[-1], "lr": lr}, step=global_step)
            train_seconds, steps_timed = train_seconds + time.perf_counter() - tick, steps_timed + 1
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, config.checkpoints_total_limit, OUTPUT_FILES)
            if config.validation_prompt and config.validation_steps and global_step % config.validation_steps == 0 and global_step < max_steps:
                _validate(config, accelerator, model_path, unet, text_encoders, vae, global_step)
            tick = time.perf_counter()
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
        if config.validation_prompt and config.validation_epochs and (epoch + 1) % config.validation_epochs == 0 and global_step < max_steps:
            _validate(config, accelerator, model_path, unet, text_encoders, vae, global_step)
    progress.close()

    # 7. Final validation, adapter, model card.
    accelerator.wait_for_everyone()
    if config.validation_prompt:
        _validate(config, accelerator, model_path, unet, text_encoders, vae, global_step)
    adapter_path = _save_adapter(config, accelerator, trainables, is_sdxl, global_step, repo_id=hub_repo_id)
    if hub_repo_id is not None:
        _push_to_hub(config, output_dir, hub_repo_id)
    accelerator.end_training()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return TrainingResult(adapter_path, output_dir, global_step, trainable_parameters, losses, learning_rates, peak, steps_timed / max(train_seconds, 1e-9))


def _load_or_build_masks(config, targets, output_dir, dataloader, diffusion_loss, accelerator) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module name: positions}}; reused from output_dir/masks.safetensors when resuming."""
    from safetensors.torch import save_file

    mask_file = output_dir / MASK_FILE
    settings = {"mask": config.mask, "density": str(config.density), "shira_r": str(config.shira_r), "seed": str(config.seed)}
    if config.resume_from_checkpoint and mask_file.is_file():
        try:
            handle = safe_open(str(mask_file), "pt")
        except (SafetensorError, OSError) as error:  # e.g. cut short by an older version killed while writing it
            raise ConfigError(f"{mask_file}: unreadable mask file ({error}); delete it and the checkpoint-N folders to start over") from None
        with handle:
            stored = handle.metadata() or {}
            different = [k for k, v in settings.items() if stored.get(k, v) != v]
            if different:
                raise ConfigError(f"{mask_file}: made with --{different[0]} {stored[different[0]]}, this run has {settings[different[0]]}")
            keys = set(handle.keys())
            missing = [f"{c}::{n}" for c in targets for n in targets[c] if f"{c}::{n}" not in keys]
            if missing:
                raise ConfigError(f"{mask_file}: no mask for {missing[0]} (different --target_modules?)")
            return {c: {n: handle.get_tensor(f"{c}::{n}") for n in targets[c]} for c in targets}
    gradients = _calibration_gradients(config, targets, dataloader, diffusion_loss, accelerator) if config.mask in ("grad", "snip") else {}
    masks = {}
    for c in targets:
        weights = {n: m.weight for n, m in targets[c].items()}
        masks[c] = build_masks(weights, config.mask, density=config.density, r=config.shira_r, seed=config.seed, gradients=gradients.get(c))
        gradients.pop(c, None)  # free this component's |grad| sums before the next one's masks
    if accelerator.is_main_process:
        tensors = {f"{c}::{n}": p.contiguous() for c in masks for n, p in masks[c].items()}
        write_atomically(mask_file, lambda temp: save_file(tensors, temp, metadata=settings))
    return masks


def _calibration_gradients(config, targets, dataloader, diffusion_loss, accelerator) -> dict[str, dict[str, torch.Tensor]]:
    """Accumulated |dL/dW| per target weight over `calibration_batches` batches of the training data, on the
    base model. Each weight's gradient is folded into its fp32 accumulator as soon as it is complete and then
    dropped, so besides the accumulators at most the gradients of one backward's in-flight layers exist."""
    sums = {c: {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in mods.items()} for c, mods in targets.items()}
    handles = []
    for c, mods in targets.items():
        for n, module in mods.items():
            module.weight.requires_grad_(True)

            def fold(parameter, accumulator=sums[c][n]):
                accumulator.add_(parameter.grad.abs())
                parameter.grad = None

            handles.append(module.weight.register_post_accumulate_grad_hook(fold))
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + 2)
    # fp16 gradients of a loss ~0.1 underflow; top-k only needs the ranking, so a constant scale is free.
    scale = 256.0 if any(m.weight.dtype == torch.float16 for mods in targets.values() for m in mods.values()) else 1.0
    try:
        with accelerator.autocast():
            for index, batch in enumerate(dataloader):
                if index >= config.calibration_batches:
                    break
                (diffusion_loss(batch, generator) * scale).backward()
    finally:
        for handle in handles:
            handle.remove()
        for mods in targets.values():
            for module in mods.values():
                module.weight.requires_grad_(False)
    return sums


@torch.no_grad()
def _validate(config, accelerator, model_path, unet, text_encoders, vae, step) -> list:
    """Images for --validation_prompt from the live model: PNGs in output_dir/validation and TensorBoard."""
    if not accelerator.is_main_process:
        return []
    from diffusers import DiffusionPipeline

    from .quiet import quiet_libraries

    extra = {"text_encoder": accelerator.unwrap_model(text_encoders[0])}
    if len(text_encoders) > 1:
        extra["text_encoder_2"] = accelerator.unwrap_model(text_encoders[1])
    # The weighted components are the live ones (in their training dtypes); nothing else needs a dtype.
    kwargs = {"unet": accelerator.unwrap_model(unet), "vae": vae, "revision": config.revision, "variant": config.variant}
    if "safety_checker" in DiffusionPipeline.load_config(model_path, revision=config.revision):
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # images for the log: skip loading the checker
    with quiet_libraries():  # no loading bars inside the training bar
        pipe = DiffusionPipeline.from_pretrained(model_path, **kwargs, **extra)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed)
    with accelerator.autocast():  # the hook impl keeps an fp32 UNet next to an fp16 VAE
        images = [
            pipe(config.validation_prompt, num_inference_steps=config.validation_inference_steps, generator=generator,
                 height=config.resolution, width=config.resolution).images[0]
            for _ in range(config.num_validation_images)
        ]
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        write_atomically(folder / f"step-{step:06d}-{index}.png", lambda temp, image=image: image.save(temp, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    del pipe
    return images


def _save_adapter(config, accelerator, trainables, is_sdxl, step, repo_id: str | None = None) -> Path:
    """output_dir/shira_weights.safetensors (ShiraAdapter.save) or pytorch_lora_weights.safetensors, + card."""
    output_dir = Path(config.output_dir)
    path = output_dir / (SHIRA_WEIGHT_NAME if config.adapter == "shira" else LORA_WEIGHT_NAME)
    if not accelerator.is_main_process:
        return path
    if config.adapter == "shira":
        adapter = ShiraAdapter(
            {c: t.deltas() for c, t in trainables.items()},
            mask_type=config.mask,
            base_model=config.pretrained_model_name_or_path,
            extra={
                "impl": config.impl, "steps": step, "instance_prompt": config.instance_prompt,
                "density_requested": None if config.shira_r else config.density, "shira_r": config.shira_r,
                "target_modules": list(config.target_modules or UNET_TARGETS), "learning_rate": config.learning_rate,
            },
        )
        path = adapter.save(path)
    else:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        # PEFT-style keys + each component's LoraConfig as metadata: diffusers reloads them exactly (files
        # written with convert_state_dict_to_diffusers lose their attention layers in diffusers 0.42).
        layers = {f"{c}_lora_layers": t.export() for c, t in trainables.items()}
        metadata = {f"{c}_lora_adapter_metadata": t.config_dict() for c, t in trainables.items()}
        staging = output_dir / ".lora.tmp"  # diffusers writes in place: write into a folder beside, then move it over
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline).save_lora_weights(staging, **layers, **metadata)
            write_atomically(path, lambda temp: os.replace(staging / LORA_WEIGHT_NAME, temp))  # synced, then renamed
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _write_model_card(config, output_dir, path, step, sum(t.num_parameters for t in trainables.values()), repo_id=repo_id)
    return path


def _create_hub_repo(config: TrainingConfig, output_dir: Path) -> str:
    """Create (or reach) the --push_to_hub repo before training, as diffusers' scripts do, so that being
    offline or logged out is an error now rather than after the whole run. Returns the repo id."""
    import huggingface_hub

    repo = config.hub_model_id or output_dir.resolve().name
    try:
        return huggingface_hub.HfApi(token=config.hub_token).create_repo(repo, exist_ok=True).repo_id
    except Exception as error:  # noqa: BLE001 -- offline mode, no token, HTTP 401/403, no network: each stops the run
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(f"--push_to_hub: cannot create or reach the Hub repo {repo!r} ({type(error).__name__}: {reason}); "
                          "log in with `hf auth login`, check --hub_model_id, or drop --push_to_hub") from None


def _push_to_hub(config: TrainingConfig, output_dir: Path, repo_id: str) -> str:
    """Upload the run's folder (adapter, model card, samples, validation images, logs; not the checkpoints or
    the mask file) to the repo made by `_create_hub_repo`, as diffusers' scripts do."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=config.hub_token)
    try:
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="End of training",
                                     ignore_patterns=["checkpoint-*", MASK_FILE]))
    except Exception as error:  # noqa: BLE001 -- the adapter is saved: say where, and how to upload it later
        raise ConfigError(f"--push_to_hub: the upload to {repo_id} failed ({type(error).__name__}: {error}); the run is saved in "
                          f"{output_dir}, upload it with `hf upload {repo_id} {output_dir}`") from None


def _write_samples_grid(config: TrainingConfig, output_dir: Path, step: int) -> list:
    """output_dir/samples.png: the last validation round's images (step `step`) in one grid (grids.image_grid, so
    never above PIL's pixel limit); returns them as the card's gallery (cards.Sample), [] when there are none."""
    from PIL import Image

    from .cards import Sample
    from .grids import image_grid

    paths = sorted((output_dir / "validation").glob(f"step-{step:06d}-*.png"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not paths:
        return []
    tiles = []
    for path in paths:
        with Image.open(path) as image:
            tiles.append(image.convert("RGB"))
    grid = image_grid(tiles)
    write_atomically(output_dir / "samples.png", lambda temp: grid.save(temp, format="PNG"))
    return [Sample(config.validation_prompt, f"validation/{path.name}") for path in paths]


def _write_model_card(config: TrainingConfig, output_dir: Path, adapter_path: Path, step: int, parameters: int,
                      repo_id: str | None = None) -> None:
    """output_dir/README.md (cards.adapter_card) and samples.png. The usage block loads the adapter from `repo_id`
    (the Hub repo --push_to_hub made), else --hub_model_id when it names the owner, else from output_dir."""
    from .cards import adapter_card

    samples = _write_samples_grid(config, output_dir, step)
    if repo_id is None and config.push_to_hub and config.hub_model_id and "/" in config.hub_model_id:
        repo_id = config.hub_model_id  # without an owner, only the Hub knows the full id ("<user>/name")
    targets = ", ".join(config.target_modules or UNET_TARGETS) + (" + all Conv2d" if config.target_conv else "")
    if config.adapter == "shira":
        budget = f"r={config.shira_r} budget" if config.shira_r else f"density {config.density}"
        kind = f"SHiRA ({config.mask} mask, {budget}, {config.impl} impl)"
        summary = (f"A {kind} style adapter trained with shira-diffusion: {parameters:,} trainable parameters. The file is "
                   "shira-diffusion's SHiRA format and loads with its `load_shira_weights` (below).")
    else:
        kind = f"LoRA (rank {config.rank})"
        summary = (f"A {kind} style adapter, the baseline shira-diffusion trains in the same loop and settings as SHiRA: "
                   f"{parameters:,} trainable parameters. The file is a plain diffusers LoRA file: diffusers' "
                   "`load_lora_weights` loads it (below).")
    details = [
        f"adapter: {kind}, {parameters:,} trainable parameters",
        f"targets: UNet {targets}" + (" + text encoder(s) q/k/v/out_proj, fc1, fc2" if config.train_text_encoder else ""),
        f"steps: {step}, learning rate {config.learning_rate} ({config.lr_scheduler}), batch {config.train_batch_size} x "
        f"{config.gradient_accumulation_steps} accumulation, resolution {config.resolution}, seed {config.seed}",
        f"captions: {'instance prompt `' + config.instance_prompt + '` where an image has none' if config.instance_prompt else 'per image'}",
    ]
    card = adapter_card(
        config.adapter, weight_name=adapter_path.name, load_from=repo_id or str(output_dir.resolve()),
        base_model=config.pretrained_model_name_or_path, title=f"{kind} style adapter", summary=summary, details=details,
        license=getattr(config, "license", None),  # a --license flag is not in TrainingConfig yet: the base's, else "other"
        instance_prompt=config.instance_prompt, samples=samples, grid="samples.png" if samples else None, local=repo_id is None,
    )
    write_atomically(output_dir / "README.md", lambda temp: card.save(temp))


def config_from_dict(values: dict) -> TrainingConfig:
    """A TrainingConfig from a dict (e.g. argparse vars), ignoring unknown keys."""
    names = set(TrainingConfig.__dataclass_fields__)
    return TrainingConfig(**{k: v for k, v in values.items() if k in names})


@torch.no_grad()
def denoising_loss(pipe, data_dir: str | Path, resolution: int, seed: int = 0, instance_prompt: str | None = None,
                   timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)) -> float:
    """Mean noise-prediction MSE of `pipe`'s UNet on a folder's images, with fixed noise and timesteps.

    The same images, noise and timesteps for every call, so two adapters (or none, or a fusion) compare
    fairly: a lower value means the model reconstructs that style better.
    Usage: denoising_loss(pipe, "heldout/", resolution=512)
    """
    from diffusers import DDPMScheduler

    records = read_image_folder(data_dir, instance_prompt)
    dataset = StyleDataset(records, resolution, center_crop=True, random_flip=False, seed=seed)
    batch = collate([dataset[i] for i in range(len(dataset))])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_sdxl else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl else [])
    device, dtype = pipe._execution_device, pipe.unet.dtype  # the GPU also under model CPU offload, where the UNet waits on the CPU
    generator = torch.Generator().manual_seed(seed)
    latents = pipe.vae.encode(batch["pixel_values"].to(device, pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
    hidden, pooled = _encode_prompts(batch["captions"], tokenizers, encoders, is_sdxl)
    losses = []
    for step in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        t = torch.full((latents.shape[0],), step, device=device, dtype=torch.long)
        extra = {}
        if is_sdxl:
            time_ids = torch.tensor([list(s) + list(c) + [resolution, resolution] for s, c in zip(batch["original_sizes"], batch["crops_top_left"])], device=device, dtype=dtype)
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        prediction = pipe.unet(scheduler.add_noise(latents, noise, t).to(dtype), t, hidden.to(dtype), **extra).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        losses.append(F.mse_loss(prediction.float(), target.float()).item())
    return sum(losses) / len(losses)
