"""What both SHiRA trainables share: checked mask positions per module, the budget, the export.

Subclasses (`sparse.py`, `hook.py`) say how a module is attached and how its trained values are read.
Usage: class MyShira(ShiraTrainableBase): ...  (see SparseShiraTrainable)
"""

from __future__ import annotations

import torch
from torch import nn

from ..format import SparseDelta
from .base import ConfigError


class ShiraTrainableBase:
    """SHiRA values on given positions of some modules' weights. `positions` maps module names to sorted,
    unique flat positions of their weight (see `masks.build_masks`); every module is checked before any
    is attached, so a bad one leaves the model untouched."""

    adapter = "shira"
    trains_full_weights: bool

    def __init__(self, model: nn.Module, positions: dict[str, torch.Tensor]):
        if not positions:
            raise ConfigError("SHiRA positions are empty: nothing to train")
        self.model = model
        self.modules = {name: _submodule(model, name) for name in positions}
        self.positions = {name: _checked(name, module.weight, positions[name]) for name, module in self.modules.items()}
        for name, module in self.modules.items():
            self._check(name, module)
        self.hooks: list = []  # removable handles; remove() drops them
        for name, module in self.modules.items():
            self.positions[name] = self._attach(name, module, self.positions[name])

    def _check(self, name: str, module: nn.Module) -> None:
        """Raise ConfigError if this implementation cannot train `module`."""

    def _attach(self, name: str, module: nn.Module, positions: torch.Tensor) -> torch.Tensor:
        """Make `module` trainable at `positions`; returns the positions to keep."""
        raise NotImplementedError

    def _trained_values(self, name: str, module: nn.Module) -> torch.Tensor:
        """The k trained changes of `module`'s weight, at its positions."""
        raise NotImplementedError

    def _detach(self, module: nn.Module) -> None:
        """Undo `_attach`, leaving W0 + delta in the weight."""

    @property
    def num_parameters(self) -> int:
        """Entries the adapter can change (k summed over weights)."""
        return sum(p.numel() for p in self.positions.values())

    def param_group(self, weight_decay: float) -> dict:
        return {"params": [p for _, p in self.named_parameters()], "weight_decay": weight_decay}

    @torch.no_grad()
    def export(self) -> dict[str, SparseDelta]:
        """The trained change per weight, as fp32 SparseDeltas keyed by parameter name ("<module>.weight")."""
        result = {}
        for name, module in self.modules.items():
            values = self._trained_values(name, module)
            result[f"{name}.weight"] = SparseDelta(tuple(module.weight.shape), self.positions[name].to("cpu", torch.int64), values.cpu())
        return result


    @torch.no_grad()
    def remove(self) -> None:
        """Detach from the model, leaving the trained weights in place (W0 + delta, rounded once)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for module in self.modules.values():
            self._detach(module)
            module.weight.requires_grad_(False)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"{name!r} is not a module of {type(model).__name__}") from None
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise ConfigError(f"{name}: {type(module).__name__} has no weight to train")
    return module


def _checked(name: str, weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`positions` as int64 on the weight's device: 1-D, sorted, unique, inside the weight."""
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.is_floating_point() or positions.dtype == torch.bool:
        raise ConfigError(f"{name}: mask positions must be a 1-D integer tensor of flat positions")
    positions = positions.to(device=weight.device, dtype=torch.int64)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= weight.numel()):
        raise ConfigError(f"{name}: mask positions outside a weight of {weight.numel()} entries")
    if bool((positions[1:] <= positions[:-1]).any()):  # the sparse backward's row search needs this order
        raise ConfigError(f"{name}: mask positions must be sorted and unique (masks.build_masks returns them so)")
    return positions
