"""Mask strategies: exact budgets, the right positions for each rule, seeds and layers that differ."""

import math

import pytest
import torch

from shira_diffusion.masks import build_masks, mask_budget, random_positions, struct_positions, topk_positions


def test_budgets_by_density_and_peft_r():
    assert mask_budget((320, 320), density=0.02) == round(0.02 * 320 * 320)
    assert mask_budget((320, 768), r=4) == 4 * (320 + 768)
    assert mask_budget((8, 4, 3, 3), r=1) == 8 + 36  # convs count as (out, in*kh*kw)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density must be in"):
            mask_budget((4, 4), density=bad)
    with pytest.raises(ValueError, match="shira_r must be a positive integer"):
        mask_budget((4, 4), r=0)


@pytest.mark.parametrize("shape, k", [((64, 64), 300), ((40, 96), 500), ((96, 40), 500), ((16, 8, 3, 3), 200), ((10, 10), 5)])
def test_struct_is_diagonal_plus_strided_rows_with_exact_budget(shape, k):
    positions = struct_positions(shape, k)
    rows, cols = shape[0], math.prod(shape) // shape[0]
    assert positions.numel() == k and torch.equal(positions, positions.unique())
    diagonal = set((torch.arange(min(rows, cols)) * (cols + 1)).tolist())
    chosen = set(positions.tolist())
    assert diagonal <= chosen or chosen <= diagonal  # the whole diagonal first, unless the budget is smaller
    off = [p for p in chosen if p not in diagonal]
    full_rows = {p // cols for p in off}
    assert len(full_rows) <= math.ceil(len(off) / (cols - 1)) + 1  # whole rows, not scattered entries


def test_rand_differs_across_layers_and_seeds_and_is_reproducible():
    a = random_positions((320, 320), 2048, seed=0, name="a.weight")
    assert torch.equal(a, random_positions((320, 320), 2048, seed=0, name="a.weight"))
    assert not torch.equal(a, random_positions((320, 320), 2048, seed=0, name="b.weight"))
    assert not torch.equal(a, random_positions((320, 320), 2048, seed=1, name="a.weight"))
    assert a.numel() == 2048 and torch.equal(a, a.unique()) and int(a.max()) < 320 * 320


def test_magnitude_gradient_and_snip_pick_the_top_scores():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(400, 300, generator=generator)
    grad = torch.rand(400, 300, generator=generator)
    k = mask_budget((400, 300), density=0.02)
    masks = {t: build_masks({"w": weight}, t, density=0.02, gradients={"w": grad})["w"] for t in ("wm", "grad", "snip")}
    for kind, score in (("wm", weight.abs()), ("grad", grad), ("snip", (weight * grad).abs())):
        assert torch.equal(masks[kind], torch.topk(score.flatten(), k).indices.sort().values), kind
    big = torch.rand(2_000_000, generator=generator)  # the sampled-threshold path
    assert torch.equal(topk_positions(big, 40_000), torch.topk(big, 40_000).indices.sort().values)


def test_grad_masks_need_gradients_and_unknown_mask_is_refused():
    with pytest.raises(ValueError, match="mask 'snip' needs calibration gradients; none for 'w'"):
        build_masks({"w": torch.zeros(4, 4)}, "snip")
    with pytest.raises(ValueError, match="unknown mask 'magic'"):
        build_masks({"w": torch.zeros(4, 4)}, "magic")
