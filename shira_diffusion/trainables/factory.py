"""The one factory the trainer calls (`make_trainable`), the benchmarks' shortcut (`prepare_trainable`) and
`find_targets`; `SHIRA_IMPLS` maps each `--impl` name of `IMPLS` to its class.

Usage: make_trainable(unet, "lora", module_names=sorted(find_targets(unet, UNET_TARGETS)), rank=4)
"""

from __future__ import annotations

import torch
from torch import nn

from ..masks import build_masks
from . import ADAPTERS, IMPLS, UNET_TARGETS
from .base import ConfigError, Trainable
from .hook import HookShiraTrainable
from .lora import LoraTrainable
from .shira import ShiraTrainableBase
from .sparse import SparseShiraTrainable

SHIRA_IMPLS: dict[str, type[ShiraTrainableBase]] = {"sparse": SparseShiraTrainable, "hook": HookShiraTrainable}
if tuple(SHIRA_IMPLS) != IMPLS:  # IMPLS (torch-free, for the CLI) names exactly these classes
    raise ImportError(f"trainables: IMPLS {IMPLS} and SHIRA_IMPLS {tuple(SHIRA_IMPLS)} differ")


def find_targets(model: nn.Module, patterns: tuple[str, ...] | list[str], include_conv: bool = False, strict: bool = True) -> dict[str, nn.Module]:
    """Linear modules whose name is a pattern or ends with '.' + pattern, plus every Conv2d with include_conv.

    Raises ConfigError naming the first pattern that matches no Linear layer; with `strict=False` (a family's
    default targets, as PEFT's target_modules: not every model of a family has add_k_proj) only when none matches.
    Usage: find_targets(unet, UNET_TARGETS)  -> {"down_blocks.1...attn1.to_q": Linear, ...}
    """
    found: dict[str, nn.Module] = {}
    matched = set()
    for name, module in model.named_modules():
        if include_conv and isinstance(module, nn.Conv2d):
            found[name] = module
        elif isinstance(module, nn.Linear):
            for pattern in patterns:
                if name == pattern or name.endswith("." + pattern):
                    found[name] = module
                    matched.add(pattern)
    unknown = [p for p in patterns if p not in matched]
    if unknown and (strict or not matched):
        raise ConfigError(f"target module {unknown[0]!r} matches no Linear layer of {type(model).__name__}")
    return found


def make_trainable(
    model: nn.Module,
    adapter: str,
    *,
    positions: dict[str, torch.Tensor] | None = None,
    module_names: list[str] | None = None,
    impl: str = "sparse",
    rank: int = 4,
    dropout: float = 0.0,
) -> Trainable:
    """Make `model` trainable as `adapter` ("shira" or "lora"); everything is checked before the model changes.

    SHiRA: `positions` {module name: sorted flat positions of its weight} (`masks.build_masks`), `impl` one of
    `IMPLS`. LoRA: `module_names` (full module names), `rank`, `dropout`. The other adapter's arguments are
    ignored, so one call can serve both.
    Usage: make_trainable(unet, "lora", module_names=sorted(find_targets(unet, UNET_TARGETS)), rank=4)
    """
    if adapter not in ADAPTERS:
        raise ConfigError(f"--adapter must be one of {list(ADAPTERS)}, got {adapter!r}")
    if impl not in SHIRA_IMPLS:
        raise ConfigError(f"--impl must be one of {list(IMPLS)}, got {impl!r}")
    if adapter == "lora":
        if module_names is None:
            raise ConfigError("make_trainable(adapter='lora') needs module_names (full names of the modules to adapt)")
        return LoraTrainable(model, list(module_names), rank, dropout)
    if positions is None:
        raise ConfigError("make_trainable(adapter='shira') needs positions ({module name: flat positions}, from masks.build_masks)")
    return SHIRA_IMPLS[impl](model, positions)


def prepare_trainable(
    model: nn.Module,
    adapter: str = "shira",
    *,
    impl: str = "sparse",
    positions: dict[str, torch.Tensor] | None = None,
    rank: int | None = None,
    target_modules: tuple[str, ...] | list[str] = UNET_TARGETS,
    include_conv: bool = False,
) -> Trainable:
    """Make `model` trainable as the trainer does, without any data loading (for benchmarks and tests).

    SHiRA: `positions` per module name (from `masks.build_masks`), or, if omitted, a `rand` mask with the
    budget of a rank-`rank` LoRA (r·(m+n) per weight) on `target_modules`. LoRA: rank `rank` (default 64)
    on the same modules. Returns a `Trainable`.
    Usage:
        trainable = prepare_trainable(unet, "shira", impl="sparse", rank=64)
        optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4)
        ShiraAdapter({"unet": trainable.export()}).save("a.safetensors")
    """
    if adapter not in ADAPTERS:
        raise ConfigError(f"--adapter must be one of {list(ADAPTERS)}, got {adapter!r}")
    if adapter == "lora":
        names = sorted(find_targets(model, tuple(target_modules), include_conv))
        return make_trainable(model, "lora", module_names=names, rank=rank or 64)
    if positions is None:
        targets = find_targets(model, tuple(target_modules), include_conv)
        if rank is None:
            raise ConfigError("prepare_trainable: give positions or a rank for the SHiRA budget")
        positions = build_masks({n: m.weight for n, m in targets.items()}, "rand", r=rank, seed=0)
    return make_trainable(model, "shira", positions=positions, impl=impl)
