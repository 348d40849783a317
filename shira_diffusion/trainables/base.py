"""What the training loop sees of any trainable: the `Trainable` protocol, and `ConfigError`.

Usage:
    assert isinstance(make_trainable(unet, "lora", module_names=names), Trainable)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..format import SparseDelta
from ..training_config import ConfigError  # noqa: F401  (torch-free, re-exported)


@runtime_checkable
class Trainable(Protocol):
    """The part of a model under training that the loop optimises, whatever the adapter.

    The loop's calls, in order: `param_group(weight_decay)` for the optimizer, `track(optimizer)` once,
    then per step `loss.backward(); decay_toward_base(lr, weight_decay); optimizer.step()` (and
    `undo_decay()` when fp16 loss scaling skips the step); `named_parameters()` for checkpoints;
    `export()` for the adapter file; `remove()` to detach, leaving the trained weights in the model.
    `adapter` is "shira" or "lora"; `trains_full_weights` is True when whole target weights are optimizer
    parameters (they must then be fp32, and DeepSpeed / FSDP, which own the gradients, cannot run it).
    """

    adapter: str
    trains_full_weights: bool

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the optimizer trains."""
        ...

    @property
    def num_parameters(self) -> int:
        """Entries the adapter can change."""
        ...

    def param_group(self, weight_decay: float) -> dict:
        """An optimizer param group over `named_parameters()`."""
        ...

    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Follow `optimizer`'s steps (once, after the optimizer is made)."""
        ...

    def decay_toward_base(self, lr: float, weight_decay: float) -> None:
        """Between backward and optimizer.step(): what the optimizer's own decay cannot do."""
        ...

    def undo_decay(self) -> None:
        """Undo `decay_toward_base` when the optimizer skipped its step."""
        ...

    def export(self) -> dict[str, SparseDelta] | dict[str, torch.Tensor]:
        """SHiRA: SparseDeltas keyed "<module>.weight"; LoRA: a PEFT-keyed state dict."""
        ...

    def remove(self) -> None:
        """Detach from the model, leaving the trained weights in it."""
        ...
