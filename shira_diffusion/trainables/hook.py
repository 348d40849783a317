"""SHiRA's `hook` implementation, the paper's "turn any trainer into SHiRA": full weights, masked gradients.

The full target weights are trainable and a `register_post_accumulate_grad_hook` zeroes their gradient
outside the mask (registered before accelerate wraps the model, so DDP's reducer already sees masked
gradients; re-applied before each optimizer step as a cheap guard against wrappers that write gradients
back). Adam's moments then stay exactly zero outside the mask and AdamW's update there is 0. AdamW's
decoupled weight decay would still shrink every weight with requires_grad, so these weights sit in a param
group without decay and the same decay is applied by hand to (W - W0) at the mask positions, before the step
as AdamW does (and undone when fp16 loss scaling skips the step). Needs fp32 target weights and plain
data-parallel or single-device training (not DeepSpeed / FSDP, which own the gradients).
It gives the same adapter as `sparse` from the same seed and data, up to float reordering (tested).

Usage: trainable = HookShiraTrainable(unet, {"...attn1.to_q": positions})
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ConfigError
from .shira import ShiraTrainableBase


class HookShiraTrainable(ShiraTrainableBase):
    """Full fp32 target weights as parameters, gradients masked to the positions (module docstring).

    Usage:
        trainable = HookShiraTrainable(unet, {"...attn1.to_q": positions})
        optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4)
        loss.backward(); trainable.decay_toward_base(lr, 1e-2); optimizer.step()
    """

    trains_full_weights = True

    def __init__(self, model: nn.Module, positions: dict[str, torch.Tensor]):
        self.base_values: dict[str, torch.Tensor] = {}  # W0 at the mask positions (k values per weight)
        self._before_decay: dict[str, torch.Tensor] = {}
        super().__init__(model, positions)

    def _check(self, name: str, module: nn.Module) -> None:
        if module.weight.dtype != torch.float32:
            raise ConfigError(f"{name}: --impl hook trains the full weight, which must be float32 (got {module.weight.dtype})")

    def _attach(self, name: str, module: nn.Module, positions: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        weight.requires_grad_(True)
        self.base_values[name] = weight.detach().view(-1).index_select(0, positions)
        self.hooks.append(weight.register_post_accumulate_grad_hook(_gradient_mask(positions)))
        return positions

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the full target weights, "<module>.weight"."""
        return [(f"{n}.weight", m.weight) for n, m in self.modules.items()]

    def param_group(self, weight_decay: float) -> dict:
        """A param group without decay: `decay_toward_base` applies it at the mask positions only."""
        return super().param_group(0.0)

    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do: the weights themselves are the parameters."""

    @torch.no_grad()
    def decay_toward_base(self, lr: float, weight_decay: float) -> None:
        """Call after backward and before clipping / optimizer.step(): re-mask the gradients and apply AdamW's
        decoupled decay to W - W0 at the mask positions only."""
        for name, module in self.modules.items():
            weight, positions = module.weight, self.positions[name]
            if weight.grad is not None:
                _gradient_mask(positions)(weight)
            if weight_decay:
                flat = weight.data.view(-1)
                current = flat.index_select(0, positions)
                self._before_decay[name] = current
                flat.index_copy_(0, positions, current - lr * weight_decay * (current - self.base_values[name]))

    @torch.no_grad()
    def undo_decay(self) -> None:
        """Restore the values `decay_toward_base` changed (when the optimizer skipped its step)."""
        for name, values in self._before_decay.items():
            self.modules[name].weight.data.view(-1).index_copy_(0, self.positions[name], values)
        self._before_decay.clear()

    def _trained_values(self, name: str, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().view(-1).index_select(0, self.positions[name]).float() - self.base_values[name].float()


def _gradient_mask(positions: torch.Tensor):
    """A hook that zeroes a parameter's gradient outside `positions`."""

    def hook(parameter: torch.Tensor) -> None:
        grad = parameter.grad.view(-1)
        kept = grad.index_select(0, positions)
        grad.zero_()
        grad.index_copy_(0, positions, kept)

    return hook
