"""The compiled (numba) kernels and their torch fallback write the same bits, batch many weights, and decode safely."""

from __future__ import annotations

import pytest
import torch

from shira_diffusion import kernels
from shira_diffusion.format import encode_positions

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(params=["compiled", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(kernels, "numba", None)
    elif kernels.numba is None:
        pytest.skip("numba is not installed")
    return request.param


def weights_and_jobs(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=generator).to(dtype) for shape in ((96, 80), (70_000,), (5, 5), (3, 4, 3, 3))]
    counts = (700, 69_000, 0, 30)  # 69 000 positions span several parallel pieces; an empty job in between
    positions = [torch.randperm(w.numel(), generator=generator)[:n].sort().values for w, n in zip(weights, counts)]
    deltas = [torch.randn(p.numel(), generator=generator) * 0.01 for p in positions]
    return weights, positions, deltas


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])  # int32: the trainer's compact positions
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_add_scatter_writes_w0_plus_alpha_delta_and_restores_exactly(path, dtype, index_dtype):
    weights, positions, deltas = weights_and_jobs(dtype)
    positions = [p.to(index_dtype) for p in positions]
    originals = [w.clone() for w in weights]
    backups, written, overflowed = kernels.gather_add_scatter(list(zip(weights, positions, deltas)), 0.7)
    assert overflowed == [False] * 4
    for weight, original, index, delta, backup, values in zip(weights, originals, positions, deltas, backups, written):
        assert torch.equal(backup, original.view(-1)[index])
        expected = original.clone().view(-1)
        accumulate = torch.promote_types(dtype, torch.float32)  # fp64 weights keep their precision
        expected[index] = (original.view(-1)[index].to(accumulate) + delta * 0.7).to(dtype)  # product rounded, then the sum
        assert torch.equal(weight.view(-1), expected) and torch.equal(values, expected[index])
    assert [torch.equal(g, w.view(-1)[p]) for g, w, p in zip(kernels.gather(list(zip(weights, positions))), weights, positions)] == [True] * 4
    olds, changed = kernels.exchange(list(zip(weights, positions, backups, written)))  # restore, keeping what was there
    assert all(torch.equal(old, values) for old, values in zip(olds, written)) and changed == [False] * 4
    assert all(torch.equal(w, o) for w, o in zip(weights, originals))


@pytest.mark.parametrize("dtype", DTYPES)
def test_switch_is_exchange_then_gather_add_scatter_in_one_pass(path, dtype):
    # Leaving and arriving lists overlap, either may be empty, and one spans many pieces; someone else changed
    # one leaving position of the second weight.
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(n, generator=generator).to(dtype) for n in (200_000, 200_000, 5_000, 5_000)]
    counts = ((70_000, 60_000), (300, 90_000), (0, 2_000), (1_000, 0))
    jobs = []
    for weight, (leaving, arriving) in zip(weights, counts):
        out_at = torch.randperm(weight.numel(), generator=generator)[:leaving].sort().values
        in_at = torch.randperm(weight.numel(), generator=generator)[:arriving].sort().values
        jobs.append((weight, out_at, torch.randn(leaving, generator=generator).to(dtype), weight[out_at].clone(), in_at,
                     torch.randn(arriving, generator=generator)))
    weights[1][jobs[1][1][-1]] = float("nan")
    reference = [w.clone() for w in weights]
    olds, changed, backups, written, overflowed = kernels.switch(jobs, [0.7, -1.3, 2.0, 1.0])
    assert overflowed == [False] * 4
    expected_olds, expected_changed = kernels.exchange([(r, *job[1:4]) for r, job in zip(reference, jobs)])
    expected_backups, expected_written, _ = kernels.gather_add_scatter([(r, job[4], job[5]) for r, job in zip(reference[:1], jobs[:1])], 0.7)
    for alpha, r, job in zip([-1.3, 2.0, 1.0], reference[1:], jobs[1:]):
        more = kernels.gather_add_scatter([(r, job[4], job[5])], alpha)
        expected_backups, expected_written = expected_backups + more[0], expected_written + more[1]
    assert changed == expected_changed == [False, True, False, False]
    assert all(torch.equal(kernels.as_bits(w), kernels.as_bits(r)) for w, r in zip(weights, reference))
    for got, want in ((olds, expected_olds), (backups, expected_backups), (written, expected_written)):
        assert all(torch.equal(kernels.as_bits(g), kernels.as_bits(e)) for g, e in zip(got, want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grow_exchange_reads_originals_where_fresh_and_compares_elsewhere(path, dtype):
    weights, positions, _ = weights_and_jobs(dtype, seed=5)
    originals = [w.clone() for w in weights]
    generator = torch.Generator().manual_seed(5)
    accumulate = torch.promote_types(dtype, torch.float32)
    fresh = [torch.rand(p.numel(), generator=generator) < 0.4 for p in positions]
    sums = [torch.randn(p.numel(), generator=generator).to(accumulate) for p in positions]
    expected = [w.view(-1)[p].clone() for w, p in zip(weights, positions)]
    expected[1][~fresh[1]] = 0  # differs at a position that is not fresh: flagged
    expected[3][fresh[3]] = 0  # differs only where fresh: not compared
    backups = [torch.full((p.numel(),), -0.0, dtype=dtype) for p in positions]
    old_backups, old_expected = [b.clone() for b in backups], [e.clone() for e in expected]
    olds, written, changed, overflowed = kernels.grow_exchange(list(zip(weights, positions, sums, expected, fresh, backups)))
    assert overflowed == [False] * 4
    assert changed == [False, True, False, False]
    for weight, original, index, new, total, old, values in zip(weights, originals, positions, fresh, sums, olds, written):
        want = torch.where(new, original.view(-1)[index].to(accumulate) + total, total).to(dtype)
        assert torch.equal(old, original.view(-1)[index]) and torch.equal(values, want)
        assert torch.equal(weight.view(-1)[index], want)
    for new, old, backup, before, seen, seen_before in zip(fresh, olds, backups, old_backups, expected, old_expected):
        # the originals read at fresh positions went into the backup and the expected values; nothing else moved
        assert torch.equal(backup, torch.where(new, old, before)) and torch.equal(seen, torch.where(new, old, seen_before))


def test_merge_gives_the_sorted_union_and_where_each_side_landed(path):
    generator = torch.Generator().manual_seed(11)
    sizes = ((1_000, 2_000), (0, 50), (60, 0), (0, 0), (300_000, 200_000))
    pairs = [tuple(torch.randperm(1_000_000, generator=generator)[:n].sort().values for n in pair) for pair in sizes]
    pairs.append((pairs[0][0], pairs[0][0].clone()))  # the same positions on both sides
    for (first, second), (union, first_slots, second_slots, only_second) in zip(pairs, kernels.merge(pairs)):
        assert torch.equal(union, torch.cat([first, second]).unique(sorted=True))
        assert torch.equal(union[first_slots], first) and torch.equal(union[second_slots], second)
        assert torch.equal(only_second, ~torch.isin(union, first))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exchange_flags_exactly_the_weights_someone_else_changed(path, dtype):
    weights, positions, _ = weights_and_jobs(dtype, seed=7)
    expected = kernels.gather(list(zip(weights, positions)))
    weights[1].view(-1)[positions[1][-1]] = float("nan")  # after 69 000 positions: the last parallel piece
    weights[3].view(-1)[positions[3][0]] *= -1
    current = [w.view(-1)[p].clone() for w, p in zip(weights, positions)]
    values = [torch.zeros(p.numel(), dtype=dtype) for p in positions]
    olds, changed = kernels.exchange(list(zip(weights, positions, values, expected)))
    assert changed == [False, True, False, True]
    assert all(torch.equal(kernels.as_bits(o), kernels.as_bits(c)) for o, c in zip(olds, current))
    assert all(torch.equal(w.view(-1)[p], v) for w, p, v in zip(weights, positions, values))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_scatter_writes_w0_plus_values_rounded_once(path, dtype):
    """The trainer's write: weight[p] = W0 + v summed in fp32 (fp64 weights: fp64), rounded once; nothing else moves."""
    weights, positions, values = weights_and_jobs(dtype, seed=5)
    positions = [p.to(torch.int32) for p in positions]
    originals = [w.clone() for w in weights]
    bases = [w.view(-1)[p.long()].clone() for w, p in zip(weights, positions)]
    kernels.add_scatter(list(zip(weights, positions, bases, values)))
    for weight, original, index, base, value in zip(weights, originals, positions, bases, values):
        expected = original.clone().view(-1)
        accumulate = torch.promote_types(dtype, torch.float32)
        expected[index.long()] = (base.to(accumulate) + value.to(accumulate)).to(dtype)
        assert torch.equal(weight.view(-1), expected)


def test_compiled_and_torch_paths_give_identical_bits(monkeypatch):
    if kernels.numba is None:
        pytest.skip("numba is not installed")
    results = []
    for numba in (kernels.numba, None):
        monkeypatch.setattr(kernels, "numba", numba)
        weights, positions, deltas = weights_and_jobs(torch.float32, seed=3)
        kernels.gather_add_scatter(list(zip(weights, positions, deltas)), -1.3)
        results.append(weights)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_kernels_leave_torch_thread_count_alone():
    before = torch.get_num_threads()
    weights, positions, deltas = weights_and_jobs(torch.float32)
    kernels.scatter([(w, p, kernels.gather([(w, p)])[0]) for w, p in zip(weights, positions)])
    assert torch.get_num_threads() == before


def test_compiled_loops_refuse_out_of_range_positions_before_any_write():
    if kernels.numba is None:
        pytest.skip("numba is not installed")
    weight = torch.zeros(10)
    with pytest.raises(IndexError, match="outside a weight of 10 entries"):
        kernels.scatter([(torch.zeros(4), torch.tensor([0, 1]), torch.ones(2)), (weight, torch.tensor([3, 10]), torch.ones(2))])
    assert torch.equal(weight, torch.zeros(10))  # the loops do not bounds-check: nothing may run
    first, second = torch.zeros(10), torch.zeros(10)
    for leaving, arriving in ((torch.tensor([2, 4]), torch.tensor([-1, 3])), (torch.tensor([2, 12]), torch.tensor([3]))):
        with pytest.raises(IndexError, match="outside a weight of 10 entries"):
            kernels.switch([(first, torch.tensor([1]), torch.ones(1), torch.zeros(1), torch.tensor([5]), torch.ones(1)),
                            (second, leaving, torch.ones(2), torch.zeros(2), arriving, torch.ones(arriving.numel()))], [1.0, 1.0])
        assert torch.equal(first, torch.zeros(10)) and torch.equal(second, torch.zeros(10))


def encoded(positions, deltas):
    parts = encode_positions(torch.tensor(positions))
    return parts["gaps"], parts["gaps_hi_index"].to(torch.int64), parts["gaps_hi"].to(torch.int64), deltas


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_finds_the_first_problem_of_each_tensor(path, dtype):
    far = [0, 3, 70_000, 200_000]  # two gaps need high bits
    jobs = [
        (*encoded(far, torch.ones(4, dtype=dtype)), 300_000),
        (*encoded([1, 5, 9], torch.tensor([0.5, float("inf"), float("nan")]).to(dtype)), 100),
        (*encoded([1, 5, 9], torch.ones(3, dtype=dtype)), 9),  # 9 is out of a 9-entry weight
        (torch.tensor([2, 0, 4], dtype=torch.int32).to(torch.uint16), torch.zeros(0, dtype=torch.int64),
         torch.zeros(0, dtype=torch.int64), torch.ones(3, dtype=dtype), 100),
        (*encoded([1, 105], torch.tensor([1.0, float("nan")]).to(dtype)), 100),  # entry 1 is both: non-finite is named
    ]
    positions, problems = kernels.decode(jobs)
    assert positions[0].tolist() == far
    assert problems == [(0, 0), (kernels.NONFINITE, 1), (kernels.OUT_OF_RANGE, 9), (kernels.ZERO_GAP, 1), (kernels.NONFINITE, 1)]


@pytest.mark.parametrize("compiled", [True, False])
def test_decode_stops_at_the_first_position_out_of_range_before_the_sum_can_wrap(monkeypatch, compiled):
    # 2**17 gaps of 2**47 - 1 each would wrap int64 and land back in range (a crafted file): the first one out of
    # range must end the decode, on both paths.
    if not compiled:
        monkeypatch.setattr(kernels, "numba", None)
    elif kernels.numba is None:
        pytest.skip("numba is not installed")
    count = (1 << 17) + 2
    gaps = torch.full((count,), 0xFFFF, dtype=torch.int32).to(torch.uint16)
    gaps[0], gaps[-1] = 1, 5
    hi_index = torch.arange(1, count, dtype=torch.int64)
    hi = torch.full((count - 1,), (1 << 31) - 1, dtype=torch.int64)
    hi[-1] = 2
    _, problems = kernels.decode([(gaps, hi_index, hi, torch.ones(count), 100)])
    assert problems == [(kernels.OUT_OF_RANGE, (1 << 47) - 1)]  # position 0, then 0 + (2**47 - 1)


def test_pipeline_load_fuse_unload_is_the_same_on_both_paths(monkeypatch):
    from shira_diffusion.testing import tiny_pipeline

    from .helpers import assert_unchanged, random_adapter, snapshot

    fused = []
    for numba in (kernels.numba, None):
        monkeypatch.setattr(kernels, "numba", numba)
        pipe = tiny_pipeline("sd")
        before = snapshot(pipe)
        pipe.load_shira_weights(random_adapter(pipe, 0, ("unet", "text_encoder")), adapter_name="a", alpha=0.8)
        fused.append(snapshot(pipe))  # one adapter: the one-pass write
        pipe.load_shira_weights(random_adapter(pipe, 1, ("unet",)), adapter_name="b")
        pipe.set_shira_adapters(["a", "b"], [0.6, -0.4])
        fused.append(snapshot(pipe))
        pipe.unload_shira_weights()
        assert_unchanged(pipe, before)
    for compiled, fallback in ((fused[0], fused[2]), (fused[1], fused[3])):
        assert compiled.keys() == fallback.keys() and all(torch.equal(compiled[k], fallback[k]) for k in compiled)



def test_kernels_still_compile_where_no_cache_directory_is_writable(monkeypatch):
    if kernels.numba is None:
        pytest.skip("numba is not installed")
    real_njit = kernels.numba.njit

    def njit(*args, cache=False, **options):  # what numba does with cache=True on a read-only install and home
        if cache:
            raise RuntimeError("cannot cache function 'twice': no locator available for file 'kernels.py'")
        return real_njit(*args, **options)

    monkeypatch.setattr(kernels.numba, "njit", njit)

    def twice(values):
        return values * 2

    assert kernels._compiled(nogil=True)(twice)(21) == 42


def test_decode_sends_tensors_off_the_cpu_to_torch_not_to_the_compiled_loop():
    # The compiled loop reads raw CPU addresses: a GPU tensor's would crash the process. Meta tensors stand in for
    # them here; torch refuses them with an error instead.
    parts = encode_positions(torch.tensor([1, 5, 9]))
    job = (parts["gaps"], parts["gaps_hi_index"].to(torch.int64), parts["gaps_hi"].to(torch.int64), torch.ones(3), 100)
    with pytest.raises(NotImplementedError):
        kernels.decode([tuple(t.to("meta") for t in job[:4]) + (100,)])
    assert kernels.decode([job])[0][0].tolist() == [1, 5, 9]


@pytest.mark.parametrize("dtype", DTYPES[:3])  # fp64 weights cannot overflow from fp32 deltas and strengths
def test_every_writing_pass_keeps_the_original_where_a_finite_sum_would_not_be_finite(path, dtype):
    big = 0.75 * float(torch.finfo(dtype).max)
    accumulate = torch.promote_types(dtype, torch.float32)

    def fixture():
        weight = torch.zeros(10, dtype=dtype)
        weight[3] = big
        weight[6] = float("inf")  # already not finite: not the adapter's doing, not flagged
        return weight, torch.tensor([3, 4, 6]), torch.tensor([big, 1.0, 1.0], dtype=torch.float32).to(accumulate)

    weight, positions, deltas = fixture()
    _, written, overflowed = kernels.gather_add_scatter([(weight, positions, deltas.float())], 1.0)
    assert overflowed == [True] and weight[3] == big and weight[4] == 1 and torch.isinf(weight[6])
    weight, positions, deltas = fixture()
    sums = torch.tensor([big, 1.0, 1.0], dtype=accumulate)
    fresh = torch.tensor([True, True, True])
    none = torch.full((3,), -0.0, dtype=dtype)
    *_, overflowed = kernels.grow_exchange([(weight, positions, sums, none.clone(), fresh, none.clone())])
    assert overflowed == [True] and weight[3] == big and weight[4] == 1
    weight, positions, deltas = fixture()
    empty = torch.empty(0, dtype=torch.int64)
    *_, overflowed = kernels.switch([(weight, empty, weight.new_empty(0), weight.new_empty(0), positions, deltas.float())], [1.0])
    assert overflowed == [True] and weight[3] == big and weight[4] == 1
    weight, positions, deltas = fixture()
    *_, overflowed = kernels.switch([(weight, empty, weight.new_empty(0), weight.new_empty(0), positions, deltas.float() * 1e-3)], [1.0])
    assert overflowed == [False]
