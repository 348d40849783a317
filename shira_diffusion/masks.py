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


def _score(mask_type: str, weight: torch.Tensor, gradient: torch.Tensor | None, workspace: torch.Tensor) -> torch.Tensor:
    """The flat fp32 scores of one weight, written into `workspace` where a new tensor would be needed.

    Reusing one workspace for every weight matters on CPU: a fresh multi-MB tensor per weight costs more in
    page faults than computing |W| itself.
    """
    if mask_type == "grad":
        return gradient.reshape(-1)
    flat = weight.detach().reshape(-1)
    out = workspace[: flat.numel()]
    if mask_type == "wm":
        return torch.abs(flat, out=out) if flat.dtype == torch.float32 else out.copy_(flat).abs_()
    return torch.mul(flat, gradient.reshape(-1).to(out.dtype), out=out).abs_()  # snip: |W * dL/dW|


def build_masks(
    targets: Mapping[str, torch.Tensor],
    mask_type: str,
    density: float | None = 0.02,
    r: int | None = None,
    seed: int = 0,
    gradients: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Sorted int64 flat positions per target weight, keyed like `targets` (parameter or module names).

    `density` (default 2 %) or `r` (PEFT's budget r·(m+n); wins when given) sets k per weight. `gradients`
    (accumulated |dL/dW| per name, same shapes) are needed for grad and snip; `seed` drives rand.
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
        wrong = [n for n in targets if tuple(gradients[n].shape) != tuple(targets[n].shape)]
        if wrong:
            raise ValueError(f"gradient for {wrong[0]!r} has shape {tuple(gradients[wrong[0]].shape)}, weight {tuple(targets[wrong[0]].shape)}")
    workspaces: dict[torch.device, torch.Tensor] = {}
    if mask_type in ("wm", "snip"):
        for weight in targets.values():
            size = max(weight.numel(), workspaces.get(weight.device, torch.empty(0)).numel())
            workspaces[weight.device] = torch.empty(size, dtype=torch.float32, device=weight.device)
    masks = {}
    for name, weight in targets.items():
        shape = tuple(weight.shape)
        k = mask_budget(shape, density, r)
        if mask_type == "struct":
            masks[name] = struct_positions(shape, k)
        elif mask_type == "rand":
            masks[name] = random_positions(shape, k, seed, name)
        else:
            gradient = gradients[name] if gradients is not None else None
            masks[name] = topk_positions(_score(mask_type, weight, gradient, workspaces.get(weight.device)), k)
    return masks
