"""The world's judge, its analogue of HPSv2: reads a 32 px image back into shape, colour, background and
style strengths, and scores images against the prompts they were generated from.

What it guarantees:
- `parse_prompt` reads the world's prompt grammar ("a red circle on a white background, blue fire style")
  into a `PromptContent`; a prompt naming no world shape (or several, or a background the world has not)
  raises ValueError naming the prompt.
- `Judge.load()` loads the shipped weights `judge.safetensors` (safetensors only, never pickle); a missing
  file raises FileNotFoundError, a file that is not a judge of this world (bad bytes, other names, other
  tensors) raises ValueError naming the file, before anything is used.
- `Judge.predict` / `Judge.score` take a batch (PIL images of any size, or an N x 3 x 32 x 32 float tensor
  in [-1, 1]) and return one result per image, in order; inference is batched under `torch.no_grad`.
- It was trained only on procedural renders (scenes.py + styles.py) with degradations, never on model
  outputs; `train_judge.py` made the weights and wrote their held-out accuracy to `judge.json`.

Usage:
    judge = Judge.load()
    scores = judge.score(images, ["a red circle on a white background, blue fire style"] * len(images))
    summarize(scores)   # {"shape_accuracy": ..., "content_accuracy": ..., "styles": {"blue fire": {"mean": ...}}}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .scenes import BACKGROUNDS, COLOURS, SHAPES
from .styles import STYLES

SIZE = 32  # the judge's input side in pixels
WEIGHTS = Path(__file__).with_name("judge.safetensors")
FORMAT = "shira-world-judge/1"
PRESENCE_THRESHOLD = 0.25  # a style counts as present above this strength
BATCH = 256
_COLOURS = tuple(COLOURS)
_STYLES = tuple(STYLES)


# ----------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptContent:
    """What a prompt asks for; None where the prompt does not name the attribute."""

    shape: str
    colour: str | None = None
    background: str | None = None
    styles: tuple[str, ...] = ()


def parse_prompt(prompt: str) -> PromptContent:
    """Read "a red circle on a white background, blue fire style" into its content.

    The colour is the word right before the shape word, the background the word before "background";
    the styles are those whose trigger phrase (`STYLES[name][0]`) occurs in the prompt."""
    text = " ".join(prompt.lower().split())
    words = re.findall(r"[a-z]+", text)
    shapes = [i for i, word in enumerate(words) if word in SHAPES]
    if not shapes:
        raise ValueError(f"prompt {prompt!r} names no world shape; the world has {list(SHAPES)}")
    if len({words[i] for i in shapes}) > 1:
        raise ValueError(f"prompt {prompt!r} names several shapes {sorted({words[i] for i in shapes})}; the judge reads one")
    at = shapes[0]
    colour = words[at - 1] if at > 0 and words[at - 1] in COLOURS else None
    background = None
    if "background" in words[1:]:
        word = words[words.index("background", 1) - 1]
        if word in BACKGROUNDS:
            background = word
        elif word in COLOURS:  # a colour, but not one the world's backgrounds come in: cannot be judged
            raise ValueError(f"prompt {prompt!r} asks for a {word} background; the world has {list(BACKGROUNDS)}")
    styles = tuple(name for name, (phrase, _) in STYLES.items() if phrase in text)
    return PromptContent(words[at], colour, background, styles)


# ----------------------------------------------------------------------------------------------- network
def _block(inputs: int, outputs: int) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]


class JudgeNet(nn.Module):
    """A small VGG-style CNN on 32 x 32 RGB in [-1, 1] with one linear layer for all four heads.

    `forward` returns {"shape", "colour", "background": logits, "style_logits": logits,
    "styles": sigmoid strengths in [0, 1]}, heads ordered as SHAPES, COLOURS, BACKGROUNDS, STYLES."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(3, w), *_block(w, w), nn.MaxPool2d(2),                  # 16 x 16
            *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),      # 8 x 8
            *_block(2 * w, 4 * w), *_block(4 * w, 4 * w), nn.MaxPool2d(2),  # 4 x 4
            *_block(4 * w, 6 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(6 * w, 6 * w), nn.ReLU(inplace=True),
        )
        self.sizes = (len(SHAPES), len(_COLOURS), len(BACKGROUNDS), len(_STYLES))
        self.heads = nn.Linear(6 * w, sum(self.sizes))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        shape, colour, background, styles = self.heads(self.features(pixels)).split(self.sizes, dim=1)
        return {"shape": shape, "colour": colour, "background": background, "style_logits": styles, "styles": torch.sigmoid(styles)}


def world_metadata() -> dict[str, str]:
    """The names the heads are ordered by; stored in the weights so a judge of another world is refused."""
    return {"format": FORMAT, "shapes": json.dumps(list(SHAPES)), "colours": json.dumps(list(_COLOURS)),
            "backgrounds": json.dumps(list(BACKGROUNDS)), "styles": json.dumps(list(_STYLES))}


# ----------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Prediction:
    """What the judge reads in one image: the most likely names, their probabilities, style strengths."""

    shape: str
    shape_probability: float
    colour: str
    colour_probability: float
    background: str
    background_probability: float
    styles: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """One image judged against its prompt; an attribute the prompt does not name is None (not judged)."""

    content: PromptContent
    prediction: Prediction
    shape_correct: bool
    colour_correct: bool | None
    background_correct: bool | None
    content_correct: bool  # every named attribute correct
    styles: dict[str, float]  # predicted strengths of every world style, asked for or not


# ----------------------------------------------------------------------------------------------- judge
def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> N x 3 x 32 x 32 float in [-1, 1]; other sizes resized (BOX down, bicubic up)."""
    arrays = []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {index} is a {type(image).__name__}; give PIL images or one N x 3 x {SIZE} x {SIZE} tensor")
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            smaller = image.size[0] < SIZE or image.size[1] < SIZE
            image = image.resize((SIZE, SIZE), Image.Resampling.BICUBIC if smaller else Image.Resampling.BOX)
        arrays.append(np.asarray(image, np.float32))
    if not arrays:
        return torch.zeros(0, 3, SIZE, SIZE)
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1).permute(0, 3, 1, 2).contiguous()


def _check_tensor(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, SIZE, SIZE) or not pixels.is_floating_point():
        raise ValueError(f"expected a float tensor N x 3 x {SIZE} x {SIZE} in [-1, 1], got {pixels.dtype} {tuple(pixels.shape)}")
    if pixels.numel() and pixels.abs().max() > 1.5:  # [0, 255] or otherwise unscaled input would be judged as noise
        raise ValueError(f"pixel values must be in [-1, 1], found range [{pixels.min():.3g}, {pixels.max():.3g}]")
    return pixels.float().clamp(-1, 1).contiguous()  # one memory layout: results do not depend on the caller's strides


class Judge:
    """A trained `JudgeNet` with the world's names; see the module docstring."""

    def __init__(self, net: JudgeNet, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "Judge":
        """The judge stored at `path` (default: the shipped `judge.safetensors`)."""
        from safetensors import safe_open

        path = Path(path) if path is not None else WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"judge weights not found: {path} (make them with python -m shira_diffusion.world.train_judge)")
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                state = {key: file.get_tensor(key) for key in file.keys()}
        except Exception as error:  # safetensors raises its own error type on bad bytes
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
        expected = world_metadata()
        wrong = {key: (metadata.get(key), value) for key, value in expected.items() if metadata.get(key) != value}
        if wrong:
            raise ValueError(f"{path} is not a judge of this world; metadata (found, expected): {wrong}")
        net = JudgeNet()
        own = net.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in set(own) & set(state) if state[k].shape != own[k].shape}
        if missing or unexpected or shapes:
            raise ValueError(f"{path} does not match JudgeNet: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                             f"shape (found, expected) {dict(list(shapes.items())[:5])}")
        net.load_state_dict(state)
        return cls(net, device)

    @torch.no_grad()
    def _outputs(self, images: Sequence[Image.Image] | torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = _check_tensor(images) if isinstance(images, torch.Tensor) else to_pixels(images)
        parts = [self.net(chunk.to(self.device)) for chunk in pixels.split(BATCH)]
        if not parts:
            return {}
        return {key: torch.cat([p[key] for p in parts]).float().cpu() for key in parts[0]}

    def predict(self, images: Sequence[Image.Image] | torch.Tensor) -> list[Prediction]:
        """One `Prediction` per image, in order."""
        out = self._outputs(images)
        if not out:
            return []
        names = {"shape": SHAPES, "colour": _COLOURS, "background": BACKGROUNDS}
        best = {key: out[key].softmax(1).max(1) for key in names}
        return [Prediction(
            names["shape"][best["shape"].indices[i]], float(best["shape"].values[i]),
            names["colour"][best["colour"].indices[i]], float(best["colour"].values[i]),
            names["background"][best["background"].indices[i]], float(best["background"].values[i]),
            {name: float(out["styles"][i, j]) for j, name in enumerate(_STYLES)},
        ) for i in range(len(out["styles"]))]

    def score(self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str]) -> list[Score]:
        """Each image judged against its prompt (same order, same length)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per image, not one string")
        count = len(images)
        if count != len(prompts):
            raise ValueError(f"got {count} images but {len(prompts)} prompts; give one prompt per image")
        contents = [parse_prompt(p) for p in prompts]  # parse first: a bad prompt fails before inference
        return [_score(c, p) for c, p in zip(contents, self.predict(images))]


def _score(content: PromptContent, prediction: Prediction) -> Score:
    shape = prediction.shape == content.shape
    colour = None if content.colour is None else prediction.colour == content.colour
    background = None if content.background is None else prediction.background == content.background
    return Score(content, prediction, shape, colour, background,
                 shape and colour is not False and background is not False, dict(prediction.styles))


def summarize(scores: Sequence[Score]) -> dict:
    """Mean accuracy per attribute (over scores whose prompt names it; None if none does), the share
    of fully correct content, and mean / std / share present of each style strength."""
    def accuracy(values: list[bool | None]) -> float | None:
        judged = [v for v in values if v is not None]
        return float(np.mean(judged)) if judged else None

    summary: dict = {"count": len(scores)}
    for key in ("shape", "colour", "background", "content"):
        summary[f"{key}_accuracy"] = accuracy([getattr(s, f"{key}_correct") for s in scores])
    summary["styles"] = {}
    for name in _STYLES:
        strengths = np.array([s.styles[name] for s in scores], np.float64)
        summary["styles"][name] = {
            "mean": float(strengths.mean()) if len(strengths) else None,
            "std": float(strengths.std()) if len(strengths) else None,
            "present": float((strengths > PRESENCE_THRESHOLD).mean()) if len(strengths) else None,
        }
    return summary
