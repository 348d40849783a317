"""Mask strategies: exact budgets, the right positions for each rule, seeds and layers that differ; the registry
as the one source of the choices; custom mask functions and their checks."""

import math

import pytest
import torch

from shira_diffusion.masks import (
    MASK_TYPES,
    MASKS,
    Mask,
    build_masks,
    get_mask,
    mask_budget,
    needs_gradients,
    random_positions,
    struct_positions,
    topk_positions,
)


def test_budgets_by_density_and_peft_r():
    assert mask_budget((320, 320), density=0.02) == round(0.02 * 320 * 320)
    assert mask_budget((320, 768), r=4) == 4 * (320 + 768)
    assert mask_budget((8, 4, 3, 3), r=1) == 8 + 36  # convs count as (out, in*kh*kw)
    assert mask_budget((4, 4), r=100) == 16 and mask_budget((4, 4), density=1e-6) == 1  # clamped to [1, numel]
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density must be in"):
            mask_budget((4, 4), density=bad)
    with pytest.raises(ValueError, match="shira_r must be a positive integer"):
        mask_budget((4, 4), r=0)


@pytest.mark.parametrize("mask", MASK_TYPES)
def test_every_mask_meets_the_budget_exactly_with_sorted_unique_int64_positions(mask):
    generator = torch.Generator().manual_seed(0)
    targets = {"a.weight": torch.randn(96, 40, generator=generator), "b.weight": torch.randn(16, 8, 3, 3, generator=generator),
               "c.weight": torch.randn(64, 64, generator=generator).half()}
    gradients = {n: torch.rand(w.shape, generator=generator) for n, w in targets.items()}
    for budget in ({"density": 0.05}, {"r": 2}):
        masks = build_masks(targets, mask, gradients=gradients, **budget)
        assert masks.keys() == targets.keys()
        for name, positions in masks.items():
            shape = tuple(targets[name].shape)
            assert positions.dtype == torch.int64 and positions.numel() == mask_budget(shape, **budget)
            assert torch.equal(positions, positions.unique()) and 0 <= int(positions.min()) and int(positions.max()) < math.prod(shape)


@pytest.mark.parametrize("shape, k", [((64, 64), 300), ((40, 96), 500), ((96, 40), 500), ((16, 8, 3, 3), 200), ((320, 320), 2048), ((10, 10), 5)])
def test_struct_is_the_diagonal_plus_rows_at_a_regular_stride(shape, k):
    positions = struct_positions(shape, k)
    rows, cols = shape[0], math.prod(shape) // shape[0]
    assert positions.numel() == k and torch.equal(positions, positions.unique())
    diagonal = (torch.arange(min(rows, cols)) * (cols + 1)).tolist()
    chosen = set(positions.tolist())
    if k <= len(diagonal):
        assert chosen == set(diagonal[:k])
        return
    assert set(diagonal) <= chosen  # the whole diagonal: the high-rank part
    off = sorted(p for p in chosen if p not in set(diagonal))
    touched = sorted({p // cols for p in off})
    stride = max(1, rows // math.ceil((k - len(diagonal)) / (cols - 1)))
    expected_order = sorted(range(rows), key=lambda r: (r % stride, r))
    assert touched == sorted(expected_order[: len(touched)])  # rows 0, f, 2f, ... (then 1, f+1, ...)
    full = [r for r in touched if sum(1 for c in range(cols) if r * cols + c in chosen) == cols]
    assert len(full) >= len(touched) - 1  # whole rows; only the last one is cut to the budget
    if shape == (320, 320):  # 2 % of a square weight: diagonal + 6 rows spread over the whole height
        assert stride == 53 and touched[:6] == [0, 53, 106, 159, 212, 265]


def test_rand_differs_across_layers_and_seeds_and_is_reproducible_and_uniform():
    a = random_positions((320, 320), 2048, seed=0, name="a.weight")
    assert torch.equal(a, random_positions((320, 320), 2048, seed=0, name="a.weight"))
    assert not torch.equal(a, random_positions((320, 320), 2048, seed=1, name="a.weight"))
    assert a.numel() == 2048 and torch.equal(a, a.unique()) and int(a.max()) < 320 * 320
    same_shape = {f"block{i}.to_q.weight": torch.zeros(320, 320) for i in range(3)}
    masks = list(build_masks(same_shape, "rand", density=0.02, seed=0).values())
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    overlap = len(set(masks[0].tolist()) & set(masks[1].tolist()))
    assert overlap < 0.1 * masks[0].numel()  # independent draws overlap by about 2 %
    quarters = torch.bincount(a * 4 // (320 * 320), minlength=4)
    assert quarters.min() > 0.2 * a.numel()  # spread over the whole weight
    dense = random_positions((20, 20), 300, seed=0, name="x")  # the dense-budget path
    assert dense.numel() == 300 and torch.equal(dense, dense.unique())


def test_magnitude_gradient_and_snip_pick_the_top_scores():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(400, 300, generator=generator)
    grad = torch.rand(400, 300, generator=generator)
    k = mask_budget((400, 300), density=0.02)
    masks = {t: build_masks({"w": weight}, t, density=0.02, gradients={"w": grad})["w"] for t in ("wm", "grad", "snip")}
    for kind, score in (("wm", weight.abs()), ("grad", grad), ("snip", (weight * grad).abs())):
        assert torch.equal(masks[kind], torch.topk(score.flatten(), k).indices.sort().values), kind
    assert not torch.equal(masks["wm"], masks["grad"]) and not torch.equal(masks["grad"], masks["snip"])
    big = torch.rand(2_000_000, generator=generator)  # the sampled-threshold path
    assert torch.equal(topk_positions(big, 40_000), torch.topk(big, 40_000).indices.sort().values)
    half = torch.randn(300, 200, generator=generator).half()  # fp16 weights score in fp32
    assert torch.equal(build_masks({"h": half}, "wm", density=0.1)["h"], torch.topk(half.float().abs().flatten(), 6000).indices.sort().values)


def test_grad_masks_need_matching_gradients_and_unknown_mask_is_refused():
    with pytest.raises(ValueError, match="mask 'snip' needs calibration gradients; none for 'w'"):
        build_masks({"w": torch.zeros(4, 4)}, "snip")
    with pytest.raises(ValueError, match=r"gradient for 'w' has shape \(4, 2\), weight \(4, 4\)"):
        build_masks({"w": torch.zeros(4, 4)}, "grad", gradients={"w": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="unknown mask 'magic'"):
        build_masks({"w": torch.zeros(4, 4)}, "magic")


def test_rand_and_struct_positions_are_the_same_bits_as_before_the_registry():
    """Pinned from the masks of the release before the registry: a refactor must not move a single position."""
    a = random_positions((320, 320), 2048, seed=3, name="down.to_q.weight")
    assert a[:6].tolist() == [33, 75, 91, 113, 122, 212] and int(a.sum()) == 106236402
    b = random_positions((20, 20), 300, seed=1, name="x")
    assert b[:6].tolist() == [0, 1, 3, 4, 6, 7] and int(b.sum()) == 59818
    assert int(struct_positions((96, 40), 500).sum()) == 829580
    weights = {"a.weight": torch.zeros(320, 320)}
    assert torch.equal(build_masks(weights, "rand", density=2048 / 320**2, seed=3)["a.weight"], random_positions((320, 320), 2048, 3, "a.weight"))


def test_the_registry_is_the_one_source_of_names_gradients_and_help():
    assert MASK_TYPES == tuple(MASKS) == ("struct", "rand", "wm", "grad", "snip")
    assert all(name == mask.name and mask.help and "\n" not in mask.help for name, mask in MASKS.items())
    assert [name for name in MASK_TYPES if needs_gradients(name)] == ["grad", "snip"]
    assert [name for name, mask in MASKS.items() if mask.needs_gradients] == ["grad", "snip"]
    assert get_mask("wm") is MASKS["wm"] and needs_gradients(MASKS["snip"]) and not needs_gradients(lambda weight, k, **_: None)
    with pytest.raises(ValueError, match=r"unknown mask 'magic'; choose one of \['struct', 'rand', 'wm', 'grad', 'snip'\]"):
        needs_gradients("magic")
    with pytest.raises(ValueError, match="mask must be one of .* a Mask or a mask function; got int"):
        get_mask(3)
    with pytest.raises(ValueError, match="mask 'both': give exactly one of select= or score="):
        Mask("both")


def test_a_custom_mask_function_gets_the_weight_budget_name_gradient_and_seed_and_its_positions_are_sorted():
    calls = []

    def last_k(weight, k, *, name, gradient, seed):
        calls.append((name, k, seed, gradient is None or tuple(gradient.shape)))
        return torch.arange(weight.numel() - 1, weight.numel() - 1 - k, -1, dtype=torch.int32)  # descending, int32

    weights = {"a.weight": torch.randn(10, 8), "b.weight": torch.randn(4, 4)}
    masks = build_masks(weights, last_k, density=0.25, seed=7)
    assert calls == [("a.weight", 20, 7, True), ("b.weight", 4, 7, True)]
    assert masks["a.weight"].dtype == torch.int64 and torch.equal(masks["a.weight"], torch.arange(60, 80))
    assert torch.equal(masks["b.weight"], torch.arange(12, 16))
    gradients = {n: torch.rand(w.shape) for n, w in weights.items()}
    calls.clear()
    build_masks(weights, last_k, r=1, gradients=gradients)  # given gradients reach custom functions too
    assert calls == [("a.weight", 18, 0, (10, 8)), ("b.weight", 8, 0, (4, 4))]


def test_a_custom_mask_declares_gradients_by_its_mask_entry_and_can_score_instead_of_select():
    def top_gradient_rows(weight, k, *, gradient, **_):
        return topk_positions(gradient.sum(1, keepdim=True).expand_as(gradient), k)

    mask = Mask("top_gradient_rows", select=top_gradient_rows, needs_gradients=True, help="rows with the largest gradient")
    weight = torch.randn(8, 5)
    assert needs_gradients(mask)
    with pytest.raises(ValueError, match="mask 'top_gradient_rows' needs calibration gradients; none for 'w'"):
        build_masks({"w": weight}, mask, density=0.25)
    gradient = torch.zeros(8, 5)
    gradient[6] = 1.0
    assert build_masks({"w": weight}, mask, density=5 / 40, gradients={"w": gradient})["w"].tolist() == [30, 31, 32, 33, 34]
    smallest = Mask("smallest", score=lambda weight, gradient, out: -weight.abs().flatten())
    expected = torch.topk(-weight.abs().flatten(), 4).indices.sort().values
    assert torch.equal(build_masks({"w": weight}, smallest, density=0.1)["w"], expected)
    with pytest.raises(ValueError, match="mask 'short' for 'w': 3 scores for a weight of 40 entries"):
        build_masks({"w": weight}, Mask("short", score=lambda weight, gradient, out: torch.ones(3)))


@pytest.mark.parametrize("returned, problem", [
    ([0, 1, 2, 3], r"returned list, expected a 1-D integer torch.Tensor of flat positions"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), r"returned dtype torch.float32, expected an integer dtype"),
    (torch.zeros(4, 4, dtype=torch.bool), r"returned dtype torch.bool, expected an integer dtype; for a boolean mask return"),
    (torch.tensor([[0, 1], [2, 3]]), r"returned shape \(2, 2\), expected 1-D flat positions"),
    (torch.tensor([0, 1, 2]), r"returned 3 positions, expected exactly k=4"),
    (torch.tensor([0, 1, 2, 16]), r"position 16 is outside \[0, 16\)"),
    (torch.tensor([-1, 1, 2, 3]), r"position -1 is outside \[0, 16\)"),
    (torch.tensor([5, 1, 5, 3]), r"position 5 appears more than once"),
])
def test_a_bad_custom_mask_is_a_clear_error_naming_the_weight(returned, problem):
    def bad(weight, k, **_):
        return returned

    with pytest.raises(ValueError, match=r"^mask 'bad' for 'layer.weight' \(shape \(4, 4\), k=4\): " + problem):
        build_masks({"layer.weight": torch.zeros(4, 4)}, bad, density=0.25)
