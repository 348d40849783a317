"""The position functions behind the masks of `masks.MASKS`, and `build_masks` (torch).

Invariant: every mask comes out as a sorted int64 tensor of k unique flat positions, k = `masks.mask_budget`;
a custom mask function's output is checked before it is used (a ValueError names the weight and the problem).

Usage: build_masks({"to_q.weight": w}, "struct", density=0.02)   # or: from shira_diffusion.masks import build_masks
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import torch

from .masks import MASKS, Mask, MaskFn, get_mask, mask_budget


def struct_positions(shape: tuple[int, ...], k: int) -> torch.Tensor:
    """Diagonal + every f-th row, exactly k sorted positions (definition in the module docstring).

    Usage: struct_positions((320, 320), k=2048)
    """
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
    """k uniform positions without replacement, seeded from (seed, name): equal shapes get different masks.

    Usage: random_positions((320, 320), 2048, seed=0, name="down_blocks.1.attentions.0...to_q.weight")
    """
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
    headroom) keeps a small candidate set. Every entry left out is below the threshold and so below every
    candidate; with at least k candidates the top-k among them is the exact top-k (else: full top-k).
    Usage: topk_positions(weight.abs(), k=2048)
    """
    flat = scores.reshape(-1).float()
    if k * 8 < flat.numel() and flat.numel() > 65536:
        generator = torch.Generator(device=flat.device).manual_seed(0)
        sample = flat[torch.randint(flat.numel(), (65536,), generator=generator, device=flat.device)]
        candidates = torch.nonzero(flat >= torch.quantile(sample, 1 - 2 * k / flat.numel())).flatten()
        if candidates.numel() >= k:  # else the estimate was unlucky: fall back to the full top-k
            keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=flat.device)
            keep[torch.topk(flat[candidates], k, sorted=False).indices] = True
            return candidates[keep]  # nonzero's output is sorted, so this is too: no sort needed
    return torch.topk(flat, k, sorted=False).indices.sort().values


# ---- the registry -----------------------------------------------------------------------------------------
def struct_select(weight: torch.Tensor, k: int, *, name: str, gradient: torch.Tensor | None, seed: int) -> torch.Tensor:
    return struct_positions(tuple(weight.shape), k)


def random_select(weight: torch.Tensor, k: int, *, name: str, gradient: torch.Tensor | None, seed: int) -> torch.Tensor:
    return random_positions(tuple(weight.shape), k, seed, name)


def magnitude_score(weight: torch.Tensor, gradient: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    return torch.abs(flat, out=out) if flat.dtype == torch.float32 else out.copy_(flat).abs_()


def gradient_score(weight: torch.Tensor, gradient: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    return gradient.reshape(-1)


def snip_score(weight: torch.Tensor, gradient: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    return torch.mul(weight.detach().reshape(-1), gradient.reshape(-1).to(out.dtype), out=out).abs_()  # |W * dL/dW|


def build_masks(
    weights: Mapping[str, torch.Tensor],
    mask: str | Mask | MaskFn,
    density: float | None = 0.02,
    r: int | None = None,
    seed: int = 0,
    gradients: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Sorted int64 flat positions per weight, keyed like `weights` (parameter or module names).

    `mask`: a name from `MASKS`, a `Mask`, or your own `MaskFn` (its output is checked: a ValueError names
    the weight and what was wrong). `density` (default 2 %) or `r` (PEFT's budget r·(m+n); wins when given)
    sets k per weight. `gradients` (accumulated |dL/dW| per name, same shapes) are needed for masks with
    `needs_gradients` (grad, snip) and passed to custom ones; `seed` drives rand.
    Usage: build_masks({"to_q.weight": w}, "wm", density=0.02)
    """
    spec = get_mask(mask)
    if r is not None:
        density = None
    if spec.needs_gradients:
        _check_gradients(spec.name, weights, gradients)
    trusted = MASKS.get(spec.name) is spec  # the built-in masks' outputs need no checking
    workspaces = _workspaces(weights) if spec.score is not None else {}
    masks = {}
    for name, weight in weights.items():
        k = mask_budget(tuple(weight.shape), density, r)
        gradient = None if gradients is None else gradients.get(name)
        if spec.score is not None:
            scores = spec.score(weight, gradient, workspaces[weight.device][: weight.numel()])
            if not trusted and scores.numel() != weight.numel():
                raise ValueError(f"mask {spec.name!r} for {name!r}: {scores.numel()} scores for a weight of {weight.numel()} entries")
            masks[name] = topk_positions(scores, k)
        else:
            positions = spec.select(weight, k, name=name, gradient=gradient, seed=seed)
            masks[name] = positions if trusted else _checked_positions(positions, spec.name, name, weight, k)
    return masks


def _check_gradients(mask: str, weights: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor] | None) -> None:
    missing = [name for name in weights if gradients is None or name not in gradients]
    if missing:
        raise ValueError(f"mask {mask!r} needs calibration gradients; none for {missing[0]!r}")
    wrong = [n for n in weights if tuple(gradients[n].shape) != tuple(weights[n].shape)]
    if wrong:
        raise ValueError(f"gradient for {wrong[0]!r} has shape {tuple(gradients[wrong[0]].shape)}, weight {tuple(weights[wrong[0]].shape)}")


def _workspaces(weights: Mapping[str, torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """One fp32 scratch tensor per device, as large as its largest weight, reused for every weight's scores."""
    sizes: dict[torch.device, int] = {}
    for weight in weights.values():
        sizes[weight.device] = max(weight.numel(), sizes.get(weight.device, 0))
    return {device: torch.empty(size, dtype=torch.float32, device=device) for device, size in sizes.items()}


def _checked_positions(positions: object, mask: str, name: str, weight: torch.Tensor, k: int) -> torch.Tensor:
    """A custom mask function's output as sorted int64 positions, or a ValueError saying what is wrong."""
    where = f"mask {mask!r} for {name!r} (shape {tuple(weight.shape)}, k={k})"
    if not isinstance(positions, torch.Tensor):
        raise ValueError(f"{where}: returned {type(positions).__name__}, expected a 1-D integer torch.Tensor of flat positions")
    if positions.dtype == torch.bool or positions.is_floating_point() or positions.is_complex():
        hint = "; for a boolean mask return mask.flatten().nonzero().flatten()" if positions.dtype == torch.bool else ""
        raise ValueError(f"{where}: returned dtype {positions.dtype}, expected an integer dtype{hint}")
    if positions.dim() != 1:
        raise ValueError(f"{where}: returned shape {tuple(positions.shape)}, expected 1-D flat positions")
    if positions.numel() != k:
        raise ValueError(f"{where}: returned {positions.numel()} positions, expected exactly k={k}")
    positions = positions.to(torch.int64).sort().values
    if int(positions[0]) < 0 or int(positions[-1]) >= weight.numel():
        bad = int(positions[0]) if int(positions[0]) < 0 else int(positions[-1])
        raise ValueError(f"{where}: position {bad} is outside [0, {weight.numel()})")
    repeated = positions[1:] == positions[:-1]
    if bool(repeated.any()):
        raise ValueError(f"{where}: position {int(positions[1:][repeated][0])} appears more than once")
    return positions
