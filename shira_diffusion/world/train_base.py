"""Train the world model from scratch on 2 CPU cores: the VAE, then the UNet with its text encoder.

Seeded and resumable: every stage checkpoints into the work folder (`--work`, outside the package) and
picks up where it stopped when run again; `export` writes the pipeline folder that ships in the package.
Only plain scenes of the training split (`scenes.combinations("train")`) teach the UNet; the VAE also sees
styled images, as SD's VAE saw every kind of picture, so that adapters can draw styles through it.

    python -m shira_diffusion.world.train_base vae    --work runs/world --steps 1800
    python -m shira_diffusion.world.train_base unet   --work runs/world --steps 7500
    python -m shira_diffusion.world.train_base export --work runs/world --to shira_diffusion/world/weights

Each stage logs `step, loss, seconds` to work/<stage>.log. The shipped weights (2-core AMD EPYC, one torch thread
per stage): the VAE ran 1800 steps in about 16 minutes (started with --steps 2500 and resumed at step 800 with
--steps 1800, which shortened its cosine schedule from there on); the latent pool took 1.5 minutes; the UNet and
text encoder ran 7,500 steps (`unet --steps 7500`) in 59 minutes; export then wrote world/weights/. Training longer
resumes from the work folder (`unet --steps 15000`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .model import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, RESOLUTION
from .scenes import render, sample_scene
from .styles import STYLES, stylize
from .vocabulary import MAX_LENGTH, build_tokenizer

CAPTION_DROPOUT = 0.1  # share of empty captions, for classifier-free guidance
EMA_DECAY = 0.999
SNR_GAMMA = 5.0


def _pixels(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, np.float32) for i in images]) / 127.5 - 1).permute(0, 3, 1, 2)


def vae_batch(rng: np.random.Generator, size: int) -> torch.Tensor:
    """Scenes of every combination, half of them styled at random strengths (one or both styles)."""
    images = []
    for _ in range(size):
        image, coverage = render(sample_scene(rng), RESOLUTION, rng)
        if rng.random() < 0.5:
            strengths = {name: float(rng.uniform(0.2, 1.0)) for name in STYLES if rng.random() < 0.6}
            image = stylize(image, coverage, strengths, rng)
        images.append(image)
    return _pixels(images)


class Checkpoint:
    """Weights (safetensors) and optimizer / step / RNG state of one stage in the work folder."""

    def __init__(self, work: Path, stage: str):
        self.work, self.stage = work, stage

    def exists(self) -> bool:
        return (self.work / f"{self.stage}_state.pt").is_file()

    def save(self, modules: dict[str, torch.nn.Module], optimizer, step: int, rng: np.random.Generator) -> None:
        for name, module in modules.items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, self.work / f"{self.stage}_{name}.safetensors")
        state = {"optimizer": optimizer.state_dict(), "step": step, "rng": json.dumps(rng.bit_generator.state)}
        torch.save(state, self.work / f"{self.stage}_state.tmp")
        (self.work / f"{self.stage}_state.tmp").replace(self.work / f"{self.stage}_state.pt")  # the state marks a complete checkpoint

    def load(self, modules: dict[str, torch.nn.Module], optimizer) -> tuple[int, np.random.Generator]:
        for name, module in modules.items():
            module.load_state_dict(load_file(self.work / f"{self.stage}_{name}.safetensors"))
        state = torch.load(self.work / f"{self.stage}_state.pt", weights_only=True)  # our own file; still no pickled code
        optimizer.load_state_dict(state["optimizer"])
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(state["rng"])
        return state["step"], rng


def _log(work: Path, stage: str, step: int, loss: float, started: float) -> None:
    line = f"{step}\t{loss:.5f}\t{time.perf_counter() - started:.0f}"
    print(f"{stage} {line}", flush=True)
    with open(work / f"{stage}.log", "a") as log:
        log.write(line + "\n")


def train_vae(work: Path, steps: int, batch: int = 32, seed: int = 0, every: int = 200) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    checkpoint = Checkpoint(work, "vae")
    step, rng = checkpoint.load({"vae": vae}, optimizer) if checkpoint.exists() else (0, np.random.default_rng(seed))
    started, losses = time.perf_counter(), []
    while step < steps:
        for group in optimizer.param_groups:  # cosine decay to 1 % over the planned steps
            group["lr"] = 1e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        pixels = vae_batch(rng, batch)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # L1 keeps edges and brush texture sharper than MSE alone; the KL term only keeps latents tame
        loss = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            _log(work, "vae", step, float(np.mean(losses)), started)
            losses = []
            checkpoint.save({"vae": vae}, optimizer, step, rng)


def _text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)
    return CLIPTextModel(config)


def _load_vae(work: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict(load_file(work / "vae_vae.safetensors"))
    return vae.eval().requires_grad_(False)


def latent_pool(work: Path, tokenizer, count: int, seed: int) -> dict[str, torch.Tensor]:
    """Plain training-split scenes encoded once (posterior mean and std) with their token ids; cached."""
    path = work / "unet_pool.safetensors"
    if path.is_file():
        return load_file(path)
    vae, rng = _load_vae(work), np.random.default_rng(seed + 1)
    means, stds, ids = [], [], []
    with torch.no_grad():
        for start in range(0, count, 256):
            scenes = [sample_scene(rng, "train") for _ in range(min(256, count - start))]
            posterior = vae.encode(_pixels([render(scene, RESOLUTION, rng)[0] for scene in scenes])).latent_dist
            means.append(posterior.mean.half())
            stds.append(posterior.std.half())
            ids.append(tokenizer([s.caption for s in scenes], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids)
    pool = {"mean": torch.cat(means), "std": torch.cat(stds), "input_ids": torch.cat(ids)}
    pool["scaling_factor"] = torch.tensor([1.0 / float(torch.cat(means).float().std())])  # unit-variance latents, as SD's 0.18215
    save_file({k: v.contiguous() for k, v in pool.items()}, path)
    return pool


def train_unet(work: Path, steps: int, batch: int = 32, seed: int = 0, every: int = 250, pool_size: int = 50_000) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr

    tokenizer = build_tokenizer(work / "tokenizer")
    pool = latent_pool(work, tokenizer, pool_size, seed)
    empty = tokenizer("", padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    torch.manual_seed(seed)
    unet, text_encoder = UNet2DConditionModel(**UNET_CONFIG), _text_encoder(tokenizer)
    scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    optimizer = torch.optim.AdamW([{"params": unet.parameters(), "lr": 5e-4}, {"params": text_encoder.parameters(), "lr": 2.5e-4}], weight_decay=1e-2)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    ema = EMAModel(list(unet.parameters()) + list(text_encoder.parameters()), decay=EMA_DECAY)
    modules = {"unet": unet, "text_encoder": text_encoder}
    checkpoint = Checkpoint(work, "unet")
    step, rng = checkpoint.load(modules, optimizer) if checkpoint.exists() else (0, np.random.default_rng(seed))
    if (work / "unet_ema.pt").is_file():
        ema.load_state_dict(torch.load(work / "unet_ema.pt", weights_only=True))
    scale, started, losses = float(pool["scaling_factor"]), time.perf_counter(), []
    while step < steps:
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * min(1.0, (step + 1) / 500)  # warm-up, then constant (the run may stop anywhere)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        index = torch.from_numpy(rng.integers(len(pool["mean"]), size=batch))
        latents = (pool["mean"][index].float() + pool["std"][index].float() * torch.randn(batch, 4, RESOLUTION // 2, RESOLUTION // 2, generator=generator)) * scale
        ids = pool["input_ids"][index].clone()
        ids[torch.from_numpy(rng.random(batch) < CAPTION_DROPOUT)] = empty
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text_encoder(ids)[0]).sample
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=SNR_GAMMA) / snr  # min-SNR weighting (Hang et al. 2023)
        loss = (weights * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        optimizer.step()
        ema.step(list(unet.parameters()) + list(text_encoder.parameters()))
        step += 1
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            _log(work, "unet", step, float(np.mean(losses)), started)
            losses = []
            torch.save(ema.state_dict(), work / "unet_ema.tmp")
            checkpoint.save(modules, optimizer, step, rng)
            (work / "unet_ema.tmp").replace(work / "unet_ema.pt")


def export(work: Path, to: Path, use_ema: bool = True) -> None:
    """Write the pipeline folder (fp16 safetensors, EMA weights) that `model.pipeline()` loads."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    tokenizer = build_tokenizer(work / "tokenizer")
    pool_meta = load_file(work / "unet_pool.safetensors")
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=float(pool_meta["scaling_factor"]))
    vae.load_state_dict(load_file(work / "vae_vae.safetensors"))
    unet, text_encoder = UNet2DConditionModel(**UNET_CONFIG), _text_encoder(tokenizer)
    unet.load_state_dict(load_file(work / "unet_unet.safetensors"))
    text_encoder.load_state_dict(load_file(work / "unet_text_encoder.safetensors"))
    if use_ema:
        ema = EMAModel(list(unet.parameters()) + list(text_encoder.parameters()), decay=EMA_DECAY)
        ema.load_state_dict(torch.load(work / "unet_ema.pt", weights_only=True))
        ema.copy_to(list(unet.parameters()) + list(text_encoder.parameters()))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # UNet and VAE in fp16 (half the package size; diffusers loads them as fp32 unless told otherwise). The text
    # encoder stays fp32: transformers loads a model in its stored dtype, and fp16 prompt embeddings would make
    # the fp32 UNet fail for users who call StableDiffusionPipeline.from_pretrained(folder) without a dtype.
    unet.half(), vae.half()
    pipe.save_pretrained(str(to), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # transformers 5 writes tokenizer.json only; older versions read these
        shutil.copy(work / "tokenizer" / name, Path(to) / "tokenizer" / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("vae", "unet", "export"))
    parser.add_argument("--work", type=Path, required=True, help="checkpoint folder (resumed when it holds one)")
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps of the stage")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--to", type=Path, default=None, help="export: the pipeline folder to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "vae":
        train_vae(args.work, args.steps or 1800)
    elif args.stage == "unet":
        train_unet(args.work, args.steps or 7500)
    else:
        if args.to is None:
            parser.error("export needs --to FOLDER")
        export(args.work, args.to)


if __name__ == "__main__":
    main()
