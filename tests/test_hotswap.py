"""`load_shira_weights(..., hotswap=True)`: one adapter replaced by another in place, in one pass where no other
adapter shares its weights; the same bits as unload + load, exact unload after, and bad input changes nothing."""

import pytest
import torch

from shira_diffusion import ShiraAdapter, ShiraLoadError, SparseDelta
from shira_diffusion.testing import tiny_pipeline

from .helpers import assert_unchanged, random_adapter, snapshot

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # fp32: the compiled one-pass kernel; others: torch


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} weights differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_hotswap_gives_the_bits_of_a_fresh_load_and_unloads_exactly(dtype, tmp_path):
    pipe, reference = tiny_pipeline("sd", dtype=dtype), tiny_pipeline("sd", dtype=dtype)
    before = snapshot(pipe)
    first = random_adapter(pipe, 0, density=0.2, scale=2.0)
    # the second adapter touches other weights too (and not all of the first's): LoRA hotswap cannot do this
    second = random_adapter(pipe, 1, density=0.2, scale=2.0, suffixes=("to_q.weight", "to_k.weight", "fc2.weight"))
    path = second.save(tmp_path / "second.safetensors")
    pipe.load_shira_weights(first, alpha=0.7, adapter_name="style")
    assert pipe.load_shira_weights(path, alpha=1.3, adapter_name="style", hotswap=True) == "style"
    reference.load_shira_weights(second, alpha=1.3, adapter_name="style")
    assert_same_bits(snapshot(pipe), snapshot(reference))
    listed = pipe.get_shira_adapters()
    assert list(listed) == ["style"] and listed["style"]["alpha"] == 1.3
    assert listed["style"]["parameters"] == sum(delta.positions.numel() for _, _, delta in second.items())
    assert pipe.get_active_shira_adapters() == ["style"]
    pipe.load_shira_weights(first, alpha=0.7, adapter_name="style", hotswap=True)  # and back
    reference.unload_shira_weights()
    reference.load_shira_weights(first, alpha=0.7, adapter_name="style")
    assert_same_bits(snapshot(pipe), snapshot(reference))
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)
    assert pipe.shira_engine.targets == {}


@pytest.mark.parametrize("dtype", DTYPES)
def test_hotswap_next_to_other_adapters_keeps_the_order_and_the_others(dtype):
    pipe, reference = tiny_pipeline("sd", dtype=dtype), tiny_pipeline("sd", dtype=dtype)
    before = snapshot(pipe)
    first, second, other = (random_adapter(pipe, seed, density=0.3, scale=2.0) for seed in (0, 1, 2))
    pipe.load_shira_weights(first, adapter_name="style")
    pipe.load_shira_weights(other, adapter_name="other")
    pipe.set_shira_adapters(["style", "other"], [1.0, 0.5])
    pipe.load_shira_weights(second, alpha={"unet": 0.8, "text_encoder": -1.0}, adapter_name="style", hotswap=True)
    reference.load_shira_weights(second, adapter_name="style")
    reference.load_shira_weights(other, adapter_name="other")
    reference.set_shira_adapters(["style", "other"], [{"unet": 0.8, "text_encoder": -1.0}, 0.5])
    assert pipe.get_active_shira_adapters() == ["style", "other"]
    assert_same_bits(snapshot(pipe), snapshot(reference))
    pipe.unload_shira_weights("style")
    reference.unload_shira_weights("style")
    assert_same_bits(snapshot(pipe), snapshot(reference))
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)


def test_hotswapping_an_inactive_or_disabled_adapter_writes_nothing_until_it_is_active():
    pipe = tiny_pipeline("sd")
    before = snapshot(pipe)
    first, second = random_adapter(pipe, 0, scale=2.0), random_adapter(pipe, 1, scale=2.0)
    pipe.load_shira_weights(first, adapter_name="style")
    pipe.set_shira_adapters([])
    pipe.load_shira_weights(second, adapter_name="style", hotswap=True)
    assert pipe.get_active_shira_adapters() == []
    assert_unchanged(pipe, before)
    pipe.set_shira_adapters("style")
    with_second = snapshot(pipe)
    pipe.disable_shira()
    pipe.load_shira_weights(first, adapter_name="style", hotswap=True)
    assert_unchanged(pipe, before)
    pipe.enable_shira()
    pipe.load_shira_weights(second, adapter_name="style", hotswap=True)
    assert_same_bits(snapshot(pipe), with_second)
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("shared", [False, True])  # alone: one-pass switch; shared with another adapter: general path
@pytest.mark.parametrize("dtype", DTYPES)
def test_another_writers_change_survives_a_hotswap(dtype, shared):
    # A write by someone else (diffusers' fuse_lora, a user's edit) at the leaving adapter's positions is a change
    # of the base: it stays under the arriving adapter and after the unload, the same bits as unload + load give.
    pipes = tiny_pipeline("sd", dtype=dtype), tiny_pipeline("sd", dtype=dtype)
    name = next(n for n, _ in pipes[0].unet.named_parameters() if n.endswith("attn1.to_q.weight"))
    w0 = pipes[0].unet.get_parameter(name).detach().clone().view(-1)
    shape = tuple(pipes[0].unet.get_parameter(name).shape)
    first = ShiraAdapter({"unet": {name: SparseDelta(shape, torch.tensor([1, 4, 6]), torch.tensor([1.0, 2.0, 3.0]))}})
    second = ShiraAdapter({"unet": {name: SparseDelta(shape, torch.tensor([4, 8]), torch.tensor([10.0, 20.0]))}})
    other = ShiraAdapter({"unet": {name: SparseDelta(shape, torch.tensor([6, 9]), torch.tensor([-1.0, 5.0]))}})
    for pipe in pipes:
        pipe.load_shira_weights(first, adapter_name="style")
        if shared:
            pipe.load_shira_weights(other, adapter_name="other")
            pipe.set_shira_adapters(["style", "other"], [1.0, 0.5])
        with torch.no_grad():
            pipe.unet.get_parameter(name).view(-1)[[1, 4]] += 0.25  # position 1 leaves, position 4 stays under `second`
    pipes[0].load_shira_weights(second, adapter_name="style", hotswap=True)
    pipes[1].unload_shira_weights("style")
    pipes[1].load_shira_weights(second, adapter_name="style")
    if shared:
        pipes[1].set_shira_adapters(["style", "other"], [1.0, 0.5])
    weights = [pipe.unet.get_parameter(name).detach().view(-1) for pipe in pipes]
    assert torch.equal(weights[0], weights[1])
    assert torch.allclose(weights[0][[4, 8]].float(), w0[[4, 8]].float() + torch.tensor([10.25, 20.0]), atol=0.1)
    assert pipes[0].get_active_shira_adapters() == (["style", "other"] if shared else ["style"])
    for pipe in pipes:
        pipe.unload_shira_weights()
    assert torch.equal(weights[0], weights[1])
    edited = torch.zeros_like(w0, dtype=torch.bool)
    edited[[1, 4]] = True
    assert torch.equal(weights[0][~edited], w0[~edited])  # bit for bit where no one else wrote
    assert torch.allclose(weights[0][edited].float(), w0[edited].float() + 0.25, atol=1e-2)  # the edit is kept


def test_bad_hotswaps_raise_clear_errors_and_change_nothing():
    pipe = tiny_pipeline("sd")
    pipe.load_shira_weights(random_adapter(pipe, 0), adapter_name="style")
    state = snapshot(pipe)
    name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn1.to_q.weight"))
    wrong_shape = ShiraAdapter({"unet": {name: SparseDelta((3, 3), torch.tensor([0]), torch.tensor([1.0]))}})
    with pytest.raises(ShiraLoadError, match="name it with adapter_name"):
        pipe.load_shira_weights(random_adapter(pipe, 1), hotswap=True)
    with pytest.raises(ShiraLoadError, match="unknown adapter 'nope'.*'style'"):
        pipe.load_shira_weights(random_adapter(pipe, 1), adapter_name="nope", hotswap=True)
    with pytest.raises(ShiraLoadError, match=r"shape \(3, 3\)"):
        pipe.load_shira_weights(wrong_shape, adapter_name="style", hotswap=True)
    with pytest.raises(ShiraLoadError, match="finite"):
        pipe.load_shira_weights(random_adapter(pipe, 1), alpha=float("nan"), adapter_name="style", hotswap=True)
    assert_unchanged(pipe, state)
    assert pipe.get_active_shira_adapters() == ["style"]
    pipe.unload_shira_weights()


def test_fp64_weights_keep_their_bits_where_no_active_adapter_writes():
    # Sums are accumulated in the weight's precision when that is above fp32: an inactive adapter's positions
    # hold the fp64 originals, not their fp32 rounding.
    pipe = tiny_pipeline("sd", dtype=torch.float64)
    before = snapshot(pipe)
    pipe.load_shira_weights(random_adapter(pipe, 0, density=0.3), adapter_name="a")
    pipe.load_shira_weights(random_adapter(pipe, 1, density=0.3), adapter_name="b")
    pipe.set_shira_adapters("a")
    only_a = tiny_pipeline("sd", dtype=torch.float64)
    only_a.load_shira_weights(random_adapter(only_a, 0, density=0.3), adapter_name="a")
    assert_same_bits(snapshot(pipe), snapshot(only_a))
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)


def test_the_torch_path_used_on_gpus_gives_the_same_bits(monkeypatch):
    # Without the compiled loops (GPUs, installs without numba) every step runs as torch ops: the same bits.
    from shira_diffusion import kernels

    if kernels.numba is None:
        pytest.skip("numba is not installed")
    pipes = tiny_pipeline("sd"), tiny_pipeline("sd")
    before = snapshot(pipes[0])
    first, second, other = (random_adapter(pipes[0], seed, density=0.3, scale=2.0) for seed in (0, 1, 2))
    steps = [lambda p: p.load_shira_weights(first, adapter_name="style"),
             lambda p: p.load_shira_weights(second, alpha=0.6, adapter_name="style", hotswap=True),  # alone: one pass
             lambda p: p.load_shira_weights(other, alpha=-0.5, adapter_name="other"),  # beside: unions widen
             lambda p: p.load_shira_weights(first, adapter_name="style", hotswap=True),  # shared: general path
             lambda p: p.unload_shira_weights("other"),  # unions shrink
             lambda p: p.unload_shira_weights()]
    compiled = kernels.numba
    for step in steps:
        for pipe, numba in zip(pipes, (compiled, None)):
            monkeypatch.setattr(kernels, "numba", numba)
            step(pipe)
        assert_same_bits(snapshot(pipes[0]), snapshot(pipes[1]))
    assert_unchanged(pipes[1], before)
