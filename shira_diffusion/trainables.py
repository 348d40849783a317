"""What a model under training trains: SHiRA values on a mask (sparse or hook) or a LoRA baseline, one interface.

Two SHiRA implementations (`impl`, the trainer's `--impl`):
- `sparse` (default): only the masked values are parameters. Each adapted Linear / Conv2d gets
  `shira_values` (k fp32 values), `shira_positions` (int32: k values of 4 bytes, half of int64's share of the
  adapter's memory) and `shira_base` (W0 at those positions, k values); its
  forward writes W0[p] + v into the frozen weight in place (k writes; once per optimizer step when the
  trainable tracks its optimizer, as the trainer does) and runs the plain op on it, through a
  custom autograd function that saves only x. A parametrization (or PEFT's SHiRA layer) instead hands a new
  full effective weight to F.linear, which keeps it alive from forward to backward: one extra full-size
  copy of every adapted weight for the whole step. Here no copy of a weight is ever made; the one full-size
  transient is dW in backward, from which the k entries are kept (on CPU, linears at density <= 7 % compute
  dW at the k positions only, with torch.sparse.sampled_addmm). The optimizer holds only the values. The
  values are written with one rounding, fp32(W0[p]) + v -> weight dtype, as the scatter engine loads an
  adapter, so the exported adapter reproduces the trained model bit for bit in fp32.
  Weight decay applies to the values, i.e. pulls the weights toward the base model (as LoRA's does to A, B).
- `hook`: the paper's "turn any trainer into SHiRA": the full target weights are trainable and a
  `register_post_accumulate_grad_hook` zeroes their gradient outside the mask (registered before
  accelerate wraps the model, so DDP's reducer already sees masked gradients; re-applied before each
  optimizer step as a cheap guard against wrappers that write gradients back). Adam's moments
  then stay exactly zero outside the mask and AdamW's update there is 0. AdamW's decoupled weight decay
  would still shrink every weight with requires_grad, so these weights sit in a param group without decay and
  the same decay is applied by hand to (W - W0) at the mask positions, before the step as AdamW does (and
  undone when fp16 loss scaling skips the step). Needs fp32 target weights and plain data-parallel or
  single-device training (not DeepSpeed / FSDP, which own the gradients).
Both give the same adapter from the same seed and data, up to float reordering (tested).
`LoraTrainable` puts PEFT's LoRA on the same modules behind the same methods, so the loop has one path.

Usage:
    trainable = prepare_trainable(unet, "shira", impl="sparse", rank=64)   # or positions=build_masks(...)
    optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4); trainable.track(optimizer)
    loss.backward(); trainable.decay_toward_base(lr, 1e-2); optimizer.step()
    ShiraAdapter({"unet": trainable.export()}).save("a.safetensors")
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .format import SparseDelta
from .masks import build_masks

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class ConfigError(ValueError):
    """A training option is invalid; raised before anything is trained."""


# ---- targets ------------------------------------------------------------------------------------------
def find_targets(model: nn.Module, patterns: tuple[str, ...] | list[str], include_conv: bool = False) -> dict[str, nn.Module]:
    """Linear modules whose name is a pattern or ends with '.' + pattern, plus every Conv2d with include_conv.

    Raises ConfigError naming the first pattern that matches no Linear layer.
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
    if unknown:
        raise ConfigError(f"target module {unknown[0]!r} matches no Linear layer of {type(model).__name__}")
    return found


# ---- SHiRA trainables -----------------------------------------------------------------------------------
@torch.no_grad()
def _write_effective(modules: list[nn.Module], force: bool = False) -> None:
    """W[p] = W0[p] + v in place for these modules, in one launch (summed in fp32, rounded once, as the engine
    loads): no full-size copy.

    Under `ShiraTrainable.track(optimizer)` a module is skipped while its values are those last written (same
    tensor, same autograd version); the optimizer's step hook writes all of them with `force`.
    """
    stale = [m for m in modules if force or m.__dict__.get("shira_written") != (m.shira_values.data_ptr(), m.shira_values._version)]
    if not stale:
        return
    kernels.add_scatter([(m.weight, m.shira_positions, m.shira_base, m.shira_values.detach()) for m in stale])
    for module in stale:
        if "shira_written" in module.__dict__:  # tracked; untracked modules (no entry) write at every forward
            module.shira_written = (module.shira_values.data_ptr(), module.shira_values._version)


class _SparseDeltaOp(torch.autograd.Function):
    """y = linear/conv2d(x, W0 + scatter(values)) with the k values written into the frozen weight in place.

    Memory: no effective-weight copy in forward or backward (the weight holds W0 + v; W0 at the positions is
    kept as k values); the one full-size transient is dW in backward, from which the k entries are kept.
    """

    @staticmethod
    def forward(ctx, x, values, module, conv):
        _write_effective([module])  # untracked: every forward writes (the same bits until the values change)
        weight, bias = module.weight, module.bias
        device_type = x.device.type
        # Under autocast (accelerate's mixed precision) compute in the autocast dtype like nn.Linear would.
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        w, xc, bc = weight.to(dtype), x.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            y = F.linear(xc, w, bc) if conv is None else F.conv2d(xc, w, bc, *conv)
        ctx.save_for_backward(xc)
        # The module, not save_for_backward(weight): a recomputed forward (gradient checkpointing) rewrites the
        # weight in place with the same bits, which autograd's version check would reject.
        ctx.module, ctx.conv, ctx.dtype, ctx.x_dtype = module, conv, dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        module, need_x, need_values = ctx.module, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weight, positions = module.weight, module.shira_positions
        grad_output = grad_output.to(ctx.dtype)
        grad_x = grad_w = grad_values = None
        if ctx.conv is not None and (need_x or need_values):  # both from one call (`.to` copies only under autocast)
            grad_x, grad_w, _ = _conv_backward(grad_output, x, weight.to(ctx.dtype), ctx.conv, (need_x, need_values, False))
        elif need_x:
            grad_x = grad_output @ weight.to(ctx.dtype)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if need_values and grad_w is None and _sampled_is_cheaper(x, weight, positions):
            grad_values = _sampled_grad(grad_output.reshape(-1, grad_output.shape[-1]), x.reshape(-1, x.shape[-1]), positions)
            grad_values = grad_values.to(module.shira_values.dtype)
        elif need_values:  # one full-size transient dW yields the k entries kept
            if grad_w is None:
                grad_w = grad_output.reshape(-1, grad_output.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            grad_values = kernels.gather([(grad_w.reshape(-1), positions)])[0].to(module.shira_values.dtype)
            del grad_w
        return grad_x, grad_values, None, None


# Up to this density, dW at the positions alone (k·T multiply-adds, sampled) beat the dense dW (out·in·T) and
# its gather on a 2-core EPYC for SD-shaped linears at 77-4096 tokens (2-10x at 2 %; ties near 7 %).
SAMPLED_DENSITY = 0.07


def _sampled_is_cheaper(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor) -> bool:
    """CPU fp32/fp64 linears at low density (measured there only; GPUs keep the dense GEMM)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and positions.numel() <= SAMPLED_DENSITY * weight.numel()


def _sampled_grad(grad_output: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(grad_outputᵀ @ x) at the sorted flat positions only, via torch.sparse.sampled_addmm on the mask's CSR
    pattern (row starts by binary search, columns by remainder: no stored copy of the mask)."""
    out_features, in_features = grad_output.shape[1], x.shape[1]
    row_starts = torch.arange(out_features + 1, dtype=positions.dtype, device=positions.device) * in_features
    crow = torch.searchsorted(positions, row_starts, out_int32=positions.dtype == torch.int32)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"; the op is tested here
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, positions % in_features, torch.zeros(positions.numel(), dtype=x.dtype),
                                          (out_features, in_features), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, grad_output.T, x, beta=0.0).values()


def _conv_backward(grad_output, x, w, conv, mask):
    stride, padding, dilation, groups = conv
    return torch.ops.aten.convolution_backward(grad_output, x, w, None, stride, padding, dilation, False, [0] * len(stride), groups, list(mask))


def _sparse_forward(module: nn.Module):
    """The forward that replaces a Linear / Conv2d's own while its SHiRA values are trained."""
    conv = None
    if isinstance(module, nn.Conv2d):
        conv = (tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaOp.apply(x, module.shira_values, module, conv)

    return forward


class ShiraTrainable:
    """The SHiRA part of one model under training: attach (sparse or hook), optimise, export deltas.

    `positions` maps module names to sorted flat positions of their weight (see `masks.build_masks`).
    Usage:
        trainable = ShiraTrainable(unet, {"...attn1.to_q": positions}, impl="sparse")
        optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4)
        loss.backward(); trainable.decay_toward_base(lr, 1e-2); optimizer.step()
        adapter = ShiraAdapter({"unet": trainable.deltas()})
    """

    def __init__(self, model: nn.Module, positions: dict[str, torch.Tensor], impl: str = "sparse"):
        if impl not in ("sparse", "hook"):
            raise ConfigError(f"--impl must be sparse or hook, got {impl!r}")
        self.model, self.impl = model, impl
        self.modules = {name: model.get_submodule(name) for name in positions}
        self.positions: dict[str, torch.Tensor] = {}
        self.base_values: dict[str, torch.Tensor] = {}  # hook: W0 at the mask positions (k values per weight)
        self._before_decay: dict[str, torch.Tensor] = {}
        self.hooks = []
        for name, module in self.modules.items():
            weight = module.weight
            pos = positions[name].to(device=weight.device, dtype=torch.int64)
            if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= weight.numel()):
                raise ConfigError(f"{name}: mask positions outside a weight of {weight.numel()} entries")
            self.positions[name] = pos
            if impl == "sparse":
                if not isinstance(module, (nn.Linear, nn.Conv2d)) or getattr(module, "padding_mode", "zeros") != "zeros" or isinstance(getattr(module, "padding", 0), str):
                    raise ConfigError(f"{name}: --impl sparse supports Linear and zero-padded Conv2d layers; use --impl hook")
                weight.requires_grad_(False)
                if weight.numel() <= torch.iinfo(torch.int32).max:
                    pos = self.positions[name] = pos.to(torch.int32)  # the caller's int64 copy can be freed
                module.register_buffer("shira_positions", pos, persistent=False)
                module.register_buffer("shira_base", weight.detach().view(-1).index_select(0, pos), persistent=False)  # W0 there
                module.register_parameter("shira_values", nn.Parameter(torch.zeros(pos.numel(), device=weight.device)))
                module.forward = _sparse_forward(module)
            else:
                if weight.dtype != torch.float32:
                    raise ConfigError(f"{name}: --impl hook trains the full weight, which must be float32 (got {weight.dtype})")
                weight.requires_grad_(True)
                self.base_values[name] = weight.detach().view(-1).index_select(0, pos)
                self.hooks.append(weight.register_post_accumulate_grad_hook(self._mask_gradient(pos)))

    @staticmethod
    def _mask_gradient(positions: torch.Tensor):
        def hook(parameter: torch.Tensor) -> None:
            grad = parameter.grad.view(-1)
            kept = grad.index_select(0, positions)
            grad.zero_()
            grad.index_copy_(0, positions, kept)

        return hook

    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Sparse impl: write W0 + v for every module in one launch after each `optimizer` step, and let forwards
        skip the write while the values are unchanged (an in-place change autograd sees, e.g. a checkpoint
        load, is written at the next forward). Untracked, every forward writes its module's values, which is
        right with any optimizer and any loop (bitsandbytes' 8-bit Adam updates values behind autograd's back;
        the step hook still sees it)."""
        if self.impl != "sparse":
            return
        for module in self.modules.values():
            module.shira_written = ()
        modules = list(self.modules.values())
        self.hooks.append(optimizer.register_step_post_hook(lambda *_: _write_effective(modules, force=True)))  # remove() drops it

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the optimizer trains: values (sparse) or full weights (hook)."""
        if self.impl == "sparse":
            return [(f"{n}.shira_values", m.shira_values) for n, m in self.modules.items()]
        return [(f"{n}.weight", m.weight) for n, m in self.modules.items()]

    @property
    def num_parameters(self) -> int:
        """Entries the adapter can change (k summed over weights), whichever impl."""
        return sum(p.numel() for p in self.positions.values())

    def param_group(self, weight_decay: float) -> dict:
        """An optimizer param group; the hook impl's has no decay (see `decay_toward_base`)."""
        decay = weight_decay if self.impl == "sparse" else 0.0
        return {"params": [p for _, p in self.named_parameters()], "weight_decay": decay}

    @torch.no_grad()
    def decay_toward_base(self, lr: float, weight_decay: float) -> None:
        """Hook impl, call after backward and before clipping / optimizer.step(): re-mask the gradients and
        apply AdamW's decoupled decay to W - W0 at the mask positions only. No-op for the sparse impl."""
        if self.impl != "hook":
            return
        for name, module in self.modules.items():
            weight, pos = module.weight, self.positions[name]
            if weight.grad is not None:
                self._mask_gradient(pos)(weight)
            if weight_decay:
                flat = weight.data.view(-1)
                current = flat.index_select(0, pos)
                self._before_decay[name] = current
                flat.index_copy_(0, pos, current - lr * weight_decay * (current - self.base_values[name]))

    @torch.no_grad()
    def undo_decay(self) -> None:
        """Hook impl: restore the values `decay_toward_base` changed (when the optimizer skipped its step)."""
        for name, values in self._before_decay.items():
            self.modules[name].weight.data.view(-1).index_copy_(0, self.positions[name], values)
        self._before_decay.clear()

    @torch.no_grad()
    def deltas(self) -> dict[str, SparseDelta]:
        """The trained change per weight, as fp32 SparseDeltas keyed by parameter name ("<module>.weight")."""
        result = {}
        for name, module in self.modules.items():
            pos = self.positions[name]
            if self.impl == "sparse":
                values = module.shira_values.detach().float()
            else:
                values = module.weight.detach().view(-1).index_select(0, pos).float() - self.base_values[name].float()
            result[f"{name}.weight"] = SparseDelta(tuple(module.weight.shape), pos.to("cpu", torch.int64), values.cpu())
        return result

    export = deltas

    @torch.no_grad()
    def remove(self) -> None:
        """Detach from the model, leaving the trained weights in place (W0 + delta, rounded once)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for module in self.modules.values():
            if self.impl == "sparse" and "shira_values" in module._parameters:
                module.__dict__.pop("shira_written", None)
                _write_effective([module])  # the values may have changed since the last forward
                del module.forward, module._parameters["shira_values"], module._buffers["shira_positions"], module._buffers["shira_base"]
            module.weight.requires_grad_(False)


class LoraTrainable:
    """A LoRA of `rank` on exactly the given modules, through PEFT (`model.add_adapter(LoraConfig(...))`,
    diffusers' training-script recipe), with the same interface as ShiraTrainable.

    Usage: trainable = LoraTrainable(unet, sorted(find_targets(unet, UNET_TARGETS)), rank=64)
    """

    impl = "lora"

    def __init__(self, model: nn.Module, module_names: list[str], rank: int, dropout: float = 0.0):
        from peft import LoraConfig

        if rank <= 0:
            raise ConfigError(f"--rank must be a positive integer, got {rank}")
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
        return self.model.peft_config["default"].to_dict()


def prepare_trainable(
    model: nn.Module,
    adapter: str = "shira",
    *,
    impl: str = "sparse",
    positions: dict[str, torch.Tensor] | None = None,
    rank: int | None = None,
    target_modules: tuple[str, ...] | list[str] = UNET_TARGETS,
    include_conv: bool = False,
) -> ShiraTrainable | LoraTrainable:
    """Make `model` trainable as the trainer does, without any data loading (for benchmarks and tests).

    SHiRA: `positions` per module name (from `masks.build_masks`), or, if omitted, a `rand` mask with the
    budget of a rank-`rank` LoRA (r·(m+n) per weight) on `target_modules`. LoRA: rank `rank` on the same
    modules. Returns an object with `named_parameters()`, `num_parameters`, `param_group(weight_decay)`,
    `track(optimizer)`, `decay_toward_base(lr, weight_decay)` (call between backward and optimizer.step) and
    `export()`.
    Usage:
        trainable = prepare_trainable(unet, "shira", impl="sparse", rank=64)
        optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4)
        ShiraAdapter({"unet": trainable.export()}).save("a.safetensors")
    """
    if adapter not in ("shira", "lora"):
        raise ConfigError(f"--adapter must be shira or lora, got {adapter!r}")
    if positions is None or adapter == "lora":
        targets = find_targets(model, tuple(target_modules), include_conv)
        if adapter == "lora":
            return LoraTrainable(model, sorted(targets), rank or 64)
        if rank is None:
            raise ConfigError("prepare_trainable: give positions or a rank for the SHiRA budget")
        positions = build_masks({n: m.weight for n, m in targets.items()}, "rand", r=rank, seed=0)
    return ShiraTrainable(model, positions, impl)
