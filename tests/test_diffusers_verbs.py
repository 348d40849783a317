"""diffusers' own verbs, inherited by every pipeline, act on SHiRA adapters with diffusers' semantics."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from shira_diffusion import ShiraAdapter
from shira_diffusion.engine import ShiraLoadError
from shira_diffusion.loaders import ShiraStableDiffusionPipeline
from shira_diffusion.testing import tiny_pipeline

from .helpers import assert_unchanged, random_adapter, snapshot


def fused(before, *terms):
    """W0 + sum alpha * S, summed in fp32, for (adapter, {component: alpha} or alpha) terms."""
    expected = {key: value.clone() for key, value in before.items()}
    sums = {}
    for adapter, alpha in terms:
        for component, name, delta in adapter.items():
            key = f"{component}.{name}"
            scale = alpha.get(component, 1.0) if isinstance(alpha, dict) else alpha
            sums.setdefault(key, before[key].view(-1).float().clone())[delta.positions] += delta.deltas.float() * scale
    for key, total in sums.items():
        expected[key] = total.to(before[key].dtype).view(before[key].shape)
    return expected


def holds(pipe, expected) -> bool:
    now = snapshot(pipe)
    return all(torch.equal(now[key], value) for key, value in expected.items())


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("lora")
    source = tiny_pipeline("sd", seed=3)
    source.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(source.unet))
    return folder


def unet_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(1, 4, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=text).sample


def test_loading_makes_the_new_adapter_the_active_one_and_a_weight_left_out_is_one():
    pipe = tiny_pipeline("sd")
    base = snapshot(pipe)
    a, b = random_adapter(pipe, 1), random_adapter(pipe, 2)
    pipe.load_shira_weights(a, alpha=0.5, adapter_name="a")
    pipe.load_shira_weights(b, alpha=0.25, adapter_name="b")
    assert pipe.get_active_shira_adapters() == ["b"] and holds(pipe, fused(base, (b, 0.25)))
    pipe.set_shira_adapters(["a", "b"], adapter_weights=[0.5, None])  # diffusers' keyword; None is 1.0
    assert holds(pipe, fused(base, (a, 0.5), (b, 1.0)))
    pipe.set_shira_adapters(["a", "b"])  # no weights: 1.0 each, not the last ones
    assert holds(pipe, fused(base, (a, 1.0), (b, 1.0)))
    assert pipe.get_shira_adapters()["a"]["alpha"] == 1.0


def test_getters_list_shira_adapters_beside_lora_ones(lora_dir):
    pipe = tiny_pipeline("sd")
    pipe.load_lora_weights(str(lora_dir), adapter_name="lora")
    pipe.load_shira_weights(random_adapter(pipe, 1, components=("unet",)), adapter_name="unet_style")
    pipe.load_shira_weights(random_adapter(pipe, 2, components=("text_encoder",)), adapter_name="text_style")
    assert pipe.get_list_adapters() == {"unet": ["lora", "unet_style"], "text_encoder": ["text_style"]}
    assert pipe.get_active_adapters() == ["lora", "text_style"]


def test_set_adapters_activates_exactly_the_named_adapters_of_either_kind(lora_dir):
    pipe, shira_only, lora_only = tiny_pipeline("sd"), tiny_pipeline("sd"), tiny_pipeline("sd")
    style = random_adapter(pipe, 1, components=("unet",), suffixes=("to_q.weight",))
    for target in (pipe, shira_only):
        target.load_shira_weights(style, adapter_name="style")
    for target in (pipe, lora_only):
        target.load_lora_weights(str(lora_dir), adapter_name="lora")
    pipe.set_adapters(["style"], adapter_weights=[0.5])  # the LoRA goes off
    shira_only.set_shira_adapters("style", 0.5)
    assert torch.allclose(unet_output(pipe), unet_output(shira_only), atol=1e-6)
    pipe.set_adapters("lora")  # the style goes off
    assert pipe.get_active_shira_adapters() == []
    assert torch.allclose(unet_output(pipe), unet_output(lora_only), atol=1e-6)
    with pytest.raises(ValueError, match=r"adapter 'nope' is not loaded \(LoRA: \['lora'\], SHiRA: \['style'\]\)"):
        pipe.set_adapters(["style", "nope"])


def test_delete_disable_and_enable_act_on_shira_adapters(lora_dir):
    pipe = tiny_pipeline("sd")
    base = snapshot(pipe)
    a, b = random_adapter(pipe, 1), random_adapter(pipe, 2)
    pipe.load_shira_weights(a, adapter_name="a")
    pipe.load_shira_weights(b, adapter_name="b")
    pipe.set_shira_adapters(["a", "b"])
    pipe.disable_lora()
    assert_unchanged(pipe, base)
    pipe.enable_lora()
    assert holds(pipe, fused(base, (a, 1.0), (b, 1.0)))
    pipe.delete_adapters("a")
    assert list(pipe.get_shira_adapters()) == ["b"] and holds(pipe, fused(base, (b, 1.0)))
    pipe.load_lora_weights(str(lora_dir), adapter_name="lora")
    pipe.delete_adapters(["b", "lora"])
    assert pipe.get_list_adapters() == {}
    pipe.load_shira_weights(a, adapter_name="c")
    with pytest.raises(ShiraLoadError, match="'c' is a SHiRA adapter.*pipe.to"):
        pipe.set_lora_device(["c"], "cpu")


def test_a_per_call_scale_scales_shira_adapters_for_that_call_only():
    pipe = tiny_pipeline("sd")
    style = random_adapter(pipe, 1, scale=2.0)
    pipe.load_shira_weights(style, adapter_name="style")
    written = snapshot(pipe)
    call = dict(prompt="a cat", num_inference_steps=2, output_type="np")
    scaled = pipe(**call, generator=torch.Generator().manual_seed(0), cross_attention_kwargs={"scale": 0.5}).images
    assert_unchanged(pipe, written)  # restored exactly after the call
    pipe.set_shira_adapters("style", 0.5)
    reference = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert abs(scaled - reference).max() < 1e-6
    full = pipe(**call, generator=torch.Generator().manual_seed(0), cross_attention_kwargs={"scale": 2.0}).images
    assert abs(full - reference).max() > 1e-3


def test_flux_takes_the_scale_from_joint_attention_kwargs():
    pipe = tiny_pipeline("flux")
    style = random_adapter(pipe, 1, components=("transformer",), suffixes=("to_q.weight", "ff.net.2.weight"), scale=2.0)
    pipe.load_shira_weights(style, adapter_name="style")
    call = dict(prompt="a cat", num_inference_steps=2, output_type="np", height=32, width=32)
    scaled = pipe(**call, generator=torch.Generator().manual_seed(0), joint_attention_kwargs={"scale": 0.0}).images
    pipe.disable_shira()
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert abs(scaled - base).max() < 1e-6


def test_fuse_then_unload_makes_styles_permanent_and_unload_alone_restores():
    pipe = tiny_pipeline("sd")
    base = snapshot(pipe)
    style = random_adapter(pipe, 1)
    pipe.load_shira_weights(style, adapter_name="style")
    pipe.unload_lora_weights()  # not fused: the style goes, as a LoRA would
    assert_unchanged(pipe, base)
    assert pipe.get_shira_adapters() == {}
    pipe.load_shira_weights(style, adapter_name="style")
    pipe.fuse_lora(lora_scale=0.5, components=["unet"])  # the unet part at 0.5, fused; the text encoder part stays active
    assert holds(pipe, fused(base, (style, {"unet": 0.5, "text_encoder": 1.0})))
    pipe.unload_lora_weights()  # keeps what was fused: the unet part, for good; the text encoder part goes
    assert holds(pipe, fused(base, (style, {"unet": 0.5, "text_encoder": 0.0})))
    assert pipe.get_shira_adapters() == {} and pipe.shira_engine.targets == {}  # backups freed
    again = tiny_pipeline("sd")
    again.load_shira_weights(style, adapter_name="style")
    again.fuse_lora()
    again.unfuse_lora()  # the mark is taken back
    again.unload_lora_weights()
    assert_unchanged(again, base)


def test_merge_and_unload_keeps_the_active_styles_and_frees_everything():
    pipe = tiny_pipeline("sd")
    base = snapshot(pipe)
    a, b = random_adapter(pipe, 1), random_adapter(pipe, 2)
    pipe.load_shira_weights(a, adapter_name="a")
    pipe.load_shira_weights(b, adapter_name="b")
    pipe.set_shira_adapters(["a", "b"], [0.7, 0.4])
    pipe.merge_and_unload_shira()
    assert holds(pipe, fused(base, (a, 0.7), (b, 0.4)))
    assert pipe.get_shira_adapters() == {} and pipe.shira_engine.targets == {}
    pipe.load_shira_weights(a, adapter_name="a")  # on top of the merged weights, exactly reversible from there
    merged = fused(base, (a, 0.7), (b, 0.4))
    pipe.unload_shira_weights()
    assert holds(pipe, merged)


def test_shira_state_dict_reads_an_adapter_without_a_pipeline(tmp_path, monkeypatch):
    pipe = tiny_pipeline("sd")
    adapter = random_adapter(pipe, 1)
    adapter.save_pretrained(tmp_path / "style")
    for source, kwargs in ((tmp_path / "style", {}), (tmp_path / "style" / "shira_weights.safetensors", {}),
                           (tmp_path, {"subfolder": "style"})):
        read = ShiraStableDiffusionPipeline.shira_state_dict(source, **kwargs)
        assert isinstance(read, ShiraAdapter)
        assert all(torch.equal(read.state_dict()[k], v) for k, v in adapter.state_dict().items())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShiraLoadError, match="'me/not-here' is not a local file or folder"):
        ShiraStableDiffusionPipeline.shira_state_dict("me/not-here", local_files_only=True)
    with pytest.raises(TypeError, match="shira_state_dict\\(\\) got an unexpected keyword argument 'revison'"):
        ShiraStableDiffusionPipeline.shira_state_dict("me/not-here", revison="main")


def test_hub_ids_read_from_a_local_cache_offline(tmp_path, monkeypatch):
    # huggingface_hub's cache layout, as a download leaves it: the file under snapshots/<commit>, refs/main naming it
    pipe = tiny_pipeline("sd")
    base = snapshot(pipe)
    adapter = random_adapter(pipe, 1)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--style-shira"
    adapter.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    read = ShiraStableDiffusionPipeline.shira_state_dict("someone/style-shira", cache_dir=tmp_path / "cache")
    assert all(torch.equal(read.state_dict()[k], v) for k, v in adapter.state_dict().items())
    pipe.load_shira_weights("someone/style-shira", cache_dir=tmp_path / "cache", adapter_name="style")
    assert holds(pipe, fused(base, (adapter, 1.0)))
