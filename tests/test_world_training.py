"""The world model's training script: stages checkpoint, resume where they stopped, and export a pipeline
that plain diffusers loads (a few steps at toy batch sizes; the real run is documented in train_base.py)."""

import torch
from diffusers import StableDiffusionPipeline

from shira_diffusion.world import train_base


def test_stages_resume_and_export_a_loadable_pipeline(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    train_base.train_vae(work, steps=2, batch=4, every=1)
    first = (work / "vae.log").read_text().splitlines()
    train_base.train_vae(work, steps=3, batch=4, every=1)  # resumes at step 2, runs one more
    assert [line.split("\t")[0] for line in (work / "vae.log").read_text().splitlines()] == ["1", "2", "3"] and len(first) == 2
    train_base.train_unet(work, steps=2, batch=4, every=2, pool_size=8)
    state = torch.load(work / "unet_state.pt", weights_only=True)
    assert state["step"] == 2 and (work / "unet_ema.pt").is_file()
    train_base.export(work, tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), safety_checker=None)
    assert pipe.unet.dtype == torch.float32 and pipe.tokenizer.tokenize("circle") == ["circle</w>"]
    assert pipe.vae.config.scaling_factor > 0 and (tmp_path / "model" / "tokenizer" / "vocab.json").is_file()
    image = pipe("a red circle on a gray background", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
