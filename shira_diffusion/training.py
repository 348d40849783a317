"""DreamBooth-style style training of SHiRA adapters (and a LoRA baseline in the same loop), on accelerate.

Two SHiRA implementations:
- `sparse` (default): only the masked values are parameters. Each target weight gets a parametrization
  `W_eff = W_frozen + scatter(values)` (torch.nn.utils.parametrize), so the optimizer holds k values per
  weight instead of the whole tensor. Weight decay applies to the values, i.e. pulls the weights toward
  the base model (as LoRA's decay does to its factors).
- `hook`: the paper's "turn any trainer into SHiRA": the full target weights are trainable and a
  `register_post_accumulate_grad_hook` zeroes their gradient outside the mask. Adam's moments then stay
  zero there, so Adam never moves those weights; AdamW's decoupled weight decay would, so these weights sit
  in a param group without decay and the same decay is applied by hand to (W - W0) at the mask positions.
Both give the same adapter from the same seed and data, up to float reordering.

Usage:
    from shira_diffusion.training import TrainingConfig, train
    result = train(TrainingConfig(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                  train_data_dir="bluefire/", output_dir="out", max_train_steps=1000))
    pipe.load_shira_weights(result.adapter_path)
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .data import StyleDataset, collate, read_image_folder
from .format import SHIRA_WEIGHT_NAME, ShiraAdapter, SparseDelta
from .masks import MASK_TYPES, build_masks

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class TrainingConfig:
    """Every `shira-diffusion train` flag; names and meanings follow diffusers' train_dreambooth_lora.py."""

    pretrained_model_name_or_path: str
    train_data_dir: str
    output_dir: str = "shira-model"
    revision: str | None = None
    variant: str | None = None
    instance_prompt: str | None = None
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    seed: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_steps: int = 100
    validation_inference_steps: int = 25
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    train_text_encoder: bool = False
    dataloader_num_workers: int = 0
    adapter: str = "shira"
    mask: str = "snip"
    density: float = 0.02
    shira_r: int | None = None
    impl: str = "sparse"
    target_modules: list[str] | None = None
    target_conv: bool = False
    calibration_batches: int = 4
    rank: int = 64


@dataclass
class TrainingResult:
    adapter_path: Path
    output_dir: Path
    global_step: int
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    steps_per_second: float = 0.0


class ConfigError(ValueError):
    """A training option is invalid; raised before anything is loaded or trained."""


# ---- targets ------------------------------------------------------------------------------------------
def find_targets(model: nn.Module, patterns: tuple[str, ...] | list[str], include_conv: bool = False) -> dict[str, nn.Module]:
    """Modules whose name is a pattern or ends with '.'+pattern (Linear, and Conv2d with include_conv).

    Usage: find_targets(unet, UNET_TARGETS)  -> {"down_blocks.1...attn1.to_q": Linear, ...}
    """
    found: dict[str, nn.Module] = {}
    matched = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and include_conv:
            found[name] = module
            continue
        if not isinstance(module, nn.Linear):
            continue
        for pattern in patterns:
            if name == pattern or name.endswith("." + pattern):
                found[name] = module
                matched.add(pattern)
    unknown = [p for p in patterns if p not in matched]
    if unknown:
        raise ConfigError(f"target module {unknown[0]!r} matches no Linear layer of {type(model).__name__}")
    return found


# ---- SHiRA trainables -----------------------------------------------------------------------------------
class SparseDeltaParametrization(nn.Module):
    """W_eff = W + scatter(values at positions); only `values` is trainable."""

    def __init__(self, positions: torch.Tensor):
        super().__init__()
        self.register_buffer("positions", positions, persistent=False)
        self.values = nn.Parameter(torch.zeros(positions.numel()))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten().index_add(0, self.positions, self.values.to(weight.dtype)).view_as(weight)


class ShiraTrainable:
    """The SHiRA part of one model under training: attach (sparse or hook), optimise, export deltas.

    Usage: trainable = ShiraTrainable(unet, {"...to_q": positions}, impl="sparse"); trainable.deltas()
    """

    def __init__(self, model: nn.Module, positions: dict[str, torch.Tensor], impl: str):
        self.model, self.impl, self.positions = model, impl, positions
        self.modules = {name: model.get_submodule(name) for name in positions}
        self.base_values: dict[str, torch.Tensor] = {}
        self.hooks = []
        for name, module in self.modules.items():
            pos = positions[name].to(module.weight.device)
            self.positions[name] = pos
            if impl == "sparse":
                module.weight.requires_grad_(False)
                parametrize.register_parametrization(module, "weight", SparseDeltaParametrization(pos).to(pos.device))
            else:
                weight = module.weight
                weight.requires_grad_(True)
                self.base_values[name] = weight.detach().view(-1).index_select(0, pos).float().clone()
                self.hooks.append(weight.register_post_accumulate_grad_hook(self._mask_gradient(pos)))

    @staticmethod
    def _mask_gradient(positions: torch.Tensor):
        def hook(parameter: torch.Tensor) -> None:
            grad = parameter.grad.view(-1)
            kept = grad.index_select(0, positions)
            grad.zero_()
            grad.index_copy_(0, positions, kept)

        return hook

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self.impl == "sparse":
            return [(f"{n}.values", m.parametrizations.weight[0].values) for n, m in self.modules.items()]
        return [(f"{n}.weight", m.weight) for n, m in self.modules.items()]

    def param_group(self, weight_decay: float) -> dict:
        decay = weight_decay if self.impl == "sparse" else 0.0  # hook: decay applied by `decay_toward_base`
        return {"params": [p for _, p in self.named_parameters()], "weight_decay": decay}

    @torch.no_grad()
    def decay_toward_base(self, lr: float, weight_decay: float) -> None:
        """Hook impl: AdamW's decoupled decay, restricted to the mask and applied to W - W0."""
        if self.impl != "hook" or weight_decay == 0:
            return
        for name, module in self.modules.items():
            flat, pos = module.weight.data.view(-1), self.positions[name]
            current = flat.index_select(0, pos)
            delta = current.float() - self.base_values[name]
            flat.index_copy_(0, pos, (current.float() - lr * weight_decay * delta).to(flat.dtype))

    @torch.no_grad()
    def deltas(self) -> dict[str, SparseDelta]:
        """The trained change per weight, as SparseDeltas in fp32 (keyed by parameter name)."""
        result = {}
        for name, module in self.modules.items():
            pos = self.positions[name]
            if self.impl == "sparse":
                values = module.parametrizations.weight[0].values.detach().float()
                shape = module.parametrizations.weight.original.shape
            else:
                values = module.weight.detach().view(-1).index_select(0, pos).float() - self.base_values[name]
                shape = module.weight.shape
            result[f"{name}.weight"] = SparseDelta(tuple(shape), pos.cpu(), values.cpu())
        return result

    def remove(self) -> None:
        """Detach from the model, leaving the trained weights in place (W0 + delta)."""
        for hook in self.hooks:
            hook.remove()
        if self.impl == "sparse":
            for module in self.modules.values():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def attach_lora(model: nn.Module, module_names: list[str], rank: int) -> list[nn.Parameter]:
    """A LoRA of `rank` on exactly these modules, through PEFT (diffusers' training-script recipe)."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=module_names))
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


# ---- the run --------------------------------------------------------------------------------------------
def validate_config(config: TrainingConfig) -> None:
    """Every check that can fail before loading a model."""
    if config.resolution % 8:
        raise ConfigError(f"--resolution must be a multiple of 8, got {config.resolution}")
    if config.adapter not in ("shira", "lora"):
        raise ConfigError(f"--adapter must be shira or lora, got {config.adapter!r}")
    if config.mask not in MASK_TYPES:
        raise ConfigError(f"--mask must be one of {list(MASK_TYPES)}, got {config.mask!r}")
    if config.impl not in ("sparse", "hook"):
        raise ConfigError(f"--impl must be sparse or hook, got {config.impl!r}")
    if not 0 < config.density <= 1:
        raise ConfigError(f"--density must be in (0, 1], got {config.density}")
    if config.shira_r is not None and config.shira_r <= 0:
        raise ConfigError(f"--shira_r must be positive, got {config.shira_r}")
    if config.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ConfigError(f"--mixed_precision must be no, fp16 or bf16, got {config.mixed_precision!r}")
    if config.with_prior_preservation and (not config.class_data_dir or not config.class_prompt):
        raise ConfigError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if config.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from None
    if config.max_train_steps is None and config.num_train_epochs < 1:
        raise ConfigError("give --max_train_steps or --num_train_epochs >= 1")


def _load_models(config: TrainingConfig, model_path: str):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, PretrainedConfig

    def text_encoder(subfolder: str):
        cls_name = PretrainedConfig.from_pretrained(model_path, subfolder=subfolder, revision=config.revision).architectures[0]
        import transformers

        return getattr(transformers, cls_name).from_pretrained(model_path, subfolder=subfolder, revision=config.revision, variant=config.variant)

    is_sdxl = (Path(model_path) / "text_encoder_2").is_dir() if Path(model_path).is_dir() else False
    if not Path(model_path).is_dir():
        from diffusers import DiffusionPipeline

        is_sdxl = "text_encoder_2" in DiffusionPipeline.load_config(model_path, revision=config.revision)
    suffixes = ["", "_2"] if is_sdxl else [""]
    tokenizers = [AutoTokenizer.from_pretrained(model_path, subfolder=f"tokenizer{s}", revision=config.revision) for s in suffixes]
    text_encoders = [text_encoder(f"text_encoder{s}") for s in suffixes]
    vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", revision=config.revision, variant=config.variant)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", revision=config.revision, variant=config.variant)
    noise_scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", revision=config.revision)
    return is_sdxl, tokenizers, text_encoders, vae, unet, noise_scheduler


def _encode_prompts(captions, tokenizers, text_encoders, is_sdxl):
    embeddings, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        output = encoder(ids.to(encoder.device), output_hidden_states=is_sdxl)
        if is_sdxl:
            embeddings.append(output.hidden_states[-2])
            pooled = output[0]  # text_encoder_2's projected pooled output
        else:
            embeddings.append(output[0])
    return torch.cat(embeddings, dim=-1), pooled


def _generate_class_images(config: TrainingConfig, model_path: str) -> None:
    from diffusers import DiffusionPipeline

    folder = Path(config.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    missing = config.num_class_images - len(existing)
    if missing <= 0:
        return
    pipe = DiffusionPipeline.from_pretrained(model_path, revision=config.revision, variant=config.variant)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(config.seed)
    for index in range(missing):
        image = pipe(config.class_prompt, generator=generator, height=config.resolution, width=config.resolution).images[0]
        image.save(folder / f"class_{len(existing) + index:05d}.png")
    del pipe


class _PriorPairs(torch.utils.data.Dataset):
    """Instance example i together with class example i % n (DreamBooth prior preservation)."""

    def __init__(self, instances: StyleDataset, classes: StyleDataset):
        self.instances, self.classes = instances, classes

    def set_epoch(self, epoch: int) -> None:
        self.instances.set_epoch(epoch)
        self.classes.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int):
        return self.instances[index], self.classes[index % len(self.classes)]


def _collate_pairs(batch):
    return collate([pair[0] for pair in batch] + [pair[1] for pair in batch])


def train(config: TrainingConfig) -> TrainingResult:
    """Run one training job; returns where the adapter went and what was measured."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from tqdm.auto import tqdm

    validate_config(config)
    records = read_image_folder(config.train_data_dir, config.instance_prompt)
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
    )
    set_seed(config.seed)
    model_path = config.pretrained_model_name_or_path
    if config.with_prior_preservation and accelerator.is_main_process:
        _generate_class_images(config, model_path)
    accelerator.wait_for_everyone()

    is_sdxl, tokenizers, text_encoders, vae, unet, noise_scheduler = _load_models(config, model_path)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (vae, unet, *text_encoders):
        model.requires_grad_(False)
    # Frozen weights in the compute dtype; trainable SHiRA values / LoRA factors stay fp32. The hook impl
    # trains the full target weights, which must stay fp32.
    keep_fp32 = config.adapter == "shira" and config.impl == "hook"
    for model in (vae, unet, *text_encoders):
        dtype = torch.float32 if keep_fp32 and model is not vae else weight_dtype
        model.to(accelerator.device)
        if model.dtype != dtype:  # .to(dtype) only when it changes anything (diffusers warns on every cast)
            model.to(dtype=dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    # Targets per component, validated before any work.
    components = {"unet": unet}
    if config.train_text_encoder:
        components.update({f"text_encoder{s}": te for s, te in zip(["", "_2"], text_encoders)})
    targets = {}
    for name, model in components.items():
        patterns = config.target_modules if name == "unet" and config.target_modules else (UNET_TARGETS if name == "unet" else TEXT_ENCODER_TARGETS)
        targets[name] = find_targets(model, tuple(patterns), include_conv=config.target_conv and name == "unet")

    dataset = StyleDataset(records, config.resolution, config.center_crop, config.random_flip, config.seed)
    if config.with_prior_preservation:
        class_records = read_image_folder(config.class_data_dir, config.class_prompt)
        class_records = [(path, config.class_prompt) for path, _ in class_records]
        dataset = _PriorPairs(dataset, StyleDataset(class_records, config.resolution, config.center_crop, config.random_flip, config.seed + 1))
    order = torch.Generator().manual_seed(config.seed)  # reseeded per epoch: resumed runs see the same order
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=torch.utils.data.RandomSampler(dataset, generator=order),
        collate_fn=_collate_pairs if config.with_prior_preservation else collate,
        num_workers=config.dataloader_num_workers,
    )

    def diffusion_loss(batch, noise_generator) -> torch.Tensor:
        pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=noise_generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=noise_generator, device=latents.device, dtype=latents.dtype)
        if config.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=noise_generator, device=latents.device)
            noise = noise + config.noise_offset * offset.to(latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=noise_generator, device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(config.train_text_encoder and torch.is_grad_enabled()):
            hidden, pooled = _encode_prompts(batch["captions"], tokenizers, text_encoders, is_sdxl)
        extra = {}
        if is_sdxl:
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

    # Masks: computed once and stored with the run, so a resumed run trains exactly the same positions.
    output_dir.mkdir(parents=True, exist_ok=True)
    mask_file = output_dir / "masks.safetensors"
    trainables: dict[str, ShiraTrainable] = {}
    if config.adapter == "shira":
        from safetensors.torch import load_file, save_file

        if config.resume_from_checkpoint and mask_file.is_file():
            stored = load_file(str(mask_file))
            masks = {c: {n: stored[f"{c}::{n}"] for n in targets[c]} for c in targets}
        else:
            gradients = _calibration_gradients(config, targets, dataloader, diffusion_loss, accelerator) if config.mask in ("grad", "snip") else {}
            masks = {
                c: build_masks(
                    {n: m.weight for n, m in targets[c].items()}, config.mask, density=config.density, r=config.shira_r,
                    seed=config.seed, gradients=gradients.get(c),
                )
                for c in targets
            }
            if accelerator.is_main_process:
                save_file({f"{c}::{n}": p.contiguous() for c in masks for n, p in masks[c].items()}, str(mask_file))
        trainables = {c: ShiraTrainable(components[c], masks[c], config.impl) for c in targets}
        named = [(f"{c}::{n}", p) for c, t in trainables.items() for n, p in t.named_parameters()]
        groups = [t.param_group(config.adam_weight_decay) for t in trainables.values()]
    else:
        named = []
        for c, model in components.items():
            named += [(f"{c}::{i}", p) for i, p in enumerate(attach_lora(model, sorted(targets[c]), config.rank))]
        groups = [{"params": [p for _, p in named], "weight_decay": config.adam_weight_decay}]
    trainable_parameters = sum(p.numel() for _, p in named)

    optimizer_class = torch.optim.AdamW
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    optimizer = optimizer_class(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    updates_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * updates_per_epoch
    epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes, num_training_steps=max_steps * accelerator.num_processes,
    )
    prepared = accelerator.prepare(unet, *[components[c] for c in components if c != "unet"], optimizer, dataloader, lr_scheduler)
    unet, optimizer, dataloader, lr_scheduler = prepared[0], prepared[-3], prepared[-2], prepared[-1]
    noise_generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + 1)

    # Checkpoints hold only what training changes (not the frozen base model): the trainable tensors and
    # the noise generator; accelerate adds optimizer, scheduler and RNG states.
    def save_hook(models, weights, directory):
        from safetensors.torch import save_file

        weights.clear()
        state = {name: p.detach().contiguous() for name, p in named}
        state["__noise_generator__"] = noise_generator.get_state()
        save_file(state, str(Path(directory) / "trainable.safetensors"))

    def load_hook(models, directory):
        from safetensors.torch import load_file

        models.clear()
        state = load_file(str(Path(directory) / "trainable.safetensors"))
        with torch.no_grad():
            for name, p in named:
                p.copy_(state[name])
        noise_generator.set_state(state["__noise_generator__"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, first_epoch, skip_batches = 0, 0, 0
    if config.resume_from_checkpoint:
        checkpoint = _find_checkpoint(output_dir, config.resume_from_checkpoint)
        accelerator.load_state(str(checkpoint))
        global_step = int(checkpoint.name.split("-")[1])
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * config.gradient_accumulation_steps

    if accelerator.is_main_process:
        accelerator.init_trackers("shira-diffusion", config={k: str(v) for k, v in asdict(config).items()})
    progress = tqdm(range(max_steps), initial=global_step, desc="training", disable=not accelerator.is_local_main_process)
    losses: list[float] = []
    start, steps_timed = time.perf_counter(), 0
    for epoch in range(first_epoch, epochs):
        order.manual_seed(config.seed + epoch)
        dataset.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if epoch == first_epoch and skip_batches else dataloader
        unet.train()
        for batch in batches:
            with accelerator.accumulate(unet):
                loss = diffusion_loss(batch, noise_generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_([p for _, p in named], config.max_grad_norm)
                    for trainable in trainables.values():
                        trainable.decay_toward_base(optimizer.param_groups[0]["lr"], config.adam_weight_decay)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            steps_timed += 1
            losses.append(float(accelerator.gather(loss.detach()).mean()))
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            accelerator.log({"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            if accelerator.is_main_process and config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                _prune_checkpoints(output_dir, config.checkpoints_total_limit)
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                accelerator.save_state(str(output_dir / f"checkpoint-{global_step}"))
            if config.validation_prompt and config.validation_steps and global_step % config.validation_steps == 0:
                _validate(config, accelerator, model_path, unet, text_encoders, vae, global_step, weight_dtype)
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
    elapsed = time.perf_counter() - start
    progress.close()

    accelerator.wait_for_everyone()
    if config.validation_prompt:
        _validate(config, accelerator, model_path, unet, text_encoders, vae, global_step, weight_dtype)
    adapter_path = _save_adapter(config, accelerator, components, trainables, is_sdxl, global_step)
    accelerator.end_training()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return TrainingResult(adapter_path, output_dir, global_step, trainable_parameters, losses, peak, steps_timed / max(elapsed, 1e-9))


def _calibration_gradients(config, targets, dataloader, diffusion_loss, accelerator) -> dict[str, dict[str, torch.Tensor]]:
    """Accumulated |dL/dW| per target weight over a few batches of training data, on the base model.

    Each weight's gradient is folded into its accumulator as soon as it is complete and then dropped, so no
    full-model gradient stays alive.
    """
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
    for index, batch in enumerate(dataloader):
        if index >= config.calibration_batches:
            break
        diffusion_loss(batch, generator).backward()
    for handle in handles:
        handle.remove()
    for mods in targets.values():
        for module in mods.values():
            module.weight.requires_grad_(False)
    return sums


def _find_checkpoint(output_dir: Path, which: str) -> Path:
    if which != "latest":
        path = Path(which)
        path = path if path.is_dir() else output_dir / which
        if not path.is_dir():
            raise FileNotFoundError(f"{which}: no such checkpoint folder")
        return path
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise FileNotFoundError(f"{output_dir}: no checkpoint-* folder to resume from")
    return found[-1]


def _prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in found[: max(0, len(found) - limit + 1)]:  # room for the one about to be written
        shutil.rmtree(old)


@torch.no_grad()
def _validate(config, accelerator, model_path, unet, text_encoders, vae, step, weight_dtype) -> list:
    """Generate validation images with the live model; write PNGs and log them."""
    if not accelerator.is_main_process:
        return []
    from diffusers import DiffusionPipeline

    extra = {"text_encoder": accelerator.unwrap_model(text_encoders[0])}
    if len(text_encoders) > 1:
        extra["text_encoder_2"] = accelerator.unwrap_model(text_encoders[1])
    pipe = DiffusionPipeline.from_pretrained(model_path, unet=accelerator.unwrap_model(unet), vae=vae, revision=config.revision, variant=config.variant, **extra)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed)
    images = [
        pipe(config.validation_prompt, num_inference_steps=config.validation_inference_steps, generator=generator,
             height=config.resolution, width=config.resolution).images[0]
        for _ in range(config.num_validation_images)
    ]
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"step-{step:06d}-{index}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    return images


def _save_adapter(config, accelerator, components, trainables, is_sdxl, step) -> Path:
    output_dir = Path(config.output_dir)
    if not accelerator.is_main_process:
        return output_dir / (SHIRA_WEIGHT_NAME if config.adapter == "shira" else LORA_WEIGHT_NAME)
    if config.adapter == "shira":
        adapter = ShiraAdapter(
            {c: t.deltas() for c, t in trainables.items()},
            mask_type=config.mask,
            base_model=config.pretrained_model_name_or_path,
            extra={"impl": config.impl, "steps": step, "instance_prompt": config.instance_prompt, "density_requested": config.density, "shira_r": config.shira_r},
        )
        path = adapter.save(output_dir / SHIRA_WEIGHT_NAME)
    else:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from peft.utils import get_peft_model_state_dict

        # PEFT-style keys + each component's LoraConfig as metadata: diffusers reloads them exactly (files
        # written with convert_state_dict_to_diffusers lose their attention layers in diffusers 0.42).
        models = {c: accelerator.unwrap_model(m) for c, m in components.items()}
        layers = {f"{c}_lora_layers": get_peft_model_state_dict(m) for c, m in models.items()}
        metadata = {f"{c}_lora_adapter_metadata": m.peft_config["default"].to_dict() for c, m in models.items()}
        (StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline).save_lora_weights(output_dir, **layers, **metadata)
        path = output_dir / LORA_WEIGHT_NAME
    _write_model_card(config, output_dir, path, step)
    return path


def _write_model_card(config: TrainingConfig, output_dir: Path, adapter_path: Path, step: int) -> None:
    from PIL import Image

    images = sorted((output_dir / "validation").glob(f"step-{step:06d}-*.png"))
    grid_line = ""
    if images:
        tiles = [Image.open(p) for p in images]
        grid = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
        x = 0
        for tile in tiles:
            grid.paste(tile, (x, 0))
            x += tile.width
        grid.save(output_dir / "samples.png")
        grid_line = f"\n![samples](samples.png)\n\nPrompt: `{config.validation_prompt}`\n"
    kind = f"SHiRA ({config.mask} mask, {config.impl}, " + (f"r={config.shira_r})" if config.shira_r else f"density {config.density})") if config.adapter == "shira" else f"LoRA (rank {config.rank})"
    usage = (
        f'pipe.load_shira_weights("{adapter_path.name}")' if config.adapter == "shira" else f'pipe.load_lora_weights(".", weight_name="{adapter_path.name}")'
    )
    card = f"""---
library_name: shira-diffusion
base_model: {config.pretrained_model_name_or_path}
tags: [shira-diffusion, text-to-image, diffusers, {'shira' if config.adapter == 'shira' else 'lora'}]
---
# {kind} style adapter

- base model: `{config.pretrained_model_name_or_path}`
- instance / trigger prompt: {config.instance_prompt or '(per-image captions)'}
- adapter: {kind}
- steps: {step}, learning rate {config.learning_rate} ({config.lr_scheduler}), batch {config.train_batch_size}, resolution {config.resolution}
{grid_line}
```python
{usage}
```
"""
    (output_dir / "README.md").write_text(card)


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
    device, dtype = pipe.unet.device, pipe.unet.dtype
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
