"""SHiRA masks: which flat positions of each target weight an adapter may change.

Five strategies from the paper, all vectorised (top-k / sort on the flat tensor, no Python loop over
elements). A mask is a sorted int64 tensor of flat positions. The budget per weight is either a density
(default 2 %) or PEFT's parameter-matched budget r·(m+n) (m = out features, n = in features, convs viewed
as (out, in·kh·kw)).

- struct: the main diagonal (the high-rank part) plus whole rows at a regular stride f (the structured
          low-rank part: the paper's "rank-1 + diagonal"; each trained row is free, so that part has rank
          <= the number of rows). Definition, for a weight viewed as (m, n) = (out, in·kh·kw):
            1. the diagonal positions (i, i), i < min(m, n), first (a budget below min(m, n) gets only the
               first k of them);
            2. rows_needed = ceil((k - min(m, n)) / (n - 1)) further rows (each adds n - 1 new entries),
               f = max(1, m // rows_needed), rows 0, f, 2f, ... then f+1-offset sweeps 1, f+1, ... if one
               sweep is not enough; the last row is cut so the total is exactly k.
          Rows, not columns: a row of a Linear weight is one output feature, so the row part lets a few
          output channels change freely while the diagonal touches every channel; rows of two adapters
          that do not overlap stay orthogonal (the paper's Lemma 4.5). Non-square weights use the
          top-left square's diagonal; convs use the same flattened view, so their "diagonal" is entry
          (i, i) of (out, in·kh·kw). The same shape always gives the same struct mask.
- rand:   k uniform positions without replacement; the generator is seeded per weight from (seed, name),
          so layers of the same shape and different seeds get different masks (PEFT's repeats per shape).
- wm:     top-k |W| per tensor.
- grad:   top-k accumulated |dL/dW| over calibration batches (the trainer's `_calibration_gradients`: a
          few batches of the training data, base model, the diffusion loss).
- snip:   top-k |W ⊙ dL/dW| with the same accumulated gradients.
Top-k runs on the flat tensor (a sampled threshold shrinks the candidate set first; exact, see
`topk_positions`); no Python loop touches individual elements.

This module is torch-free (the CLI reads it for `--mask`'s choices and help); the position functions and
`build_masks` live in `mask_builders.py` and are importable from here too.

`MASKS` is the one list of masks: the trainer's `--mask` choices, their help text, which masks need
calibration gradients and the tests all read it, so adding a mask is one `Mask` entry there. From Python,
`build_masks` also takes your own mask (like PEFT SHiRA's `mask_fn`): a function
`fn(weight, k, *, name, gradient, seed) -> flat positions`, or that function in a `Mask` to declare that it
needs gradients (see `MaskFn`).

Usage:
    masks = build_masks(targets, "snip", density=0.02, gradients=grads)   # {name: positions}
    masks = build_masks(targets, lambda weight, k, **_: torch.arange(k))  # your own: the first k entries
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


def mask_budget(shape: tuple[int, ...], density: float | None = None, r: int | None = None) -> int:
    """Number of entries to train in a weight of `shape`: round(density·numel) or r·(m+n), at least 1 and at
    most numel; m = shape[0], n = the rest (convs as (out, in·kh·kw)).

    Usage: mask_budget((320, 768), r=64) == 64 * (320 + 768)
    """
    numel = math.prod(shape)
    if (density is None) == (r is None):
        raise ValueError("give exactly one of density or r")
    if density is not None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        return max(1, min(numel, round(density * numel)))
    if r <= 0:
        raise ValueError(f"shira_r must be a positive integer, got {r}")
    rows, cols = shape[0], numel // shape[0]
    return max(1, min(numel, r * (rows + cols)))


class MaskFn(Protocol):
    """A mask of your own (PEFT SHiRA's `mask_fn`, as flat positions): which `k` entries of `weight` to train.

    Called once per weight with the weight (any dtype, on its device; read it, do not change it), the budget
    `k` (from density or r), and as keywords `name` (the weight's key in `build_masks`' input), `gradient`
    (its accumulated |dL/dW|, same shape, or None when `build_masks` got no gradients) and `seed`. Returns
    exactly k distinct flat indices into `weight.reshape(-1)`: a 1-D integer tensor, any device, any order.
    `build_masks` checks that and returns them sorted as int64. Take `**_` for the keywords you do not need.
    Usage: def first_k(weight, k, **_): return torch.arange(k)
    """

    def __call__(self, weight: torch.Tensor, k: int, *, name: str, gradient: torch.Tensor | None, seed: int) -> torch.Tensor: ...


class ScoreFn(Protocol):
    """A score-based mask: one score per entry of `weight`, the k largest are kept (exactly, `topk_positions`).

    `out` is an fp32 scratch tensor of weight.numel() entries on the weight's device, reused for the next
    weight: write the scores into it (no fresh multi-MB tensor per weight, which costs more in page faults
    on CPU than |W| itself) or return a tensor of your own. Returns weight.numel() scores, any shape.
    Usage: def magnitude(weight, gradient, out): return torch.abs(weight.reshape(-1).float(), out=out)
    """

    def __call__(self, weight: torch.Tensor, gradient: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Mask:
    """One way to choose the positions: `select` returns them (a `MaskFn`) or `score` rates every entry (a
    `ScoreFn`, top k kept); give exactly one. `needs_gradients`: calibration gradients are computed for it
    (the trainer) and required (`build_masks`). `help`: one line for the CLI's help text.

    `name` is the `--mask` value for registry entries and the adapter file's `mask_type`.
    Usage: build_masks(weights, Mask("top_grad_rows", select=my_fn, needs_gradients=True), gradients=grads)
    """

    name: str
    select: MaskFn | None = None
    score: ScoreFn | None = None
    needs_gradients: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if (self.select is None) == (self.score is None):
            raise ValueError(f"mask {self.name!r}: give exactly one of select= or score=")


def _builtin(function: str) -> Callable:
    """A built-in mask function of `mask_builders`, imported at its first call: the CLI lists the masks (and
    their help) without importing torch."""
    def call(*args: Any, **kwargs: Any) -> Any:
        from . import mask_builders

        return getattr(mask_builders, function)(*args, **kwargs)

    call.__name__ = function
    return call


MASKS: dict[str, Mask] = {mask.name: mask for mask in (
    Mask("struct", select=_builtin("struct_select"), help="the diagonal plus whole rows at a regular stride (the paper's rank-1 + diagonal)"),
    Mask("rand", select=_builtin("random_select"), help="k uniform positions, seeded per weight from --seed and the weight's name"),
    Mask("wm", score=_builtin("magnitude_score"), help="the k largest |W| (weight magnitude)"),
    Mask("grad", score=_builtin("gradient_score"), needs_gradients=True, help="the k largest |dL/dW| summed over calibration batches"),
    Mask("snip", score=_builtin("snip_score"), needs_gradients=True, help="the k largest |W * dL/dW| over calibration batches (SNIP)"),
)}
MASK_TYPES = tuple(MASKS)  # the names, for existing users


def get_mask(mask: str | Mask | MaskFn) -> Mask:
    """The `Mask` for a registry name, a `Mask`, or a bare `MaskFn` (which then needs no gradients; wrap it
    in `Mask(name, select=fn, needs_gradients=True)` if it does).

    Usage: get_mask("snip").needs_gradients  -> True
    """
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, str):
        if mask not in MASKS:
            raise ValueError(f"unknown mask {mask!r}; choose one of {list(MASK_TYPES)}")
        return MASKS[mask]
    if callable(mask):
        return Mask(getattr(mask, "__name__", type(mask).__name__), select=mask)
    raise ValueError(f"mask must be one of {list(MASK_TYPES)}, a Mask or a mask function; got {type(mask).__name__}")


def needs_gradients(mask: str | Mask | MaskFn) -> bool:
    """Whether `mask` needs calibration gradients (`build_masks(..., gradients=...)`).

    Usage: if needs_gradients(config.mask): gradients = calibrate(...)
    """
    return get_mask(mask).needs_gradients


_BUILDERS = ("build_masks", "struct_positions", "random_positions", "topk_positions")


def __getattr__(name: str) -> Any:
    """`build_masks` and the position functions live in `mask_builders` (torch), imported when first used."""
    if name in _BUILDERS:
        from . import mask_builders

        return getattr(mask_builders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
