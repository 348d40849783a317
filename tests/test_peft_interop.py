"""PEFT interop: SHiRA adapters saved by PEFT load into our pipelines with PEFT's own outputs, and back."""

import copy

import pytest
import torch
from peft import PeftModel, ShiraConfig, get_peft_model
from peft.tuners.shira import ShiraLayer

from shira_diffusion import ShiraAdapter, ShiraFormatError, SparseDelta
from shira_diffusion.testing import tiny_pipeline

from .helpers import assert_unchanged, snapshot

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def unet_inputs(unet):
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    hidden = torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([10, 500]), hidden


def save_peft_adapter(unet, directory, seed, r=2):
    torch.manual_seed(seed)  # init_weights=False draws the values with randn
    model = get_peft_model(copy.deepcopy(unet), ShiraConfig(r=r, target_modules=TARGETS, init_weights=False, random_seed=seed))
    model.save_pretrained(str(directory))
    return directory


def set_peft_scales(model, scales):
    for module in model.modules():
        if isinstance(module, ShiraLayer):
            for name, scale in scales.items():
                if name in module.shira_weight:
                    module.set_scale(name, scale)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


@torch.no_grad()
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_peft_adapter_matches_peft_model_output(pipe, tmp_path, alpha):
    directory = save_peft_adapter(pipe.unet, tmp_path / "peft", seed=1)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(directory))
    set_peft_scales(peft_model, {"default": alpha})
    before = snapshot(pipe)
    pipe.load_shira_weights(directory, alpha=alpha)  # recognised as a PEFT SHiRA folder, into the UNet
    inputs = unet_inputs(pipe.unet)
    ours, theirs = pipe.unet(*inputs).sample, peft_model(*inputs).sample
    assert (ours - theirs).abs().max() <= 1e-5
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)
    assert (pipe.unet(*inputs).sample - ours).abs().max() > 1e-4  # the adapter did change the output


@torch.no_grad()
def test_two_peft_adapters_fused_match_peft_multi_adapter(pipe, tmp_path):
    first = save_peft_adapter(pipe.unet, tmp_path / "a", seed=1)
    second = save_peft_adapter(pipe.unet, tmp_path / "b", seed=2)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(first), adapter_name="a")
    peft_model.load_adapter(str(second), adapter_name="b")
    peft_model.base_model.set_adapter(["a", "b"])
    set_peft_scales(peft_model, {"a": 0.7, "b": 0.3})
    base_output = pipe.unet(*unet_inputs(pipe.unet)).sample
    pipe.load_shira_weights(first, adapter_name="a")
    pipe.load_shira_weights(second / "adapter_model.safetensors", adapter_name="b")  # the weights file works too
    pipe.set_shira_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    inputs = unet_inputs(pipe.unet)
    ours = pipe.unet(*inputs).sample
    assert (ours - peft_model(*inputs).sample).abs().max() <= 1e-5
    assert (ours - base_output).abs().max() > 1e-3
    pipe.unload_shira_weights()


@torch.no_grad()
def test_our_adapter_round_trips_through_peft(pipe, tmp_path):
    r = 2
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for name, parameter in pipe.unet.named_parameters():
        if name.endswith(("to_q.weight", "to_out.0.weight")):
            rows, cols = parameter.shape
            positions = torch.randperm(rows * cols, generator=generator)[: r * (rows + cols)].sort().values
            deltas[name] = SparseDelta((rows, cols), positions, torch.randn(positions.numel(), generator=generator))
    adapter = ShiraAdapter({"unet": deltas})
    adapter.to_peft(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(tmp_path / "peft"))
    pipe.load_shira_weights(adapter, adapter_name="ours")
    inputs = unet_inputs(pipe.unet)
    assert (pipe.unet(*inputs).sample - peft_model(*inputs).sample).abs().max() <= 1e-5
    pipe.unload_shira_weights()
    back = ShiraAdapter.from_peft(tmp_path / "peft", "unet", shapes={n: p.shape for n, p in pipe.unet.named_parameters()})
    for (_, name, delta), (_, name2, delta2) in zip(adapter.items(), back.items()):
        assert name == name2 and torch.equal(delta.positions, delta2.positions) and torch.equal(delta.deltas, delta2.deltas)


def test_to_peft_refuses_what_peft_cannot_represent(tmp_path):
    odd = ShiraAdapter({"unet": {"a.weight": SparseDelta((4, 4), torch.tensor([0, 1, 2]), torch.ones(3))}})
    with pytest.raises(ShiraFormatError, match=r"3 parameters is not r\*\(out\+in\)"):
        odd.to_peft(tmp_path / "x")
    conv = ShiraAdapter({"unet": {"c.weight": SparseDelta((2, 2, 2, 2), torch.arange(8), torch.ones(8))}})
    with pytest.raises(ShiraFormatError, match="nn.Linear weights only"):
        conv.to_peft(tmp_path / "y")
    two = ShiraAdapter({"unet": {"a.weight": SparseDelta((2, 2), torch.arange(4), torch.ones(4))}, "text_encoder": {"a.weight": SparseDelta((2, 2), torch.arange(4), torch.ones(4))}})
    with pytest.raises(ShiraFormatError, match="pass component="):
        two.to_peft(tmp_path / "z")


def test_from_peft_without_shapes_infers_them_or_says_why(pipe, tmp_path):
    # r*(m+n) entries whose largest row/column are m-1/n-1 pin the shape down; otherwise ask for shapes.
    positions = torch.tensor([0, 5, 9, 11, 13, 17, 19, 22, 24, 27, 30, 31])  # 12 = r*(4+8) with r=1; shape (4, 8)
    ShiraAdapter({"unet": {"lin.weight": SparseDelta((4, 8), positions, torch.ones(12))}}).to_peft(tmp_path / "ok")
    assert ShiraAdapter.from_peft(tmp_path / "ok", "unet").deltas["unet"]["lin.weight"].shape == (4, 8)
    ambiguous = torch.tensor([0, 1, 2, 3, 4, 8, 9, 10, 11, 16, 17, 18])  # max row 2, max column 4: shape unknown
    ShiraAdapter({"unet": {"lin.weight": SparseDelta((4, 8), ambiguous, torch.ones(12))}}).to_peft(tmp_path / "ambiguous")
    with pytest.raises(ShiraFormatError, match=r"lin\.weight: PEFT files do not store weight shapes.*pass shapes="):
        ShiraAdapter.from_peft(tmp_path / "ambiguous", "unet")
    directory = save_peft_adapter(pipe.unet, tmp_path / "peft", seed=3)
    adapter = ShiraAdapter.from_peft(directory, "unet", shapes={n: p.shape for n, p in pipe.unet.named_parameters()})
    assert adapter.mask_type == "random" and len(adapter.deltas["unet"]) == 32  # q, k, v, out of 8 attentions
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "wrong" / "adapter_model.safetensors").write_bytes((directory / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ShiraFormatError, match="peft_type is 'LORA', expected 'SHIRA'"):
        ShiraAdapter.from_peft(tmp_path / "wrong", "unet")


def test_peft_repo_on_the_hub_loads_with_weight_name_on_a_cold_cache(pipe, tmp_path, monkeypatch):
    # A fake Hub that serves only what is asked for: naming adapter_model.safetensors must fetch its config too.
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    remote = save_peft_adapter(pipe.unet, tmp_path / "remote", seed=1)
    cache, asked = tmp_path / "cache", []

    def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
        asked.append(filename)
        if not (remote / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        cache.mkdir(exist_ok=True)
        (cache / filename).write_bytes((remote / filename).read_bytes())
        return str(cache / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    before = snapshot(pipe)
    expected = ShiraAdapter.from_peft(remote, "unet", shapes={n: p.shape for n, p in pipe.unet.named_parameters()})
    pipe.load_shira_weights("someone/peft-shira", weight_name="adapter_model.safetensors", adapter_name="peft")
    assert asked == ["adapter_model.safetensors", "adapter_config.json"]
    assert pipe.get_shira_adapters()["peft"]["parameters"] == expected.num_parameters
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)
