"""The shapes world: a procedural, captioned image world with two styles, a text-to-image model trained
on it that ships in the package, and a judge that reads content and style strength off an image.

It is how this package shows, offline and on 2 CPU cores, what a style adapter does to real images:
a style learnt, half a style at alpha 0.5, two styles fused without one erasing the other.

- `scenes`: Scene (ground truth), sample_scene, render; SHAPES, COLOURS, BACKGROUNDS, HELDOUT.
- `styles`: STYLES ("blue fire", "painting"), stylize(image, coverage, strengths, rng).
- `datasets`: write_style_dataset (the Bluefire / Paintings analogues, 54 and 90 images).
- `model`: pipeline() -> the trained SD 1.5-layout pipeline; model_dir(); the component configs.
- `judge`: Judge.load().score(images, prompts) -> content correctness and style strengths.
- `evaluate`: generate on the model and measure with the judge (base quality, styles alone and fused).
- `adapters`: the one training recipe for SHiRA and LoRA, and the four adapters shipped in the package.
- `train_base`: the script that trained the model (resumable), `vocabulary`: its tokenizer.

Usage:
    from shira_diffusion import world
    pipe = world.pipeline()
    images = pipe(["a red circle on a gray background"] * 4, num_inference_steps=25).images
"""

from .datasets import STYLE_SETS, write_style_dataset
from .judge import Judge, parse_prompt, summarize
from .model import GUIDANCE_SCALE, INFERENCE_STEPS, RESOLUTION, model_dir, pipeline
from .scenes import BACKGROUNDS, COLOURS, HELDOUT, SHAPES, Scene, combinations, render, sample_scene
from .styles import STYLES, styled_caption, stylize

__all__ = [
    "BACKGROUNDS", "COLOURS", "GUIDANCE_SCALE", "HELDOUT", "Judge", "parse_prompt", "summarize", "INFERENCE_STEPS", "RESOLUTION", "SHAPES", "STYLES", "STYLE_SETS",
    "Scene", "combinations", "model_dir", "pipeline", "render", "sample_scene", "styled_caption", "stylize", "write_style_dataset",
]
