"""What is trained, without the trainer: the three trainables behind one protocol, the factory's checks, sparse ==
hook, exact export, the sparse impl's memory and gradients, LoRA's fp32 factors and removal."""

import copy

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn.utils import parametrize

from shira_diffusion import ShiraAdapter
from shira_diffusion.masks import mask_budget
from shira_diffusion.testing import tiny_components, tiny_pipeline
from shira_diffusion.trainables import (
    ADAPTERS,
    IMPLS,
    SHIRA_IMPLS,
    UNET_TARGETS,
    ConfigError,
    HookShiraTrainable,
    LoraTrainable,
    SparseShiraTrainable,
    Trainable,
    find_targets,
    make_trainable,
    prepare_trainable,
)

from .helpers import one_thread  # noqa: F401  (an autouse fixture)


def tiny_unet():
    return tiny_components("sd")["unet"].requires_grad_(False)


def _step_inputs(unet, generator):
    size = unet.config.sample_size
    return (torch.randn(2, 4, size, size, generator=generator), torch.tensor([10, 700]), torch.randn(2, 5, 32, generator=generator))


def _positions(targets, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randperm(m.weight.numel(), generator=generator)[:count].sort().values for n, m in targets.items()}


# ---- the protocol and the registries -------------------------------------------------------------------------
def test_every_trainable_is_a_trainable_with_its_adapter_and_weight_needs():
    assert ADAPTERS == ("shira", "lora") and IMPLS == tuple(SHIRA_IMPLS) == ("sparse", "hook")
    assert SHIRA_IMPLS == {"sparse": SparseShiraTrainable, "hook": HookShiraTrainable}
    found = {}
    for adapter, impl in (("shira", "sparse"), ("shira", "hook"), ("lora", "sparse")):
        unet = tiny_unet()
        targets = find_targets(unet, ("to_q", "ff.net.2"))
        trainable = make_trainable(unet, adapter, positions=_positions(targets, 20), module_names=sorted(targets), impl=impl, rank=2)
        assert isinstance(trainable, Trainable)
        found[(adapter, impl)] = trainable
    count = len(targets)
    sparse, hook, lora = found.values()
    assert type(sparse) is SparseShiraTrainable and type(hook) is HookShiraTrainable and type(lora) is LoraTrainable
    assert [t.adapter for t in found.values()] == ["shira", "shira", "lora"]
    assert [t.trains_full_weights for t in found.values()] == [False, True, False]  # hook: fp32 weights, no FSDP
    assert sparse.num_parameters == hook.num_parameters == 20 * count
    assert not isinstance(object(), Trainable)


def test_make_trainable_checks_its_arguments_before_the_model_changes():
    unet = tiny_unet()
    targets = find_targets(unet, ("to_q",))
    good = _positions(targets, 10)
    before = {n: p.detach().clone() for n, p in unet.state_dict().items()}
    errors = [
        (dict(adapter="dora", positions=good), r"--adapter must be one of \['shira', 'lora'\], got 'dora'"),
        (dict(adapter="shira", positions=good, impl="fast"), r"--impl must be one of \['sparse', 'hook'\], got 'fast'"),
        (dict(adapter="shira", module_names=sorted(targets)), "needs positions"),
        (dict(adapter="lora", positions=good), "needs module_names"),
        (dict(adapter="lora", module_names=sorted(targets), rank=0), "--rank must be a positive integer, got 0"),
        (dict(adapter="lora", module_names=sorted(targets), dropout=1.0), r"--lora_dropout must be in \[0, 1\), got 1.0"),
        (dict(adapter="lora", module_names=["down_blocks.9.nothing"]), "'down_blocks.9.nothing' is not a module of UNet2DConditionModel"),
        (dict(adapter="lora", module_names=[]), "LoRA module names are empty"),
        (dict(adapter="shira", positions={}), "SHiRA positions are empty"),
        (dict(adapter="shira", positions={"nowhere": torch.arange(3)}), "'nowhere' is not a module of UNet2DConditionModel"),
        (dict(adapter="shira", positions={**good, "down_blocks.0": torch.arange(3)}), "down_blocks.0: DownBlock2D has no weight to train"),
    ]
    last = list(targets)[-1]  # a bad last module: nothing is attached to the ones before it either
    for problem, message in (
        (torch.tensor([0, 10**7]), f"{last}: mask positions outside a weight of"),
        (torch.tensor([5, 2]), f"{last}: mask positions must be sorted and unique"),
        (torch.tensor([2, 2]), f"{last}: mask positions must be sorted and unique"),
        (torch.tensor([0.0, 1.0]), f"{last}: mask positions must be a 1-D integer tensor"),
    ):
        errors.append((dict(adapter="shira", positions={**good, last: problem}), message))
    for kwargs, message in errors:
        with pytest.raises(ConfigError, match=message):
            make_trainable(unet, **kwargs)
        assert not any(p.requires_grad for p in unet.parameters()) and not hasattr(unet, "peft_config")
        assert not any("shira" in n for n, _ in unet.named_parameters())
    norm = {"conv_norm_out": torch.arange(3)}  # GroupNorm: a weight, but no sparse forward
    with pytest.raises(ConfigError, match="--impl sparse supports Linear and zero-padded Conv2d layers; use --impl hook"):
        make_trainable(unet, "shira", positions=norm)
    with pytest.raises(ConfigError, match=r"--impl hook trains the full weight, which must be float32 \(got torch.bfloat16\)"):
        make_trainable(tiny_unet().to(torch.bfloat16), "shira", positions=good, impl="hook")
    with pytest.raises(ConfigError, match="--adapter must be one of"):
        prepare_trainable(unet, "dora", rank=4)
    with pytest.raises(ConfigError, match="give positions or a rank"):
        prepare_trainable(unet, "shira")
    assert all(torch.equal(p, before[n]) for n, p in unet.state_dict().items())


def test_find_targets_matches_whole_name_parts_and_names_a_pattern_that_matches_nothing():
    unet = tiny_unet()
    found = find_targets(unet, ("to_q", "ff.net.2"))
    assert found and all(n.endswith((".to_q", ".ff.net.2")) and isinstance(m, nn.Linear) for n, m in found.items())
    convs = find_targets(unet, ("to_q",), include_conv=True)
    assert {n for n, m in convs.items() if isinstance(m, nn.Conv2d)} == {n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)}
    with pytest.raises(ConfigError, match="target module 'o_q' matches no Linear layer of UNet2DConditionModel"):
        find_targets(unet, ("to_q", "o_q"))


# ---- SHiRA: sparse and hook ------------------------------------------------------------------------------
def test_sparse_and_hook_train_the_same_adapter_with_weight_decay():
    exports, losses = {}, {}
    for impl in IMPLS:
        unet = tiny_unet()
        targets = find_targets(unet, ("to_q", "to_v", "ff.net.2"))
        trainable = make_trainable(unet, "shira", positions=_positions(targets, 60), impl=impl)
        optimizer = torch.optim.AdamW([trainable.param_group(0.5)], lr=1e-2)
        trainable.track(optimizer)
        inputs = _step_inputs(unet, torch.Generator().manual_seed(0))
        losses[impl] = []
        for _ in range(4):
            loss = unet(*inputs).sample.square().mean()
            loss.backward()
            trainable.decay_toward_base(1e-2, 0.5)
            optimizer.step()
            optimizer.zero_grad()
            losses[impl].append(loss.item())
        exports[impl] = trainable.export()
    assert exports["sparse"].keys() == exports["hook"].keys()
    for name, a in exports["sparse"].items():
        b = exports["hook"][name]
        assert torch.equal(a.positions, b.positions) and torch.allclose(a.deltas, b.deltas, atol=2e-6), name
    assert max(d.deltas.abs().max() for d in exports["sparse"].values()) > 1e-3  # it did train
    assert losses["sparse"] == pytest.approx(losses["hook"], rel=1e-5) and losses["sparse"][-1] < losses["sparse"][0]


@pytest.mark.parametrize("impl", IMPLS)
def test_exported_adapter_reproduces_the_trained_unet_and_nothing_outside_the_mask_moves(impl):
    pipe = tiny_pipeline("sd")
    trained = tiny_unet()
    base = {n: p.detach().clone() for n, p in trained.named_parameters()}
    targets = find_targets(trained, ("to_q", "to_v", "ff.net.2"), include_conv=True)  # + every Conv2d
    positions = _positions(targets, 50)
    trainable = prepare_trainable(trained, "shira", impl=impl, positions=positions)
    assert trainable.num_parameters == 50 * len(targets)
    optimizer = torch.optim.AdamW([trainable.param_group(0.1)], lr=1e-2)
    inputs = _step_inputs(trained, torch.Generator().manual_seed(0))
    for _ in range(3):
        trained(*inputs).sample.square().mean().backward()
        trainable.decay_toward_base(1e-2, 0.1)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        expected = trained(*inputs).sample
    for name, module in targets.items():  # neither gradients, Adam's moments nor weight decay moved anything else
        moved = torch.nonzero(module.weight.detach().view(-1) != base[f"{name}.weight"].view(-1)).flatten()
        assert set(moved.tolist()) <= set(positions[name].tolist())
    deltas = trainable.export()
    assert all(d.deltas.abs().max() > 0 for d in deltas.values())
    pipe.load_shira_weights(ShiraAdapter({"unet": deltas}))
    with torch.no_grad():
        ours = pipe.unet(*inputs).sample
    if impl == "sparse":
        assert torch.equal(ours, expected)  # fp32(W0[p] + v) both ways: bit-identical
    else:
        assert torch.allclose(ours, expected, atol=1e-6)  # W - W0, then W0 + delta: one rounding
    trainable.remove()  # leaves W0 + delta in the model and its own forward
    with torch.no_grad():
        assert torch.allclose(trained(*inputs).sample, expected, atol=1e-6)
    assert not any("shira" in n for n, _ in trained.named_parameters()) and not any(p.requires_grad for p in trained.parameters())


def test_hook_decay_acts_on_the_mask_only_and_undo_restores_it():
    layer = nn.Linear(6, 5)
    positions = torch.tensor([1, 7, 20])
    trainable = HookShiraTrainable(nn.Sequential(layer), {"0": positions})
    assert trainable.param_group(0.3)["weight_decay"] == 0.0  # AdamW's own decay would touch every entry
    with torch.no_grad():
        layer.weight.view(-1)[positions] += 1.0  # W - W0 = 1 at the mask
    before = layer.weight.detach().clone()
    layer(torch.randn(2, 6)).sum().backward()
    trainable.decay_toward_base(0.1, 0.5)
    flat_grad, flat = layer.weight.grad.view(-1), layer.weight.detach().view(-1)
    assert torch.count_nonzero(flat_grad) <= 3 and set(torch.nonzero(flat_grad).flatten().tolist()) <= set(positions.tolist())
    assert torch.allclose(flat[positions], before.view(-1)[positions] - 0.05)  # lr·wd·(W - W0)
    outside = torch.ones(30, dtype=torch.bool)
    outside[positions] = False
    assert torch.equal(flat[outside], before.view(-1)[outside])
    trainable.undo_decay()
    assert torch.equal(layer.weight.detach(), before)


def test_plain_adamw_decay_would_move_masked_out_weights():
    """Why the hook impl needs its own decay: AdamW's decoupled decay shrinks every weight it holds."""
    layer = nn.Linear(8, 8)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.zeros_like(layer.weight)
    torch.optim.AdamW([layer.weight], lr=1e-2, weight_decay=0.1).step()
    assert not torch.equal(layer.weight.detach(), before)


def test_sparse_impl_keeps_no_full_size_weight_for_backward():
    """A parametrization (or PEFT's SHiRA layer) hands W0 + scatter(v) to F.linear, which saves it until
    backward; the sparse impl rebuilds it in backward instead. Checked through what autograd saves."""

    def saved_shapes(unet, inputs):
        parameters = {p.untyped_storage().data_ptr() for p in unet.parameters()}
        shapes = []

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in parameters:
                shapes.append(tuple(tensor.shape))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(*inputs).sample.sum()
        return shapes

    class Scatter(nn.Module):
        def __init__(self, positions):
            super().__init__()
            self.positions, self.values = positions, nn.Parameter(torch.zeros(positions.numel()))

        def forward(self, weight):
            return weight.flatten().index_add(0, self.positions, self.values).view_as(weight)

    generator = torch.Generator().manual_seed(0)
    shapes = {}
    for variant in ("sparse", "parametrization"):
        unet = tiny_unet()
        targets = find_targets(unet, UNET_TARGETS)
        positions = {n: torch.arange(0, m.weight.numel(), 7) for n, m in targets.items()}
        if variant == "sparse":
            prepare_trainable(unet, "shira", positions=positions)
        else:
            for name, module in targets.items():
                parametrize.register_parametrization(module, "weight", Scatter(positions[name]))
        weight_shapes = {tuple(m.weight.shape) for m in targets.values()}
        shapes[variant] = [s for s in saved_shapes(unet, _step_inputs(unet, generator)) if s in weight_shapes]
    assert shapes["parametrization"] and not shapes["sparse"], shapes


def test_sparse_impl_holds_positions_as_int32_and_exports_the_mask_positions():
    """4 bytes per position instead of int64's 8: a quarter of the adapter's per-value training state."""
    unet = tiny_unet()
    targets = find_targets(unet, UNET_TARGETS)
    positions = {n: torch.arange(3, m.weight.numel(), 5) for n, m in targets.items()}
    trainable = prepare_trainable(unet, "shira", positions=positions)
    assert {m.shira_positions.dtype for m in targets.values()} == {torch.int32}
    deltas = trainable.export()
    assert all(torch.equal(deltas[f"{n}.weight"].positions, positions[n]) for n in targets)
    assert all(deltas[f"{n}.weight"].positions.dtype == torch.int64 for n in targets)


@pytest.mark.parametrize("density", [0.03, 0.5])  # below SAMPLED_DENSITY: dW at the positions only; above: dense dW
def test_sparse_impl_value_gradients_match_the_dense_weight_gradient(monkeypatch, density):
    from shira_diffusion.trainables import sparse

    calls, sampled = [], sparse._sampled_grad
    monkeypatch.setattr(sparse, "_sampled_grad", lambda *args: calls.append(1) or sampled(*args))
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(48, 80)
    nn.init.normal_(layer.weight, generator=generator)
    x = torch.randn(2, 7, 48, generator=generator)
    positions = torch.randperm(layer.weight.numel(), generator=generator)[: int(density * layer.weight.numel())].sort().values
    reference = nn.Linear(48, 80)
    reference.load_state_dict(layer.state_dict())
    reference(x).square().sum().backward()
    trainable = SparseShiraTrainable(nn.Sequential(layer), {"0": positions})
    layer(x).square().sum().backward()
    assert len(calls) == (density <= sparse.SAMPLED_DENSITY)
    torch.testing.assert_close(layer.shira_values.grad, reference.weight.grad.view(-1)[positions], rtol=1e-5, atol=1e-4)
    assert trainable.num_parameters == positions.numel()


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sparse_impl_gradients_match_the_dense_model_for_linears_and_convs(kind, input_grad):
    generator = torch.Generator().manual_seed(1)
    layer = nn.Linear(24, 40) if kind == "linear" else nn.Conv2d(6, 10, 3, padding=1, stride=2)
    nn.init.normal_(layer.weight, generator=generator)
    shape = (2, 5, 24) if kind == "linear" else (2, 6, 9, 9)
    x = torch.randn(*shape, generator=generator)
    reference = copy.deepcopy(layer)
    x_ref = x.clone().requires_grad_(input_grad)
    reference(x_ref).square().sum().backward()
    positions = torch.randperm(layer.weight.numel(), generator=generator)[: layer.weight.numel() // 4].sort().values
    SparseShiraTrainable(nn.Sequential(layer), {"0": positions})
    x_ours = x.clone().requires_grad_(input_grad)
    layer(x_ours).square().sum().backward()
    torch.testing.assert_close(layer.shira_values.grad, reference.weight.grad.reshape(-1)[positions], rtol=1e-5, atol=1e-4)
    if input_grad:
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_tracked_sparse_impl_rewrites_the_weight_once_per_change_of_the_values(monkeypatch):
    from shira_diffusion import kernels

    writes = []
    add_scatter = kernels.add_scatter
    monkeypatch.setattr(kernels, "add_scatter", lambda jobs: writes.extend(jobs) or add_scatter(jobs))
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(16, 12)
    positions = torch.arange(0, layer.weight.numel(), 9)
    base = layer.weight.detach().clone().view(-1)
    trainable = SparseShiraTrainable(nn.Sequential(layer), {"0": positions})
    optimizer = torch.optim.AdamW([trainable.param_group(0.0)], lr=0.1)
    x = torch.randn(3, 16, generator=generator)

    def expected_weight():
        expected = base.clone()
        expected[positions] = base[positions] + layer.shira_values.detach()
        return expected.view_as(layer.weight)

    layer(x), layer(x)
    assert len(writes) == 2  # untracked: every forward writes
    trainable.track(optimizer)
    layer(x).square().sum().backward()
    layer(x)
    assert len(writes) == 3  # tracked: the second forward finds the values it wrote
    optimizer.step()
    assert len(writes) == 4 and torch.equal(layer.weight, expected_weight())  # a step: written by its hook
    layer(x)
    assert len(writes) == 4
    with torch.no_grad():
        layer.shira_values.add_(1.0)  # any in-place change autograd sees (a checkpoint load) counts too
    layer(x)
    assert len(writes) == 5 and torch.equal(layer.weight, expected_weight())
    trainable.remove()  # the step hook goes with it
    optimizer.step()
    assert len(writes) == 6  # remove()'s own final write only


# ---- LoRA ----------------------------------------------------------------------------------------------
def test_shira_budget_r_matches_lora_rank_r_parameter_count():
    shira = prepare_trainable(tiny_unet(), "shira", rank=4)
    lora = prepare_trainable(tiny_unet(), "lora", rank=4)
    assert shira.num_parameters == lora.num_parameters == sum(
        mask_budget(tuple(m.weight.shape), r=4) for m in find_targets(tiny_unet(), UNET_TARGETS).values())


def test_lora_factors_are_fp32_masters_on_a_bf16_model():
    unet = tiny_unet().to(torch.bfloat16)
    trainable = prepare_trainable(unet, "lora", rank=4)
    factors = trainable.named_parameters()
    assert factors and all(p.dtype == torch.float32 for _, p in factors)
    before = {n: p.detach().clone() for n, p in factors if "lora_A" in n}
    optimizer = torch.optim.AdamW([trainable.param_group(1e-2)], lr=1e-4)
    sample, timestep, hidden = _step_inputs(unet, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unet(sample.bfloat16(), timestep, hidden.bfloat16()).sample.float().square().mean().backward()
    optimizer.step()
    # lora_B starts at 0, so lora_A's first step is AdamW's decay, a 1e-6 relative change: bf16 rounds it away
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in factors if "lora_A" in n)
    assert changed == sum(p.numel() for p in before.values())


def test_lora_exports_peft_keys_and_remove_merges_it_into_plain_modules():
    unet = tiny_unet()
    names = sorted(find_targets(unet, ("to_q", "to_v")))
    trainable = make_trainable(unet, "lora", module_names=names, rank=2, dropout=0.1)
    assert {n for n, m in unet.named_modules() if isinstance(m, LoraLayer)} == set(names)
    assert trainable.config_dict()["r"] == 2 and trainable.config_dict()["lora_dropout"] == 0.1
    optimizer = torch.optim.AdamW([trainable.param_group(0.0)], lr=1e-2)
    inputs = _step_inputs(unet, torch.Generator().manual_seed(0))
    unet(*inputs).sample.square().mean().backward()
    optimizer.step()  # lora_B leaves 0: the LoRA now changes the output
    exported = trainable.export()
    assert set(exported) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    unet.eval()  # no dropout: the same output before and after the merge
    with torch.no_grad():
        expected = unet(*inputs).sample
    trainable.remove()
    assert not any(isinstance(m, LoraLayer) for m in unet.modules()) and not any("lora" in n for n, _ in unet.named_parameters())
    assert not hasattr(unet, "peft_config") and trainable.num_parameters == 0
    with torch.no_grad():
        torch.testing.assert_close(unet(*inputs).sample, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(unet.get_submodule(names[0]).weight, tiny_unet().get_submodule(names[0]).weight)  # merged
    make_trainable(unet, "lora", module_names=names, rank=2)  # and a fresh LoRA can go on again
