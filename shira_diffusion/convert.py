"""Make SHiRA adapters from what users already have: LoRA files and full fine-tunes.

- LoRA -> SHiRA: keys of any style diffusers reads (diffusers, PEFT, Kohya/A1111) are normalised with
  diffusers' own `lora_state_dict` and converters; per layer the dense dW = scale * B @ A (alpha / rank,
  rank and alpha patterns from the file's metadata honoured; conv factors supported) is computed from the
  factors alone, no base model, and its top-k entries by |dW| are kept.
- Extraction: the top-k changed positions of W_tuned - W_base per tensor, from two diffusers pipeline
  folders or two .safetensors state dicts.
Both report the relative Frobenius error ||dW - S||_F / ||dW||_F per layer and overall.

Usage:
    adapter, report = lora_to_shira("pytorch_lora_weights.safetensors", density=0.02)
    adapter, report = extract_shira("base_model_dir", "finetuned_model_dir", density=0.02)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .format import PICKLE_SUFFIXES, ShiraAdapter, ShiraFormatError, SparseDelta
from .masks import topk_positions


@dataclass
class ConversionReport:
    """Relative Frobenius error per layer (`component.param` -> error) and overall."""

    errors: dict[str, float] = field(default_factory=dict)
    dropped_energy: float = 0.0  # sum over layers of ||dW - S||^2
    total_energy: float = 0.0  # sum over layers of ||dW||^2

    @property
    def overall(self) -> float:
        return math.sqrt(self.dropped_energy / self.total_energy) if self.total_energy else 0.0

    def add(self, key: str, dense: torch.Tensor, kept: torch.Tensor) -> None:
        total = float(dense.double().square().sum())
        dropped = max(0.0, total - float(kept.double().square().sum()))
        self.errors[key] = math.sqrt(dropped / total) if total else 0.0
        self.dropped_energy += dropped
        self.total_energy += total

    def table(self) -> str:
        width = max((len(k) for k in self.errors), default=5)
        lines = [f"{'layer':<{width}}  rel. Frobenius error"]
        lines += [f"{key:<{width}}  {error:.4f}" for key, error in self.errors.items()]
        lines.append(f"{'overall':<{width}}  {self.overall:.4f}")
        return "\n".join(lines)


def _sparsify(dense: torch.Tensor, k: int) -> SparseDelta:
    """The k largest |entries| of a dense delta (only non-zero entries are kept)."""
    flat = dense.reshape(-1)
    k = min(k, int(torch.count_nonzero(flat)))
    positions = topk_positions(flat.abs(), k) if k < flat.numel() else torch.arange(flat.numel())
    return SparseDelta(tuple(dense.shape), positions, flat[positions].float())


def _budget(numel: int, density: float | None, own: int | None) -> int:
    if own is not None:
        return own
    if density is None or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, round(density * numel))


# ---- LoRA -> SHiRA ------------------------------------------------------------------------------------
def _lora_layers(path: str | Path, pipeline: str) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """{component: {module: (A, B, scale)}} for every LoRA layer of the file, keys normalised by diffusers."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ShiraFormatError(f"{path}: refusing to load a pickle file; convert it to .safetensors first")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    loader = getattr(diffusers, pipeline, None)
    if not hasattr(loader, "lora_state_dict"):
        raise ValueError(f"pipeline {pipeline!r} is not a diffusers pipeline class with LoRA loading (e.g. StableDiffusionXLPipeline, FluxPipeline)")
    # Loaders differ: SD/SDXL always return alphas with the metadata, Flux on request, SD3 has none.
    wants_alphas = "return_alphas" in inspect.signature(loader.lora_state_dict).parameters
    try:
        loaded = loader.lora_state_dict(str(path), return_lora_metadata=True, **({"return_alphas": True} if wants_alphas else {}))
    except (SafetensorError, OSError) as error:
        raise ShiraFormatError(f"{path}: not a readable safetensors file: {error}") from None
    except ValueError as error:
        raise ShiraFormatError(f"{path}: not a LoRA file diffusers can read ({error})") from None
    state_dict, alphas, metadata = loaded if len(loaded) == 3 else (loaded[0], None, loaded[1])
    if not any("lora" in key for key in state_dict):
        raise ShiraFormatError(f"{path}: no LoRA keys (expected ...lora_A/lora_B, lora.down/up or lora_down/up)")
    dora = next((key for key in state_dict if "lora_magnitude_vector" in key or "dora_scale" in key), None)
    if dora is not None:
        raise ShiraFormatError(f"{path}: a DoRA file ({dora!r}): its update depends on the base weights, which conversion "
                               "does not read; load it with diffusers' load_lora_weights instead")
    layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for component in sorted({key.split(".", 1)[0] for key in state_dict}):
        part = {k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.startswith(f"{component}.")}
        is_unet = component in ("unet", "transformer")
        # The same normalisation diffusers applies when it loads each component.
        part = convert_unet_state_dict_to_peft(part) if is_unet else convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
        rank = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k}
        comp_alphas = {k.removeprefix(f"{component}."): v for k, v in (alphas or {}).items() if k.startswith(f"{component}.")} or None
        comp_meta = {k.removeprefix(f"{component}."): v for k, v in (metadata or {}).items() if k.startswith(f"{component}.")} or None
        config = _create_lora_config(part, comp_alphas, comp_meta, rank, is_unet=is_unet)
        for key, a in part.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            b = part.get(f"{module}.lora_B.weight")
            if b is None:
                raise ShiraFormatError(f"{path}: {component}.{module} has lora_A but no lora_B")
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
            scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            layers.setdefault(component, {})[module] = (a, b, scale)
    return layers


def lora_to_shira(
    path: str | Path,
    density: float | None = 0.02,
    match_params: bool = False,
    components: list[str] | None = None,
    pipeline: str = "StableDiffusionXLPipeline",
) -> tuple[ShiraAdapter, ConversionReport]:
    """Convert a LoRA file; `match_params` keeps as many entries per layer as the LoRA has parameters.

    `pipeline` names the diffusers class whose `lora_state_dict` reads the file (the SDXL one reads SD 1.x
    and SDXL files of every key style). Usage: adapter, report = lora_to_shira("lora.safetensors", density=0.02)
    """
    layers = _lora_layers(path, pipeline)
    if components:
        unknown = [c for c in components if c not in layers]
        if unknown:
            raise ValueError(f"{path}: no LoRA layers for component {unknown[0]!r} (it has {sorted(layers)})")
        layers = {c: layers[c] for c in components}
    report, deltas = ConversionReport(), {}
    for component, modules in layers.items():
        for module, (a, b, scale) in sorted(modules.items()):
            # dW = scale * B @ A; conv factors are (r, in, kh, kw) and (out, r, 1, 1).
            dense = scale * (b.float().flatten(1) @ a.float().flatten(1))
            dense = dense.view(b.shape[0], *a.shape[1:])
            delta = _sparsify(dense, _budget(dense.numel(), density, a.numel() + b.numel() if match_params else None))
            deltas.setdefault(component, {})[f"{module}.weight"] = delta
            report.add(f"{component}.{module}.weight", dense, delta.deltas)
    adapter = ShiraAdapter(deltas, mask_type="lora-topk", extra={"source": Path(path).name, "match_params": match_params})
    return adapter, report


# ---- extraction from full fine-tunes ----------------------------------------------------------------
def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors state dict; a truncated, corrupt or unreadable file is a ShiraFormatError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ShiraFormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None


_MODEL_FOLDERS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _state_dicts(source: str | Path | Mapping, component: str) -> dict[str, dict[str, torch.Tensor]]:
    """{component: state dict} from a pipeline folder (component-aware), a .safetensors file, or a dict."""
    if isinstance(source, Mapping):
        return {component: dict(source)}
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() in PICKLE_SUFFIXES:
            raise ShiraFormatError(f"{source}: refusing to load a pickle file; use .safetensors")
        return {component: _load_safetensors(source)}
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such model folder or file")
    found = {}
    for name in _MODEL_FOLDERS:
        files = sorted((source / name).glob("*.safetensors"))
        if files:
            found[name] = {k: v for f in files for k, v in _load_safetensors(f).items()}
    if not found:
        raise ShiraFormatError(f"{source}: no model weights (*.safetensors in {', '.join(_MODEL_FOLDERS)})")
    return found


def extract_shira(
    base: str | Path | Mapping,
    tuned: str | Path | Mapping,
    density: float = 0.02,
    component: str = "unet",
) -> tuple[ShiraAdapter, ConversionReport]:
    """Top-k changed positions of W_tuned - W_base per floating tensor (all changes if fewer than k).

    `base` / `tuned`: diffusers pipeline folders (every model component), .safetensors files or state dicts
    (then `component` names them). Usage: adapter, report = extract_shira("sd15/", "sd15-finetuned/", 0.02)
    """
    base_sds, tuned_sds = _state_dicts(base, component), _state_dicts(tuned, component)
    report, deltas = ConversionReport(), {}
    for comp in sorted(tuned_sds):
        if comp not in base_sds:
            raise ShiraFormatError(f"component {comp!r} is in the tuned model but not in the base")
        for name, tuned_weight in sorted(tuned_sds[comp].items()):
            if not tuned_weight.is_floating_point():
                continue
            base_weight = base_sds[comp].get(name)
            if base_weight is None or base_weight.shape != tuned_weight.shape:
                raise ShiraFormatError(
                    f"{comp}.{name}: base has {'no such tensor' if base_weight is None else tuple(base_weight.shape)}, "
                    f"tuned has {tuple(tuned_weight.shape)}"
                )
            dense = tuned_weight.float() - base_weight.float()
            if not bool(dense.any()):
                continue
            delta = _sparsify(dense, _budget(dense.numel(), density, None))
            deltas.setdefault(comp, {})[name] = delta
            report.add(f"{comp}.{name}", dense, delta.deltas)
    if not deltas:
        raise ShiraFormatError("the tuned weights equal the base weights: nothing to extract")
    return ShiraAdapter(deltas, mask_type="extracted", extra={"density_requested": density}), report
