"""The engine's promises under hostile or careless use: it writes from its own copies, never writes a value that is
not finite, undoes a mutation that fails half-way, reads its state under its lock, and takes only string names."""

from __future__ import annotations

import threading

import pytest
import torch

from shira_diffusion import ShiraAdapter, SparseDelta
from shira_diffusion.engine import ShiraLoadError
from shira_diffusion.testing import tiny_pipeline

from .helpers import assert_unchanged, random_adapter, snapshot

KEYS = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.weight")


def fused(before: dict[str, torch.Tensor], *terms: tuple[ShiraAdapter, float]) -> dict[str, torch.Tensor]:
    """What the weights must hold with these (adapter, strength) fused: W0 + sum alpha * S, summed in fp32."""
    expected = {key: value.clone() for key, value in before.items()}
    sums: dict[str, torch.Tensor] = {}
    for adapter, alpha in terms:
        for component, name, delta in adapter.items():
            key = f"{component}.{name}"
            sums.setdefault(key, before[key].view(-1).float().clone())
            sums[key][delta.positions] += (delta.deltas.float() * alpha)
    for key, total in sums.items():
        expected[key] = total.to(before[key].dtype).view(before[key].shape)
    return expected


def assert_holds(pipe, expected: dict[str, torch.Tensor]) -> None:
    now = snapshot(pipe)
    assert [key for key in expected if not torch.equal(now[key], expected[key])] == []


def adapter_on(pipe, values: dict[str, list[float]], positions: dict[str, list[int]] | None = None) -> ShiraAdapter:
    """An adapter on the given unet weights (first positions unless given), with these delta values."""
    deltas = {}
    for name, vals in values.items():
        shape = tuple(pipe.unet.get_parameter(name).shape)
        at = torch.tensor(positions[name] if positions else list(range(len(vals))), dtype=torch.int64)
        deltas[name] = SparseDelta(shape, at, torch.tensor(vals, dtype=torch.float32))
    return ShiraAdapter({"unet": deltas})


# ---- 1: the engine keeps its own copies ----------------------------------------------------------------------
@pytest.mark.parametrize("source", ["object", "state_dict"])
def test_changing_the_callers_adapter_after_loading_changes_nothing(source):
    pipe = tiny_pipeline("sd")
    base = snapshot(pipe)
    adapter = random_adapter(pipe, seed=1)
    reference = random_adapter(pipe, seed=1)  # the same values, never touched
    loaded = adapter if source == "object" else adapter.state_dict()
    pipe.load_shira_weights(loaded, adapter_name="a")
    for _, _, delta in adapter.items():  # the caller scribbles over what it handed in
        delta.positions.add_(1).clamp_(max=0)
        delta.deltas.fill_(float("nan"))
    if source == "state_dict":
        for tensor in loaded.values():
            tensor.zero_() if not tensor.is_floating_point() else tensor.fill_(float("nan"))
    pipe.set_shira_adapters("a", 0.5)
    assert_holds(pipe, fused(base, (reference, 0.5)))
    pipe.unload_shira_weights()
    assert_unchanged(pipe, base)


def test_strengths_read_back_are_copies():
    pipe = tiny_pipeline("sd")
    pipe.load_shira_weights(random_adapter(pipe, seed=2), alpha={"unet": 0.5, "text_encoder": 0.25}, adapter_name="a")
    pipe.get_shira_adapters()["a"]["alpha"]["unet"] = float("nan")
    assert pipe.get_shira_adapters()["a"]["alpha"] == {"unet": 0.5, "text_encoder": 0.25}


# ---- 2: no write makes a finite weight non-finite --------------------------------------------------------------
def test_strengths_beyond_float32_are_refused_before_any_write():
    pipe = tiny_pipeline("sd")
    base = snapshot(pipe)
    adapter = random_adapter(pipe, seed=3)
    for alpha in (1e308, -1e39, {"unet": 1e39}, 10**400, float("inf")):
        with pytest.raises(ShiraLoadError, match="finite number.*float32's range"):
            pipe.load_shira_weights(adapter, alpha=alpha, adapter_name="a")
        assert_unchanged(pipe, base)
    assert pipe.get_shira_adapters() == {}
    pipe.load_shira_weights(adapter, adapter_name="a")
    with_a = snapshot(pipe)
    with pytest.raises(ShiraLoadError, match="float32's range"):
        pipe.set_shira_adapters("a", 1e39)
    assert_unchanged(pipe, with_a)
    assert pipe.get_shira_adapters()["a"]["alpha"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_delta_the_weights_dtype_cannot_hold_is_refused_and_nothing_changes(dtype):
    # fp16 / bf16: the torch path; fp32: the compiled passes. W0 = 0.75 * max there, plus 0.75 * max: beyond max.
    pipe = tiny_pipeline("sd", dtype=dtype)
    big = 0.75 * float(torch.finfo(dtype).max)
    with torch.no_grad():
        pipe.unet.get_parameter(KEYS[2]).view(-1)[1] = big
    base = snapshot(pipe)
    # `good` holds all three weights (not position 1 of the last), so `bad` joins them: the grow pass reads W0 there
    good = adapter_on(pipe, {KEYS[0]: [0.25] * 4, KEYS[1]: [0.5] * 4, KEYS[2]: [0.1] * 4},
                      positions={KEYS[0]: [0, 1, 2, 3], KEYS[1]: [0, 1, 2, 3], KEYS[2]: [5, 6, 7, 8]})
    bad = adapter_on(pipe, {KEYS[0]: [0.25] * 4, KEYS[1]: [0.5] * 4, KEYS[2]: [0.1, big, 0.1]})  # the last weight overflows
    with pytest.raises(ShiraLoadError, match=rf"{KEYS[2]}.*beyond .*range.*nothing was changed"):
        pipe.load_shira_weights(bad, adapter_name="bad")
    assert_unchanged(pipe, base)  # the first two weights were written, then put back
    assert pipe.get_shira_adapters() == {}
    pipe.load_shira_weights(good, adapter_name="good")
    with_good = snapshot(pipe)
    for verb in ("load", "hotswap", "inactive-then-fuse"):
        if verb == "load":  # the grow pass
            call = lambda: pipe.load_shira_weights(bad, adapter_name="bad")  # noqa: E731
        elif verb == "hotswap":  # the one-pass switch
            call = lambda: pipe.load_shira_weights(bad, adapter_name="good", hotswap=True)  # noqa: E731
        else:
            pipe.load_shira_weights(bad, alpha=0.0, adapter_name="bad")
            pipe.set_shira_adapters("good")
            with_good_and_bad_inactive = pipe.get_shira_adapters()
            call = lambda: pipe.set_shira_adapters(["good", "bad"], [1.0, 1.0])  # noqa: E731
        with pytest.raises(ShiraLoadError, match="nothing was changed"):
            call()
        assert_unchanged(pipe, with_good)
    assert pipe.get_shira_adapters() == with_good_and_bad_inactive
    pipe.unload_shira_weights()
    assert_unchanged(pipe, base)


def test_a_weight_near_its_largest_value_overflows_from_a_small_delta():
    pipe = tiny_pipeline("sd", dtype=torch.float16)
    with torch.no_grad():
        pipe.unet.get_parameter(KEYS[0]).view(-1)[:2] = 65000.0
    base = snapshot(pipe)
    bad = adapter_on(pipe, {KEYS[0]: [1000.0, 1000.0]})
    with pytest.raises(ShiraLoadError, match=rf"{KEYS[0]}.*float16"):
        pipe.load_shira_weights(bad, adapter_name="bad")
    assert_unchanged(pipe, base)
    fine = adapter_on(pipe, {KEYS[0]: [-1000.0, -1000.0]})
    pipe.load_shira_weights(fine, adapter_name="fine")  # 64000: finite
    assert_holds(pipe, fused(base, (fine, 1.0)))


def test_fusing_two_adapters_that_are_finite_alone_but_not_together_is_refused():
    pipe = tiny_pipeline("sd", dtype=torch.float16)
    base = snapshot(pipe)
    first, second = (adapter_on(pipe, {KEYS[0]: [40000.0, 1.0]}) for _ in range(2))
    pipe.load_shira_weights(first, adapter_name="first")
    pipe.load_shira_weights(second, adapter_name="second", alpha=0.0)
    pipe.set_shira_adapters("first")
    state, weights = pipe.get_shira_adapters(), snapshot(pipe)
    with pytest.raises(ShiraLoadError, match="nothing was changed"):
        pipe.set_shira_adapters(["first", "second"], [1.0, 1.0])
    assert pipe.get_shira_adapters() == state
    assert_unchanged(pipe, weights)
    pipe.set_shira_adapters(["first", "second"], [1.0, -1.0])  # they cancel: fine
    assert_holds(pipe, fused(base, (first, 1.0), (second, -1.0)))


def test_a_weight_that_already_holds_inf_is_not_blamed_on_the_adapter():
    pipe = tiny_pipeline("sd")
    with torch.no_grad():
        pipe.unet.get_parameter(KEYS[0]).view(-1)[0] = float("inf")
    base = snapshot(pipe)
    adapter = adapter_on(pipe, {KEYS[0]: [0.5, 0.5]})
    pipe.load_shira_weights(adapter, adapter_name="a")
    assert_holds(pipe, fused(base, (adapter, 1.0)))
    pipe.unload_shira_weights()
    assert_unchanged(pipe, base)


# ---- 6: getters read under the lock ------------------------------------------------------------------------------
@pytest.mark.parametrize("getter", ["get_shira_adapters", "save_shira_weights"])
def test_getters_are_not_torn_by_another_thread(getter, tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.load_shira_weights(random_adapter(pipe, seed=4, components=("unet",)), adapter_name="a")
    engine = pipe.shira_engine
    other = random_adapter(pipe, seed=5, components=("unet",))
    # while the getter reads, another thread loads "b" (get: the dict it iterates grows) or unloads "a" (save)
    meddle = (lambda: pipe.load_shira_weights(other, adapter_name="b")) if getter == "get_shira_adapters" else pipe.unload_shira_weights
    threads: list[threading.Thread] = []

    class Meddled(dict):
        def __getitem__(self, key):
            if not threads:  # the first read: without the lock the other thread runs to completion here
                threads.append(threading.Thread(target=meddle))
                threads[0].start()
                threads[0].join(timeout=1.0)
            return super().__getitem__(key)

    engine.adapters = Meddled(engine.adapters)
    if getter == "get_shira_adapters":
        assert list(pipe.get_shira_adapters()) == ["a"]
    else:
        pipe.save_shira_weights(tmp_path, adapter_name="a")
        assert ShiraAdapter.load(tmp_path / "shira_weights.safetensors").num_parameters > 0
    threads[0].join()
    assert sorted(pipe.get_shira_adapters()) == (["a", "b"] if getter == "get_shira_adapters" else [])


# ---- 7: names are non-empty strings -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [123, ("A", "B"), ""])
def test_adapter_names_must_be_non_empty_strings(name):
    pipe = tiny_pipeline("sd")
    base = snapshot(pipe)
    with pytest.raises(ShiraLoadError, match="adapter name must be a non-empty string"):
        pipe.load_shira_weights(random_adapter(pipe, seed=6), adapter_name=name)
    assert_unchanged(pipe, base)
    assert pipe.get_shira_adapters() == {}
    pipe.load_shira_weights(random_adapter(pipe, seed=6), adapter_name="A")
    for verb in (pipe.unload_shira_weights, pipe.set_shira_adapters):
        with pytest.raises(ShiraLoadError, match="adapter name must be a non-empty string"):
            verb([name])
    assert pipe.get_active_shira_adapters() == ["A"]
