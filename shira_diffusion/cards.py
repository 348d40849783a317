"""Hub model cards (README.md) for the adapters this package writes, built with huggingface_hub's ModelCard and
ModelCardData: SHiRA adapters (`ShiraAdapter.save_pretrained`, the trainer) and the trainer's LoRA baseline.

Metadata, chosen once here:
- `license`: the caller's; else the base model's own card licence, read offline (a local model folder's README.md
  or the Hub cache's copy), since an adapter is a derivative of its base model and licences such as CreativeML
  OpenRAIL-M bind derivatives; else "other" (unknown terms: the Hub's value for "see the card", not a guess).
- `base_model`: a Hub repo id only (a Hub cache snapshot folder counts as its repo); the Hub refuses an upload whose
  card names a local path there, so a local base model is named in the text and the usage block instead.
- `library_name`: "diffusers" for the LoRA baseline (plain diffusers' `load_lora_weights` loads it);
  "shira-diffusion" for SHiRA, since only this package loads the file (the usage block shows how); "diffusers"
  is in its tags.
- `instance_prompt`, and a `widget` of the run's sample images (`text` = prompt, `output.url` = the image's path in
  the repo), which the Hub shows as the card's gallery.
- The usage block runs as written: the base model's pipeline class (read from its model_index.json), and the
  adapter's Hub repo id when known, else the local folder the card was written to.

Usage:
    card = adapter_card("shira", weight_name="shira_weights.safetensors", load_from="me/bluefire",
                        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", title="Blue fire", summary="...")
    card.save("out/README.md")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .trainables import ADAPTERS

KINDS = ADAPTERS  # the adapter kinds a card describes
DEFAULT_LICENSE = "other"
# diffusers pipeline class -> (this package's class for it, the Hub tags diffusers' own training scripts use)
FAMILIES = {
    "StableDiffusionPipeline": ("ShiraStableDiffusionPipeline", ("stable-diffusion", "stable-diffusion-diffusers")),
    "StableDiffusionXLPipeline": ("ShiraStableDiffusionXLPipeline", ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")),
    "StableDiffusion3Pipeline": ("ShiraStableDiffusion3Pipeline", ("sd3", "sd3-diffusers")),
    "FluxPipeline": ("ShiraFluxPipeline", ("flux", "flux-diffusers")),
}
TAGS = {
    "shira": ("shira", "shira-diffusion", "sparse-adapter", "text-to-image", "diffusers", "template:sd-lora"),
    "lora": ("lora", "text-to-image", "diffusers", "diffusers-training", "template:sd-lora", "shira-diffusion"),
}


@dataclass(frozen=True)
class Sample:
    """A sample image of the card's gallery: its prompt and its path relative to the card's folder (the repo root)."""

    prompt: str
    path: str


# ---- what is known about the base model, offline ------------------------------------------------------------------
def hub_model_id(name_or_path: str | None) -> str | None:
    """The Hub repo id of a base model given as a repo id or as a Hub cache snapshot folder
    (`.../models--owner--name/snapshots/<commit>`); None for any other local folder or nothing.

    Usage: hub_model_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    """
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if path.exists():
        parts = path.resolve().parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3].removeprefix("models--").replace("--", "/")  # the cache's own naming; "--" is not allowed in ids
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def _base_file(name_or_path: str, filename: str) -> Path | None:
    """`filename` of a base model: in its local folder, or in the Hub cache (never downloaded)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    repo_id = hub_model_id(name_or_path)
    cached = try_to_load_from_cache(repo_id, filename) if repo_id else None
    return Path(cached) if isinstance(cached, str) else None


def base_model_license(name_or_path: str | None) -> str | None:
    """The `license` in the base model's own card (README.md) if it can be read offline, else None.

    Usage: base_model_license("model/")  # e.g. "creativeml-openrail-m"
    """
    card = _base_file(name_or_path, "README.md") if name_or_path else None
    if card is None:
        return None
    try:
        return ModelCard.load(card, ignore_metadata_errors=True).data.license
    except (OSError, ValueError):  # an unreadable or malformed card says nothing about the licence
        return None


def pipeline_class(name_or_path: str | None) -> str | None:
    """The diffusers pipeline class in the base model's model_index.json (read offline), e.g. "StableDiffusionPipeline"."""
    index = _base_file(name_or_path, "model_index.json") if name_or_path else None
    if index is None:
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def is_world_model(name_or_path: str | None) -> bool:
    """Whether the base model is the shapes world's model shipped in this package (`world.model_dir()`)."""
    if not name_or_path or not Path(name_or_path).is_dir():
        return False
    shipped = Path(str(resources.files("shira_diffusion").joinpath("world/weights")))
    return Path(name_or_path).resolve() == shipped.resolve()


# ---- the card ------------------------------------------------------------------------------------------------------
def _quote(text: str) -> str:
    return json.dumps(text)  # a valid Python string literal (escapes quotes, backslashes, non-ASCII)


def _pipeline_lines(kind: str, base_model: str | None) -> tuple[list[str], str]:
    """(import lines, the line that makes `pipe`) for the base model's family."""
    if is_world_model(base_model):  # the package's own model: no path into site-packages in the card
        if kind == "shira":
            return ["from shira_diffusion import world"], "pipe = world.pipeline(device=device)"
        return (["from diffusers import StableDiffusionPipeline", "from shira_diffusion import world"],
                "pipe = StableDiffusionPipeline.from_pretrained(str(world.model_dir())).to(device)")
    if base_model is None:  # nothing to load it from: say what `pipe` must be
        unknown = "a diffusers pipeline of the base model (the adapter file does not name it)"
        if kind == "lora":
            return [], f"# `pipe`: {unknown}"
        return ["from shira_diffusion import add_shira_support"], f"pipe = add_shira_support(pipe)  # `pipe`: {unknown}"
    base, family = _quote(base_model), pipeline_class(base_model)
    if kind == "lora":
        name = family if family in FAMILIES else "DiffusionPipeline"
        return [f"from diffusers import {name}"], f"pipe = {name}.from_pretrained({base}).to(device)"
    if family in FAMILIES:
        name = FAMILIES[family][0]
        return [f"from shira_diffusion import {name}"], f"pipe = {name}.from_pretrained({base}).to(device)"
    return (["from diffusers import DiffusionPipeline", "from shira_diffusion import add_shira_support"],
            f"pipe = add_shira_support(DiffusionPipeline.from_pretrained({base})).to(device)")


def usage_code(kind: str, *, weight_name: str, load_from: str, base_model: str | None, prompt: str | None = None) -> str:
    """A Python snippet that loads the base model's pipeline and the adapter from `load_from` (a Hub repo id or a
    folder), and generates `prompt` when one is given.

    Usage: usage_code("lora", weight_name="pytorch_lora_weights.safetensors", load_from="me/style", base_model="model/")
    """
    imports, make_pipe = _pipeline_lines(kind, base_model)
    verb = "load_shira_weights" if kind == "shira" else "load_lora_weights"
    lines = (["# pip install shira-diffusion"] if kind == "shira" or is_world_model(base_model) else ["# pip install diffusers transformers peft"])
    lines += ["import torch"] + imports + ["", 'device = "cuda" if torch.cuda.is_available() else "cpu"', make_pipe,
                                           f"pipe.{verb}({_quote(load_from)}, weight_name={_quote(weight_name)})"]
    if prompt:
        lines.append(f"image = pipe({_quote(prompt)}).images[0]")
    return "\n".join(lines)


def card_data(kind: str, *, base_model: str | None, license: str | None = None, instance_prompt: str | None = None,
              samples: Sequence[Sample] = ()) -> ModelCardData:
    """The card's YAML metadata (see the module docstring for each field's choice).

    Usage: card_data("lora", base_model="model/", samples=[Sample("a fox", "validation/step-000100-0.png")])
    """
    if kind not in KINDS:
        raise ValueError(f"card kind must be one of {list(KINDS)}, got {kind!r}")
    family = FAMILIES.get(pipeline_class(base_model) or "", (None, ()))[1]
    return ModelCardData(
        license=license or base_model_license(base_model) or DEFAULT_LICENSE,
        base_model=hub_model_id(base_model),
        library_name="shira-diffusion" if kind == "shira" else "diffusers",
        pipeline_tag="text-to-image",
        tags=list(dict.fromkeys(TAGS[kind] + family)),
        instance_prompt=instance_prompt or None,
        widget=[{"text": s.prompt, "output": {"url": s.path}} for s in samples] or None,
    )


def adapter_card(kind: str, *, weight_name: str, load_from: str, base_model: str | None, title: str, summary: str,
                 details: Sequence[str] = (), license: str | None = None, instance_prompt: str | None = None,
                 samples: Sequence[Sample] = (), grid: str | None = None, local: bool = False) -> ModelCard:
    """A model card for a `kind` ("shira" or "lora") adapter file `weight_name`: metadata (`card_data`), `title`,
    `summary`, the trigger prompt, the sample `grid` image, `details` as a list, and a usage block loading it from
    `load_from`; `local`: `load_from` is a folder (the card says how to load it once uploaded).

    Usage: adapter_card("shira", weight_name="shira_weights.safetensors", load_from="me/style", base_model=None,
                        title="SHiRA adapter", summary="...").save("README.md")
    """
    data = card_data(kind, base_model=base_model, license=license, instance_prompt=instance_prompt, samples=samples)
    base_text = (f"`{base_model}`" if not is_world_model(base_model) else "the shapes world model shipped in shira-diffusion "
                 "(`shira_diffusion.world`)") if base_model else "an unrecorded base model"
    lines = [f"# {title}", "", summary, "", f"Base model: {base_text}."]
    if instance_prompt:
        lines += ["", f"Trigger (instance) prompt: `{instance_prompt}`."]
    if grid:
        lines += ["", f"![samples]({grid})", ""] + ([f"Prompt: `{samples[0].prompt}`"] if samples else [])
    if details:
        lines += ["", "## Training", ""] + [f"- {line}" for line in details]
    lines += ["", "## Usage", ""]
    if local:
        lines += ["From this folder; once it is uploaded, pass its Hub repo id instead of the folder.", ""]
    prompt = samples[0].prompt if samples else instance_prompt  # a whole prompt the run was shown with, else the trigger
    lines += ["```python", usage_code(kind, weight_name=weight_name, load_from=load_from, base_model=base_model, prompt=prompt), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
