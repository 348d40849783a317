"""SHiRA's `sparse` implementation (the trainer's default `--impl`): only the masked values are parameters.

Each adapted Linear / Conv2d gets `shira_values` (k fp32 values), `shira_positions` (int32: k values of 4
bytes, half of int64's share of the adapter's memory) and `shira_base` (W0 at those positions, k values);
its forward writes W0[p] + v into the frozen weight in place (k writes; once per optimizer step when the
trainable tracks its optimizer, as the trainer does) and runs the plain op on it, through a custom autograd
function that saves only x. A parametrization (or PEFT's SHiRA layer) instead hands a new full effective
weight to F.linear, which keeps it alive from forward to backward: one extra full-size copy of every adapted
weight for the whole step. Here no copy of a weight is ever made; the one full-size transient is dW in
backward, from which the k entries are kept (on CPU, linears at density <= 7 % compute dW at the k positions
only, with torch.sparse.sampled_addmm). The optimizer holds only the values. The values are written with one
rounding, fp32(W0[p]) + v -> weight dtype, as the scatter engine loads an adapter, so the exported adapter
reproduces the trained model bit for bit in fp32. Weight decay applies to the values, i.e. pulls the weights
toward the base model (as LoRA's does to A, B).

Sharded data parallel (FSDP2 `fully_shard`, FSDP1 with use_orig_params): the values are a parameter like any other,
so FSDP shards them with the frozen weights and reduce-scatters their gradients. FSDP all-gathers a module's weight
into a fresh buffer before its forward and again before its backward, and frees it after: a write into that buffer
is lost, and a once-per-step write into the sharded tensor would land at the wrong flat positions (out of bounds: a
crash). DeepSpeed ZeRO's optimizer steps flat fp32 copies and writes the values back after the step hook. So a
module is tracked (written once per step) only while its weight is the tensor `track` saw (FSDP2 swaps in new
ones) and, from the first step on, only if that step found the weight whole and the values among the optimizer's
own parameters (not so under FSDP1, which keeps the tensors but swaps their data, nor under DeepSpeed); otherwise
its forward writes W0[p] + v, and its backward writes again before reading the weight (nothing to do when tracked).
A sharded weight is never written. The bits are the same in every case (W0[p] + v is recomputed from `shira_base`,
never accumulated), so a sharded run computes what an unsharded one does. The trainer does not track under FSDP /
DeepSpeed at all (FSDP1's first step comes before any step hook could tell).

Usage: trainable = SparseShiraTrainable(unet, {"...attn1.to_q": positions}); trainable.track(optimizer)
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .base import ConfigError
from .shira import ShiraTrainableBase

# Up to this density, dW at the positions alone (k·T multiply-adds, sampled) beat the dense dW (out·in·T) and
# its gather on a 2-core EPYC for SD-shaped linears at 77-4096 tokens (2-10x at 2 %; ties near 7 %).
SAMPLED_DENSITY = 0.07


class SparseShiraTrainable(ShiraTrainableBase):
    """Trainable SHiRA values on frozen Linear / zero-padded Conv2d weights (module docstring).

    Usage:
        trainable = SparseShiraTrainable(unet, {"...attn1.to_q": positions})
        optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4); trainable.track(optimizer)
        loss.backward(); optimizer.step(); adapter = ShiraAdapter({"unet": trainable.export()})
    """

    trains_full_weights = False

    def _check(self, name: str, module: nn.Module) -> None:
        zero_padded = getattr(module, "padding_mode", "zeros") == "zeros" and not isinstance(getattr(module, "padding", 0), str)
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not zero_padded:
            raise ConfigError(f"{name}: --impl sparse supports Linear and zero-padded Conv2d layers; use --impl hook")

    def _attach(self, name: str, module: nn.Module, positions: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        weight.requires_grad_(False)
        if weight.numel() <= torch.iinfo(torch.int32).max:
            positions = positions.to(torch.int32)  # the caller's int64 copy can be freed
        module.register_buffer("shira_positions", positions, persistent=False)
        module.register_buffer("shira_base", weight.detach().view(-1).index_select(0, positions), persistent=False)  # W0 there
        module.register_parameter("shira_values", nn.Parameter(torch.zeros(positions.numel(), device=weight.device)))
        module.__dict__["shira_shape"] = tuple(weight.shape)  # plain attribute: FSDP may hand the module a flat shard
        module.forward = _sparse_forward(module)
        return positions

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the values, "<module>.shira_values"."""
        return [(f"{n}.shira_values", m.shira_values) for n, m in self.modules.items()]

    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Write W0 + v for every module in one launch after each `optimizer` step, and let forwards skip the
        write while the values are unchanged (an in-place change autograd sees, e.g. a checkpoint load, is
        written at the next forward). Untracked, every forward writes its module's values, which is right with
        any optimizer and any loop (bitsandbytes' 8-bit Adam updates values behind autograd's back; the step
        hook still sees it)."""
        for module in self.modules.values():
            module.shira_written = ()
            # weakref: a Parameter set as an attribute would be registered as a second parameter
            module.__dict__["shira_tracked"] = weakref.ref(module.weight)
        modules = list(self.modules.values())
        self.hooks.append(optimizer.register_step_post_hook(lambda *_: _after_step(modules, optimizer)))

    def decay_toward_base(self, lr: float, weight_decay: float) -> None:
        """Nothing to do: AdamW's own decay acts on the values, i.e. toward the base weights."""

    def undo_decay(self) -> None:
        """Nothing to do."""

    def _trained_values(self, name: str, module: nn.Module) -> torch.Tensor:
        values = module.shira_values.detach()
        if hasattr(values, "full_tensor"):  # FSDP2 keeps a DTensor shard here: a collective, every rank calls export()
            values = values.full_tensor()
        if values.numel() != module.shira_base.numel():
            raise RuntimeError(f"{name}: the SHiRA values are sharded ({values.numel()} of {module.shira_base.numel()}); "
                               "export inside FSDP1's summon_full_params, or use FSDP2")
        return values.float()

    def _detach(self, module: nn.Module) -> None:
        if "shira_values" in module._parameters:
            module.__dict__.pop("shira_written", None)
            module.__dict__.pop("shira_tracked", None)
            if not _sharded(module):  # the values may have changed since the last forward (a shard holds only W0)
                _write_effective([module])
            module.__dict__.pop("shira_shape", None)
            del module.forward, module._parameters["shira_values"], module._buffers["shira_positions"], module._buffers["shira_base"]


@torch.no_grad()
def _write_effective(modules: list[nn.Module], force: bool = False) -> None:
    """W[p] = W0[p] + v in place for these modules, in one launch (summed in fp32, rounded once, as the engine
    loads): no full-size copy.

    Under `track(optimizer)` a module is skipped while its values are those last written (same tensor, same
    autograd version) into the weight tensor `track` saw; the optimizer's step hook writes all of them with
    `force`, except weights FSDP holds sharded (their next forward writes the gathered copy).
    """
    if force:
        stale = [m for m in modules if _tracked(m)]
    else:
        stale = [m for m in modules if not (_tracked(m) and m.shira_written == _written_key(m))]
    if not stale:
        return
    for module in stale:
        if _sharded(module):  # flat positions index the whole weight; a shard would be written out of place
            raise RuntimeError(f"{type(module).__name__}: its weight is sharded ({tuple(module.weight.shape)}, expected "
                               f"{module.shira_shape}) at a SHiRA write; FSDP1 needs use_orig_params=True")
    kernels.add_scatter([(m.weight, m.shira_positions, m.shira_base, m.shira_values.detach()) for m in stale])
    for module in stale:
        if _tracked(module):  # untracked modules (no entry, or FSDP's gathered copies) write at every forward
            module.shira_written = _written_key(module)


def _written_key(module: nn.Module) -> tuple[int, int, int]:
    """What a tracked write is valid for: these values (tensor, autograd version) in this weight's memory."""
    return module.shira_values.data_ptr(), module.shira_values._version, module.weight.data_ptr()


def _after_step(modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """The tracking optimizer's step hook: confirm (or give up) tracking per module, write the tracked ones.

    A module stays tracked while its weight is whole and its values are a parameter of this optimizer (not so
    under FSDP, which shards the weight between forwards, nor DeepSpeed, whose optimizer holds flat copies);
    one that fails is untracked for good: it writes at every forward and backward."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules:
        if _tracked(module) and (_sharded(module) or id(module.shira_values) not in params):
            module.shira_tracked = False
    _write_effective(modules, force=True)


def _tracked(module: nn.Module) -> bool:
    """Tracked by an optimizer (not given up by a step), and the weight is still the tensor `track` saw."""
    tracked = module.__dict__.get("shira_tracked")
    return bool(tracked) and tracked() is module.weight


def _sharded(module: nn.Module) -> bool:
    """The module holds a shard (an FSDP2 DTensor, an FSDP1 flat view) rather than the whole weight."""
    weight = module.weight
    return hasattr(weight, "full_tensor") or tuple(weight.shape) != module.shira_shape


def _sparse_forward(module: nn.Module):
    """The forward that replaces a Linear / Conv2d's own while its SHiRA values are trained."""
    conv = None
    if isinstance(module, nn.Conv2d):
        conv = (tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaOp.apply(x, module.shira_values, module, conv)

    return forward


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
        # FSDP gathers the weight again for the backward, W0 only: write W0 + v into it (tracked: nothing to do)
        _write_effective([module])
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
