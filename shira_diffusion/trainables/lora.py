"""The LoRA baseline: PEFT's LoRA on the same modules, behind the same `Trainable` protocol.

Usage: trainable = LoraTrainable(unet, sorted(find_targets(unet, UNET_TARGETS)), rank=64)
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ConfigError


class LoraTrainable:
    """A LoRA of `rank` on exactly the given modules, through PEFT (`model.add_adapter(LoraConfig(...))`,
    diffusers' training-script recipe). The factors are fp32 masters whatever the model's dtype.

    Usage:
        trainable = LoraTrainable(unet, ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"], rank=4)
        optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4)
        unet.save_lora_adapter(...) or StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=trainable.export())
    """

    adapter = "lora"
    trains_full_weights = False

    def __init__(self, model: nn.Module, module_names: list[str], rank: int, dropout: float = 0.0):
        from peft import LoraConfig

        if rank <= 0:
            raise ConfigError(f"--rank must be a positive integer, got {rank}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {dropout}")
        if not module_names:
            raise ConfigError("LoRA module names are empty: nothing to train")
        for name in module_names:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"{name!r} is not a module of {type(model).__name__}") from None
        self.model, self.rank = model, rank
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=list(module_names)))
        self._named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        # fp32 master factors on a bf16 / fp16 model (diffusers' cast_training_params, limited to these
        # parameters): in bf16, AdamW's steps at lr 1e-4 round away, and fp16 gradients cannot be unscaled.
        # PEFT's layers cast their input to the factors' dtype and the result back.
        for _, parameter in self._named:
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the LoRA factors, PEFT's names ("...to_q.lora_A.default.weight")."""
        return list(self._named)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for _, p in self._named)

    def param_group(self, weight_decay: float) -> dict:
        return {"params": [p for _, p in self._named], "weight_decay": weight_decay}

    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do: PEFT's LoRA layers read their factors at every forward."""

    def decay_toward_base(self, lr: float, weight_decay: float) -> None:
        """Nothing to do: AdamW's own decay acts on the LoRA factors."""

    def undo_decay(self) -> None:
        """Nothing to do."""

    def export(self) -> dict[str, torch.Tensor]:
        """PEFT-keyed LoRA state dict (`...to_q.lora_A.weight`), as diffusers' save_lora_weights expects."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def config_dict(self) -> dict:
        """The LoraConfig as a dict (the file's `<component>_lora_adapter_metadata`)."""
        return self.model.peft_config["default"].to_dict()

    @torch.no_grad()
    def remove(self) -> None:
        """Merge the LoRA into the weights (PEFT's `merge`) and put the plain modules back (diffusers'
        `recurse_remove_peft_layers`, as `unload_lora` does), leaving the trained weights in the model."""
        from diffusers.utils.peft_utils import recurse_remove_peft_layers
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        recurse_remove_peft_layers(self.model)
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            self.model.__dict__.pop(attribute, None)  # instance attributes set by add_adapter
        self._named = []
