"""What a model under training trains, one `Trainable` protocol for the loop, one class per kind:

- `SparseShiraTrainable` (`--impl sparse`, default, `sparse.py`): only the masked values are parameters,
  written into the frozen weights in place with one rounding, so the exported adapter reproduces the trained
  model bit for bit in fp32.
- `HookShiraTrainable` (`--impl hook`, `hook.py`): full fp32 weights with masked gradients and a masked decay
  (the paper's "turn any trainer into SHiRA"); not under DeepSpeed / FSDP (`trains_full_weights`).
- `LoraTrainable` (`--adapter lora`, `lora.py`): PEFT's LoRA on the same modules, fp32 factors.
Both SHiRA kinds give the same adapter from the same seed and data, up to float reordering (tested).

`ADAPTERS` and `IMPLS` are the one list of choices (CLI, validation, help derive from them); they are
torch-free here, so `shira-diffusion train --help` imports no torch; everything else (`make_trainable`, the
one factory the trainer calls, `SHIRA_IMPLS`, the classes) is imported from its module when first used.

Usage:
    trainable = make_trainable(unet, "shira", positions=build_masks(weights, "snip", gradients=grads), impl="sparse")
    optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4); trainable.track(optimizer)
    loss.backward(); trainable.decay_toward_base(lr, 1e-2); optimizer.step()
    ShiraAdapter({"unet": trainable.export()}).save("a.safetensors")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

ADAPTERS = ("shira", "lora")
IMPLS = ("sparse", "hook")  # the classes: factory.SHIRA_IMPLS, checked to match
# A UNet's attention and feed-forward linears: prepare_trainable's default (benchmarks, tests). The trainer's
# defaults are each family's diffusers targets (families/).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

_LAZY = {
    "ConfigError": "base", "Trainable": "base", "HookShiraTrainable": "hook", "LoraTrainable": "lora",
    "ShiraTrainableBase": "shira", "SparseShiraTrainable": "sparse", "SAMPLED_DENSITY": "sparse",
    "SHIRA_IMPLS": "factory", "find_targets": "factory", "make_trainable": "factory", "prepare_trainable": "factory",
}
__all__ = ["ADAPTERS", "IMPLS", "UNET_TARGETS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
