"""SHiRA masks: which flat positions of each target weight an adapter may change.

Five strategies from the paper, all vectorised (top-k / sort on the flat tensor, no Python loop over
elements). A mask is a sorted int64 tensor of flat positions. The budget per weight is either a density
(default 2 %) or PEFT's parameter-matched budget r·(m+n) (m = out features, n = in features, convs viewed
as (out, in·kh·kw)).

- struct: the main diagonal (a high-rank term) plus whole rows every f-th row (a rank-limited term), f
          chosen so the budget is met exactly; rows beyond the first sweep continue at offsets 1, 2, ...
          of the stride and the last row is cut to the budget. Rows (not columns) because a row of a
          Linear weight is one output feature: a row sweep touches every output channel's inputs evenly.
- rand:   uniform positions from a seed; the generator is seeded per weight from (seed, weight name), so
          layers of the same shape get different masks (unlike PEFT's random mask).
- wm:     top-k |W|.
- grad:   top-k accumulated |dL/dW| over calibration batches (see `training.accumulate_gradients`).
- snip:   top-k |W * dL/dW|.

Usage:
    masks = build_masks(targets, "snip", density=0.02, gradients=grads)   # {name: positions}
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import torch

MASK_TYPES = ("struct", "rand", "wm", "grad", "snip")


def mask_budget(shape: tuple[int, ...], density: float | None = None, r: int | None = None) -> int:
    """Number of entries to train in a weight of `shape`: round(density·numel) or r·(m+n)."""
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


def struct_positions(shape: tuple[int, ...], k: int) -> torch.Tensor:
    """Diagonal + every f-th row, exactly k positions (see module docstring)."""
    rows, cols = shape[0], math.prod(shape) // shape[0]
    diagonal = torch.arange(min(rows, cols), dtype=torch.int64) * (cols + 1)
    if k <= diagonal.numel():
        return diagonal[:k].sort().values
    rows_needed = math.ceil((k - diagonal.numel()) / max(1, cols - 1))
    stride = max(1, rows // rows_needed)
    order = torch.arange(rows, dtype=torch.int64)
    order = order[torch.argsort(order % stride * rows + order)][: rows_needed + 1]  # 0, f, 2f, ..., then 1, f+1, ...
    row_positions = (order[:, None] * cols + torch.arange(cols, dtype=torch.int64)).flatten()
    off_diagonal = row_positions[(row_positions % (cols + 1) != 0) | (row_positions // cols >= cols)]
    return torch.cat([diagonal, off_diagonal[: k - diagonal.numel()]]).sort().values


def random_positions(shape: tuple[int, ...], k: int, seed: int, name: str) -> torch.Tensor:
    """k uniform positions; seeded per weight so equal shapes still get different masks."""
    numel = math.prod(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if k * 4 > numel:  # dense budgets: a permutation is cheap enough and exact
        return torch.randperm(numel, generator=generator)[:k].sort().values
    # Sparse budgets: oversample, deduplicate, then pick k of the unique draws at random. Avoids randperm's
    # O(numel) int64 buffer, which dominates for large weights.
    unique = torch.empty(0, dtype=torch.int64)
    while unique.numel() < k:
        draws = torch.randint(numel, (int(k * 1.1) + 16,), generator=generator)
        unique = torch.unique(torch.cat([unique, draws]))
    keep = torch.randperm(unique.numel(), generator=generator)[:k]
    return unique[keep].sort().values


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions of the k largest scores, sorted.

    A full top-k over millions of entries is slow on CPU; a threshold estimated from a sample (with 2x
    headroom) keeps a small candidate set that still contains every top-k entry, then top-k runs on it.
    """
    flat = scores.reshape(-1).float()
    if k * 8 < flat.numel() and flat.numel() > 65536:
        generator = torch.Generator(device=flat.device).manual_seed(0)
        sample = flat[torch.randint(flat.numel(), (65536,), generator=generator, device=flat.device)]
        candidates = torch.nonzero(flat >= torch.quantile(sample, 1 - 2 * k / flat.numel())).flatten()
        if candidates.numel() >= k:  # else the estimate was unlucky: fall back to the full top-k
            chosen = candidates[torch.topk(flat[candidates], k, sorted=False).indices]
            return chosen.sort().values
    return torch.topk(flat, k, sorted=False).indices.sort().values


def build_masks(
    targets: Mapping[str, torch.Tensor],
    mask_type: str,
    density: float | None = 0.02,
    r: int | None = None,
    seed: int = 0,
    gradients: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Positions per target weight. `gradients` (accumulated |dL/dW|) are needed for grad and snip.

    Usage: build_masks({"to_q.weight": w}, "wm", density=0.02)
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask {mask_type!r}; choose one of {list(MASK_TYPES)}")
    if r is not None:
        density = None
    if mask_type in ("grad", "snip"):
        missing = [name for name in targets if gradients is None or name not in gradients]
        if missing:
            raise ValueError(f"mask {mask_type!r} needs calibration gradients; none for {missing[0]!r}")
    masks = {}
    for name, weight in targets.items():
        shape = tuple(weight.shape)
        k = mask_budget(shape, density, r)
        if mask_type == "struct":
            masks[name] = struct_positions(shape, k)
        elif mask_type == "rand":
            masks[name] = random_positions(shape, k, seed, name)
        elif mask_type == "wm":
            masks[name] = topk_positions(weight.detach().abs(), k)
        elif mask_type == "grad":
            masks[name] = topk_positions(gradients[name], k)
        else:
            masks[name] = topk_positions(weight.detach().abs().float() * gradients[name].float(), k)
    return masks
