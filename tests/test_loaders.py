"""Pipeline mixin + scatter engine: load / switch / fuse / unload, exactness, bad input, integration."""

import random
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from shira_diffusion import (
    ShiraAdapter,
    ShiraFormatError,
    ShiraLoadError,
    ShiraStableDiffusionPipeline,
    SparseDelta,
    add_shira_support,
)
from shira_diffusion.testing import tiny_pipeline

from .helpers import assert_unchanged, random_adapter, snapshot


def generate(pipe, seed=0):
    return pipe("a red fox in the snow", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed)).images


@pytest.fixture(scope="module")
def sd():
    return tiny_pipeline("sd")


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "sd" in request.fixturenames:
        request.getfixturevalue("sd").unload_shira_weights()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_adapter_changes_images_and_unload_restores_them(kind):
    pipe = tiny_pipeline(kind)
    before, base_images = snapshot(pipe), generate(pipe)
    components = ("unet", "text_encoder", "text_encoder_2") if kind == "sdxl" else ("unet", "text_encoder")
    pipe.load_shira_weights(random_adapter(pipe, 0, components, scale=2.0), adapter_name="style")
    assert not np.allclose(generate(pipe), base_images, atol=1e-3)
    pipe.unload_shira_weights()
    assert np.array_equal(generate(pipe), base_images)
    assert_unchanged(pipe, before)


def test_fused_weight_is_base_plus_alpha_times_delta_and_overlaps_add(sd):
    name = next(n for n, _ in sd.unet.named_parameters() if n.endswith("attn1.to_q.weight"))
    weight = sd.unet.get_parameter(name)
    w0 = weight.detach().clone()
    shape = tuple(weight.shape)
    a = ShiraAdapter({"unet": {name: SparseDelta(shape, torch.tensor([0, 3, 7]), torch.tensor([1.0, 2.0, 3.0]))}})
    b = ShiraAdapter({"unet": {name: SparseDelta(shape, torch.tensor([3, 9]), torch.tensor([10.0, 20.0]))}})
    sd.load_shira_weights(a, alpha=0.5, adapter_name="a")
    sd.load_shira_weights(b, alpha=2.0, adapter_name="b")  # the new adapter is the active one, as in diffusers
    expected = w0.clone().view(-1)
    expected[[3, 9]] += torch.tensor([20.0, 40.0])
    assert torch.equal(weight.detach().view(-1), expected) and sd.get_active_shira_adapters() == ["b"]
    sd.set_shira_adapters(["a", "b"], [0.5, 2.0])
    expected = w0.clone().view(-1)
    expected[[0, 3, 7, 9]] += torch.tensor([0.5, 1.0 + 20.0, 1.5, 40.0])
    assert torch.equal(weight.detach().view(-1), expected)
    sd.set_shira_adapters(["b"], adapter_weights=[1.0])
    expected = w0.clone().view(-1)
    expected[[3, 9]] += torch.tensor([10.0, 20.0])
    assert torch.equal(weight.detach().view(-1), expected)


def test_writes_happen_in_place(sd):
    parameters = {n: (p, p.data_ptr()) for n, p in sd.unet.named_parameters()}
    sd.load_shira_weights(random_adapter(sd, 1), adapter_name="a")
    sd.unload_shira_weights()
    for name, parameter in sd.unet.named_parameters():
        assert parameters[name][0] is parameter and parameter.data_ptr() == parameters[name][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_thousand_random_operations_then_unload_is_bit_exact(dtype):
    pipe = tiny_pipeline("sd", dtype=dtype)
    before = snapshot(pipe)
    pool = [random_adapter(pipe, seed, density=0.1, scale=3.0) for seed in range(5)]
    rng = random.Random(0)
    loaded: list[str] = []
    for step in range(1000):
        operation = rng.choice(["load", "unload", "switch", "fuse", "alpha", "disable", "enable", "hotswap"])
        if operation == "load" or not loaded:
            if len(loaded) < len(pool):
                name = f"a{step}"
                pipe.load_shira_weights(pool[step % len(pool)], alpha=rng.uniform(-2, 2), adapter_name=name)
                loaded.append(name)
        elif operation == "unload":
            pipe.unload_shira_weights(loaded.pop(rng.randrange(len(loaded))))
        elif operation == "switch":
            pipe.set_shira_adapters(rng.choice(loaded))
        elif operation == "hotswap":  # alone (one pass) when it is the only adapter, else beside the others
            pipe.load_shira_weights(pool[rng.randrange(len(pool))], alpha=rng.uniform(-2, 2), adapter_name=rng.choice(loaded), hotswap=True)
        elif operation == "fuse":
            names = rng.sample(loaded, rng.randint(0, len(loaded)))
            pipe.set_shira_adapters(names, adapter_weights=[rng.uniform(-1.5, 1.5) if rng.random() < 0.7 else  # or per component / block
                                                    {"unet": {"mid": rng.uniform(-1, 1), "up": rng.uniform(-1, 1)}, "text_encoder": rng.uniform(-1, 1)}
                                                    for _ in names])
        elif operation == "alpha":
            pipe.set_shira_adapters(pipe.get_active_shira_adapters() or loaded[:1], adapter_weights=rng.uniform(0, 2))
        elif operation == "disable":
            pipe.disable_shira()
        else:
            pipe.enable_shira()
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)
    assert pipe.shira_engine.targets == {}  # backup memory released


def test_set_adapters_getters_and_disable(sd):
    before = snapshot(sd)
    sd.load_shira_weights(random_adapter(sd, 1), alpha=0.7, adapter_name="a")
    sd.load_shira_weights(random_adapter(sd, 2, components=("unet",)), adapter_name="b")
    assert sd.get_active_shira_adapters() == ["b"]
    info = sd.get_shira_adapters()
    assert info["a"]["alpha"] == 0.7 and info["a"]["components"] == ["text_encoder", "unet"] and not info["a"]["active"]
    assert info["b"]["components"] == ["unet"] and info["b"]["parameters"] > 0
    sd.set_shira_adapters(["b", "a"], adapter_weights=[0.3, 0.6])
    assert sd.get_active_shira_adapters() == ["b", "a"] and sd.get_shira_adapters()["a"]["alpha"] == 0.6
    fused = snapshot(sd)
    sd.disable_shira()
    assert sd.get_active_shira_adapters() == []
    assert_unchanged(sd, before)
    sd.enable_shira()
    assert_unchanged(sd, fused)
    sd.set_shira_adapters([])
    assert_unchanged(sd, before)
    with pytest.raises(ShiraLoadError, match="unknown adapter 'nope'"):
        sd.set_shira_adapters(["nope"])
    with pytest.raises(ShiraLoadError, match="2 adapter names but 1 weights"):
        sd.set_shira_adapters(["a", "b"], adapter_weights=[1.0])


def test_per_component_weights_as_in_diffusers_set_adapters(sd):
    before = snapshot(sd)
    a, b = random_adapter(sd, 1), random_adapter(sd, 2, components=("unet",))
    sd.load_shira_weights(a, adapter_name="a")
    sd.load_shira_weights(b, adapter_name="b")
    unet_key = next(k for k in a.deltas["unet"] if k in b.deltas["unet"])
    text_key = next(iter(a.deltas["text_encoder"]))

    def expected(component, key, terms):  # W0 + sum alpha * S, accumulated in the engine's order
        flat = before[f"{component}.{key}"].clone().view(-1)
        for adapter, alpha in terms:
            delta = adapter.deltas[component][key]
            flat.index_add_(0, delta.positions, delta.deltas.float() * alpha)
        return flat

    def live(component, key):
        return getattr(sd, component).get_parameter(key).detach().view(-1)

    sd.set_shira_adapters(["a", "b"], adapter_weights=[{"unet": 0.5, "text_encoder": 0.25}, 2.0])
    assert torch.equal(live("unet", unet_key), expected("unet", unet_key, [(a, 0.5), (b, 2.0)]))
    assert torch.equal(live("text_encoder", text_key), expected("text_encoder", text_key, [(a, 0.25)]))
    assert sd.get_shira_adapters()["a"]["alpha"] == {"unet": 0.5, "text_encoder": 0.25}
    sd.set_shira_adapters("a", {"unet": 0.5})  # a component left out keeps strength 1, as in diffusers
    assert torch.equal(live("unet", unet_key), expected("unet", unet_key, [(a, 0.5)]))
    assert torch.equal(live("text_encoder", text_key), expected("text_encoder", text_key, [(a, 1.0)]))
    fused = snapshot(sd)
    for weights, message in (({"unet": 1.0, "unet_2": 0.5}, "weight for component 'unet_2', which this pipeline does not have"),
                             ({"unet": float("nan")}, r"adapter a\['unet'\]: weight must be a finite number, got nan"),
                             ("0.5", "adapter a: weight must be a finite number, got '0.5'")):
        with pytest.raises(ShiraLoadError, match=message):
            sd.set_shira_adapters(["a"], adapter_weights=weights)
        assert_unchanged(sd, fused)
    with pytest.warns(UserWarning, match="adapter 'b' does not touch 'text_encoder'"):
        sd.set_shira_adapters(["b"], adapter_weights={"text_encoder": 0.3})
    sd.set_shira_adapters(["a"], adapter_weights={"unet": 0.5, "text_encoder": 0.25})
    fused = snapshot(sd)
    sd.unload_shira_weights()
    sd.load_shira_weights(a, alpha={"unet": 0.5, "text_encoder": 0.25}, adapter_name="a")  # the same forms at load time
    assert_unchanged(sd, fused)
    with pytest.raises(ShiraLoadError, match="up.block_1 has no attention layers"):
        sd.load_shira_weights(b, alpha={"unet": {"up": {"block_1": 1.0}}}, adapter_name="b2")
    assert_unchanged(sd, fused)
    assert sd.get_active_shira_adapters() == ["a"] and "b2" not in sd.get_shira_adapters()
    with pytest.raises(ShiraLoadError, match="weight must be a finite number, got inf"):
        sd.load_shira_weights(random_adapter(sd, 3), alpha=float("inf"), adapter_name="c")
    sd.unload_shira_weights()
    assert_unchanged(sd, before)


def test_unet_block_scales_and_module_prefix_scales(sd):
    before = snapshot(sd)
    adapter = random_adapter(sd, 4)
    sd.load_shira_weights(adapter, adapter_name="a")
    layer0 = next(iter(adapter.deltas["text_encoder"])).split("layers.")[0] + "layers.0"  # transformers 4 / 5 naming
    # diffusers' block form (InstantStyle-like: style in one up attention), and a prefix for the text encoder
    sd.set_shira_adapters("a", {"unet": {"down": 0.0, "mid": 0.5, "up": {"block_0": [0.0, 1.0]}}, "text_encoder": {layer0: 0.25}})

    def expected_alpha(component, key):
        rules = {"unet": [("down_blocks.1.attentions.0.", 0.0), ("mid_block.attentions.0.", 0.5), ("up_blocks.0.attentions.0.", 0.0),
                          ("up_blocks.0.attentions.1.", 1.0)], "text_encoder": [(layer0 + ".", 0.25)]}
        return next((alpha for prefix, alpha in rules[component] if key.startswith(prefix)), 1.0)  # e.g. resnets: 1.0

    seen = set()
    for component, key, delta in adapter.items():
        alpha = expected_alpha(component, key)
        seen.add((component, alpha))
        flat = before[f"{component}.{key}"].clone().view(-1)
        flat.index_add_(0, delta.positions, delta.deltas.float() * alpha)
        assert torch.equal(getattr(sd, component).get_parameter(key).detach().view(-1), flat), key
    assert {("unet", 0.0), ("unet", 0.5), ("unet", 1.0), ("text_encoder", 0.25), ("text_encoder", 1.0)} <= seen
    fused = snapshot(sd)
    for weights, message in (({"unet": {"up": {"block_1": 1.0}}}, r"unet: up.block_1 has no attention layers \(blocks with them: \['block_0'\]\)"),
                             ({"unet": {"down": 1.0, "side": 2.0}}, "unknown block key 'side'"),
                             ({"unet": {"up": {"block_0": [1.0, 2.0, 3.0]}}}, "Expected 2 scales for up.block_0, got 3"),
                             ({"text_encoder": {"mid": 1.0}}, "block scales apply to a UNet, not to CLIPTextModel"),
                             ({"unet": {"mid_block.attention": 1.0}}, "weight for unet.mid_block.attention, which is no module")):
        with pytest.raises(ShiraLoadError, match=message):
            sd.set_shira_adapters("a", weights)
        assert_unchanged(sd, fused)
    sd.unload_shira_weights()
    assert_unchanged(sd, before)


def test_default_names_alpha_and_sources(sd, tmp_path):
    adapter = random_adapter(sd, 3)
    adapter.default_alpha = 0.25
    path = adapter.save(tmp_path / "shira_weights.safetensors")
    assert sd.load_shira_weights(path) == "default_0"
    assert sd.get_shira_adapters()["default_0"]["alpha"] == 0.25
    file_state = snapshot(sd)
    sd.unload_shira_weights()
    assert sd.load_shira_weights(tmp_path, alpha=0.25) == "default_0"  # a folder with shira_weights.safetensors
    assert_unchanged(sd, file_state)
    sd.unload_shira_weights()
    sd.load_shira_weights(adapter.state_dict(), alpha=0.25)  # shapes come from the model
    assert_unchanged(sd, file_state)


def bad_adapters(pipe):
    """(case, adapter) pairs: valid tensors first, the bad one last, so a partial write would show."""
    good = random_adapter(pipe, 7, components=("unet",))
    name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn1.to_k.weight"))
    shape = tuple(pipe.unet.get_parameter(name).shape)

    def with_bad(delta, component="unet", param=name):
        deltas = {c: dict(t) for c, t in good.deltas.items()}
        deltas.setdefault(component, {})[param] = delta
        return ShiraAdapter(deltas)

    size = shape[0] * shape[1]
    return [
        ("component 'vae2', which this pipeline does not have", with_bad(SparseDelta(shape, torch.tensor([1]), torch.ones(1)), component="vae2")),
        ("no such weight", with_bad(SparseDelta(shape, torch.tensor([1]), torch.ones(1)), param="up_blocks.9.nope.weight")),
        ("made for shape", with_bad(SparseDelta((shape[0] + 1, shape[1]), torch.tensor([1]), torch.ones(1)))),
        ("out of range", with_bad(SparseDelta(shape, torch.tensor([1, size]), torch.ones(2)))),
        ("negative position", with_bad(SparseDelta(shape, torch.tensor([-3, 1]), torch.ones(2)))),
        ("duplicate position 4", with_bad(SparseDelta(shape, torch.tensor([1, 4, 4]), torch.ones(3)))),
        ("not sorted", with_bad(SparseDelta(shape, torch.tensor([5, 2]), torch.ones(2)))),
        ("non-finite delta inf", with_bad(SparseDelta(shape, torch.tensor([1, 2]), torch.tensor([1.0, float("inf")])))),
        ("deltas must be floating point", with_bad(SparseDelta(shape, torch.tensor([1, 2]), torch.tensor([1, 2])))),
        ("positions must be integers", with_bad(SparseDelta(shape, torch.tensor([1.0, 2.0]), torch.ones(2)))),
    ]


def test_every_bad_adapter_raises_a_clear_error_and_changes_nothing(sd):
    sd.load_shira_weights(random_adapter(sd, 11), adapter_name="existing")
    before, adapters_before = snapshot(sd), sd.get_shira_adapters()
    for message, adapter in bad_adapters(sd):
        with pytest.raises((ShiraLoadError, ShiraFormatError), match=message):
            sd.load_shira_weights(adapter, adapter_name="new")
        assert_unchanged(sd, before)
        assert sd.get_shira_adapters() == adapters_before
    with pytest.raises(ShiraLoadError, match="adapter name 'existing' is already in use"):
        sd.load_shira_weights(random_adapter(sd, 12), adapter_name="existing")
    assert_unchanged(sd, before)


def test_bad_files_raise_and_change_nothing(sd, tmp_path):
    before = snapshot(sd)
    good = random_adapter(sd, 13).save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"{" * 64)
    pickled = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"x": torch.zeros(1)}, pickled)
    cases = [(truncated, "truncated.safetensors: not a readable"), (corrupt, "corrupt.safetensors: not a readable"), (pickled, "refusing to load a pickle")]
    for path, message in cases:
        with pytest.raises(ShiraFormatError, match=message):
            sd.load_shira_weights(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors: no such adapter file"):
        sd.load_shira_weights(tmp_path / "missing.safetensors")
    assert_unchanged(sd, before)
    assert sd.get_shira_adapters() == {}


def test_sdxl_adapter_into_sd_is_refused(sd):
    sdxl = tiny_pipeline("sdxl")
    before = snapshot(sd)
    with pytest.raises(ShiraLoadError, match="unet"):
        sd.load_shira_weights(random_adapter(sdxl, 0, components=("unet",)))
    with pytest.raises(ShiraLoadError, match="component 'text_encoder_2'"):
        sd.load_shira_weights(random_adapter(sdxl, 0, components=("text_encoder_2",)))
    assert_unchanged(sd, before)


def test_sdxl_adapter_over_three_components_fuses_and_unloads_exactly():
    pipe = tiny_pipeline("sdxl")
    before = snapshot(pipe)
    everywhere = random_adapter(pipe, 0, ("unet", "text_encoder", "text_encoder_2"))
    assert everywhere.components == ["text_encoder", "text_encoder_2", "unet"]
    pipe.load_shira_weights(everywhere, adapter_name="a")
    pipe.load_shira_weights(random_adapter(pipe, 1, ("unet", "text_encoder_2")), adapter_name="b")
    pipe.set_shira_adapters(["a", "b"], adapter_weights=[0.6, 0.4])
    for component in ("unet", "text_encoder", "text_encoder_2"):
        name = next(n for n in everywhere.deltas[component])
        assert not torch.equal(getattr(pipe, component).get_parameter(name), before[f"{component}.{name}"])
    pipe.unload_shira_weights(["a"])
    pipe.unload_shira_weights(["b"])
    assert_unchanged(pipe, before)


def test_mutations_are_serialised_by_a_lock(sd):
    sd.load_shira_weights(random_adapter(sd, 1), adapter_name="a")
    finished = threading.Event()

    def switch():
        sd.set_shira_adapters([])
        finished.set()

    with sd.shira_engine.lock:
        worker = threading.Thread(target=switch)
        worker.start()
        time.sleep(0.2)
        assert not finished.is_set()  # blocked while another mutation holds the lock
    worker.join(5)
    assert finished.is_set()


def test_from_pipe_shares_adapters_and_attach_and_save_pretrained(sd, tmp_path):
    before = snapshot(sd)
    sd.load_shira_weights(random_adapter(sd, 1), adapter_name="a")
    other = ShiraStableDiffusionPipeline.from_pipe(sd)
    assert other.get_shira_adapters().keys() == {"a"}
    other.unload_shira_weights()
    assert sd.get_shira_adapters() == {}
    assert_unchanged(sd, before)

    plain = StableDiffusionPipeline(**{k: v for k, v in sd.components.items()})
    assert add_shira_support(plain) is plain
    plain.load_shira_weights(random_adapter(plain, 2), adapter_name="x")
    plain.unload_shira_weights()
    assert_unchanged(plain, before)

    sd.save_pretrained(tmp_path / "pipe")
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")  # plain diffusers reads what we save
    assert type(reloaded) is StableDiffusionPipeline
    assert (tmp_path / "pipe" / "model_index.json").read_text().count('"StableDiffusionPipeline"') == 1


def test_pipelines_sharing_modules_share_one_engine(sd):
    # diffusers' own from_pipe (AutoPipeline*, plain classes) + add_shira_support: one engine for the shared
    # modules, or each pipeline would restore "its" original over the other's writes.
    from diffusers import StableDiffusionImg2ImgPipeline

    before = snapshot(sd)
    sd.load_shira_weights(random_adapter(sd, 1), adapter_name="a")
    img2img = add_shira_support(StableDiffusionImg2ImgPipeline.from_pipe(sd))
    assert img2img.get_shira_adapters().keys() == {"a"}
    img2img.load_shira_weights(random_adapter(sd, 2), adapter_name="b")
    assert sd.get_active_shira_adapters() == ["b"] and sd.get_shira_adapters().keys() == {"a", "b"}
    sd.unload_shira_weights()
    assert img2img.get_shira_adapters() == {}
    assert_unchanged(img2img, before)


def test_one_writer_per_module_and_no_registry_leak():
    import gc
    import weakref

    from shira_diffusion.testing import tiny_components

    first = tiny_pipeline("sd")
    before = snapshot(first)
    other = ShiraStableDiffusionPipeline(**{**tiny_components("sd", seed=5), "unet": first.unet})  # its own text encoder
    first.load_shira_weights(random_adapter(first, 1), adapter_name="a")
    with pytest.raises(ShiraLoadError, match="'unet' holds SHiRA adapters loaded through another pipeline \\(\\['a'\\]\\)"):
        other.load_shira_weights(random_adapter(first, 2, ("unet",)), adapter_name="b")
    no_text_encoder = ShiraStableDiffusionPipeline(**{**first.components, "text_encoder": None})  # joins first's engine
    with pytest.raises(ShiraLoadError, match="adapter targets component 'text_encoder', which this pipeline does not have"):
        no_text_encoder.load_shira_weights(random_adapter(first, 3, ("text_encoder",)))
    first.unload_shira_weights()
    other.load_shira_weights(random_adapter(first, 2, ("unet",)), adapter_name="b")  # the UNet is free again
    other.unload_shira_weights()
    assert_unchanged(first, before)

    unet = weakref.ref(first.unet)
    del first, other, no_text_encoder
    gc.collect()
    assert unet() is None  # the engine registry keeps no model alive


def test_component_wrapped_by_torch_compile_after_loading_keeps_working(sd):
    before = snapshot(sd)
    unet = sd.unet
    sd.load_shira_weights(random_adapter(sd, 1, components=("unet",)), adapter_name="a")
    written = {name: p.detach().clone() for name, p in unet.named_parameters()}
    try:
        sd.unet = torch.compile(unet, backend="eager")  # diffusers' documented pattern; compiles on first call
        sd.set_shira_adapters("a", 0.5)
        sd.set_shira_adapters("a", 1.0)
        assert all(torch.equal(p, written[name]) for name, p in unet.named_parameters())
        sd.unload_shira_weights()
    finally:
        sd.unet = unet
    assert_unchanged(sd, before)


def test_misspelled_arguments_repeated_names_and_empty_prefixes_are_refused(sd, tmp_path):
    before = snapshot(sd)
    path = random_adapter(sd, 1).save(tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="unexpected keyword argument 'adapter_nmae'"):
        sd.load_shira_weights(path, adapter_nmae="a")
    with pytest.raises(FileNotFoundError, match="sub: no such adapter file or folder"):
        sd.load_shira_weights(tmp_path, subfolder="sub")
    sd.load_shira_weights(path, adapter_name="a")
    with pytest.raises(ShiraLoadError, match=r"adapter names repeat: \['a', 'a'\]"):
        sd.set_shira_adapters(["a", "a"], [0.5, 0.9])
    with pytest.raises(ShiraLoadError, match="module prefix '' for 'unet' is not a module name"):
        sd.set_shira_adapters("a", {"unet": {"": 0.0}})
    assert sd.get_shira_adapters()["a"]["alpha"] == 1.0
    sd.unload_shira_weights()
    assert_unchanged(sd, before)


def test_diffusers_fuse_lora_between_shira_operations_is_kept(tmp_path):
    # fuse_lora / unfuse_lora write the same weights in place; the engine sees that its last write was changed,
    # takes the change into its backup, and neither erases the LoRA at SHiRA positions nor leaves it behind.
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = tiny_pipeline("sd")
    source.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(source.unet))
    shira = random_adapter(tiny_pipeline("sd"), 1, components=("unet",), suffixes=("to_q.weight",), scale=1.0)
    only_lora = tiny_pipeline("sd")
    only_lora.load_lora_weights(str(tmp_path), adapter_name="lora")
    only_lora.fuse_lora()
    lora_fused = {n: p.detach().clone() for n, p in only_lora.unet.named_parameters()}

    pipe = tiny_pipeline("sd")  # SHiRA loaded, then the LoRA fused over it, then a SHiRA switch and unload
    pipe.load_shira_weights(shira, adapter_name="s")
    pipe.load_lora_weights(str(tmp_path), adapter_name="lora")
    pipe.fuse_lora()
    pipe.set_shira_adapters("s", 0.5)
    for _, name, delta in shira.items():
        lora_only = only_lora.unet.get_parameter(name).detach().view(-1)[delta.positions]  # via PEFT's `weight` property
        moved = pipe.unet.get_parameter(name).detach().view(-1)[delta.positions] - lora_only
        assert torch.allclose(moved, 0.5 * delta.deltas, atol=1e-6)  # the LoRA is still there under the style
    pipe.unload_shira_weights()
    assert max(float((p - lora_fused[n]).abs().max()) for n, p in pipe.unet.named_parameters()) < 1e-6

    pipe = tiny_pipeline("sd")  # the LoRA fused first, unfused while SHiRA is loaded, then SHiRA unloaded
    before = snapshot(pipe)
    pipe.load_lora_weights(str(tmp_path), adapter_name="lora")
    pipe.fuse_lora()
    pipe.load_shira_weights(shira, adapter_name="s")
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    pipe.unload_shira_weights()
    after = snapshot(pipe)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-6  # fuse/unfuse rounding only


def test_layout_change_after_loading_is_refused_before_any_write(sd):
    before = snapshot(sd)
    sd.load_shira_weights(random_adapter(sd, 1, components=("unet",), suffixes=("conv1.weight",)), adapter_name="a")
    written = snapshot(sd)
    sd.unet.to(memory_format=torch.channels_last)
    try:
        for action in (lambda: sd.set_shira_adapters("a", 0.5), sd.disable_shira, sd.unload_shira_weights):
            with pytest.raises(ShiraLoadError, match=r"no longer contiguous .*torch\.contiguous_format"):
                action()
    finally:
        sd.unet.to(memory_format=torch.contiguous_format)
    assert_unchanged(sd, written)
    sd.unload_shira_weights()
    assert_unchanged(sd, before)


def test_writes_into_projections_the_model_no_longer_reads_are_refused(sd):
    # diffusers' fuse_qkv_projections() makes the attention read a fused copy of to_q / to_k / to_v: writes into
    # the originals would silently change nothing, so every verb refuses them (before any write) until unfused.
    before = snapshot(sd)
    sd.load_shira_weights(random_adapter(sd, 1, components=("unet",), suffixes=("to_k.weight", "ff.net.2.weight")), adapter_name="a")
    written = snapshot(sd)
    sd.fuse_qkv_projections(vae=False)
    try:
        for action in (lambda: sd.set_shira_adapters("a", 0.5), sd.disable_shira, sd.unload_shira_weights,
                       lambda: sd.load_shira_weights(random_adapter(sd, 2, components=("unet",), suffixes=("to_v.weight",)), adapter_name="b"),
                       lambda: sd.load_shira_weights(random_adapter(sd, 2, components=("unet",)), adapter_name="a", hotswap=True),
                       # weights not under the fused projections, but loading it would deactivate "a": refused too
                       lambda: sd.load_shira_weights(random_adapter(sd, 3, components=("unet",), suffixes=("ff.net.2.weight",)), adapter_name="ff")):
            with pytest.raises(ShiraLoadError, match=r"\.to_[qkv]\.weight: the model reads the fused unet\.\S+\.to_q?kv instead .*unfuse_qkv_projections\(\)"):
                action()
        assert list(sd.get_shira_adapters()) == ["a"]
    finally:
        sd.unfuse_qkv_projections(vae=False)
    assert_unchanged(sd, written, new_layers=True)
    sd.set_shira_adapters("a", 0.5)  # legacy attentions keep the stale fused copy but read the originals again
    sd.unload_shira_weights()
    assert_unchanged(sd, before, new_layers=True)


def test_fused_projections_of_newer_attention_classes_are_refused_too():
    pipe = tiny_pipeline("flux")
    adapter = random_adapter(pipe, 1, components=("transformer",), suffixes=("attn.to_q.weight", "attn.add_k_proj.weight"))
    before = snapshot(pipe)
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ShiraLoadError, match=r"attn\.(to_q|add_k_proj)\.weight: the model reads the fused transformer\..*attn\.to_(added_)?qkv"):
        pipe.load_shira_weights(adapter, adapter_name="a")
    assert_unchanged(pipe, before, new_layers=True)
    pipe.transformer.unfuse_qkv_projections()  # these delete the fused copies
    pipe.load_shira_weights(adapter, adapter_name="a")
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)


def test_forward_hooks_stay_and_see_the_written_weights(sd):
    module = next(m for n, m in sd.unet.named_modules() if n.endswith("attn1.to_q"))
    outputs = []
    handle = module.register_forward_hook(lambda _, args, output: outputs.append(output.detach().clone()))
    x = torch.randn(1, 3, module.in_features, generator=torch.Generator().manual_seed(0))
    try:
        module(x)
        sd.load_shira_weights(random_adapter(sd, 4, components=("unet",), suffixes=("attn1.to_q.weight",)), adapter_name="a")
        written = module.weight.detach().clone()
        module(x)
        sd.unload_shira_weights()
        module(x)
    finally:
        handle.remove()
    assert len(outputs) == 3 and torch.equal(outputs[1], torch.nn.functional.linear(x, written, module.bias))
    assert not torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_weights_left_on_the_meta_device_by_sequential_offload_are_refused():
    pipe = tiny_pipeline("sd")
    adapter = random_adapter(pipe, 0, components=("unet",))
    pipe.unet.to("meta")  # what sequential CPU offload leaves in the module between its forwards
    with pytest.raises(ShiraLoadError, match=r"weight is on the meta device \(sequential CPU offload is not supported\)"):
        pipe.load_shira_weights(adapter)
    assert not pipe.get_shira_adapters()


def test_tied_weights_are_one_target_whatever_name_an_adapter_uses():
    pipe = tiny_pipeline("flux")
    t5 = pipe.text_encoder_2  # T5: shared.weight is encoder.embed_tokens.weight
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    before = snapshot(pipe)
    shape, positions = tuple(t5.shared.weight.shape), torch.tensor([0, 1, 2, 3])
    original = t5.shared.weight.detach().view(-1)[:4].clone()
    by_first = ShiraAdapter({"text_encoder_2": {"shared.weight": SparseDelta(shape, positions, torch.ones(4))}})
    by_alias = ShiraAdapter({"text_encoder_2": {"encoder.embed_tokens.weight": SparseDelta(shape, positions, torch.full((4,), 10.0))}})
    pipe.load_shira_weights(by_first, adapter_name="a")
    pipe.load_shira_weights(by_alias, adapter_name="b")
    assert torch.equal(t5.shared.weight.detach().view(-1)[:4], original + 10)
    pipe.set_shira_adapters(["a", "b"])
    assert torch.equal(t5.shared.weight.detach().view(-1)[:4], original + 11)
    pipe.set_shira_adapters(["a", "b"], [0.0, 0.0])
    assert torch.equal(t5.shared.weight.detach().view(-1)[:4], original)
    pipe.unload_shira_weights(["b", "a"])
    assert_unchanged(pipe, before)

    pipe.load_shira_weights(by_alias, adapter_name="b", alpha={"text_encoder_2": {"encoder": 0.0}})  # the adapter's own name
    assert torch.equal(t5.shared.weight.detach().view(-1)[:4], original)
    pipe.unload_shira_weights()
    both = ShiraAdapter({"text_encoder_2": {**by_first.deltas["text_encoder_2"], **by_alias.deltas["text_encoder_2"]}})
    with pytest.raises(ShiraLoadError, match="are the same \\(tied\\) weight"):
        pipe.load_shira_weights(both)
    assert_unchanged(pipe, before)
    base = {name: tensor.clone() for name, tensor in t5.state_dict().items()}
    with torch.no_grad():
        t5.shared.weight.view(-1)[:4] += 0.5  # a fine-tune; state_dict() lists the tied tensor under both names
    tuned = ShiraAdapter.from_state_dicts(base, t5.state_dict(), component="text_encoder_2")
    assert [name for _, name, _ in tuned.items()] == ["shared.weight"]


def test_text_encoder_weights_are_found_with_or_without_the_text_model_prefix():
    # transformers 5 dropped `text_model.` from CLIPTextModel's names; CLIPTextModelWithProjection keeps it.
    pipe = tiny_pipeline("sdxl")
    before = snapshot(pipe)
    plain = random_adapter(pipe, 0, ("text_encoder", "text_encoder_2"))
    respelled = ShiraAdapter({c: {(n.removeprefix("text_model.") if n.startswith("text_model.") else f"text_model.{n}"): d
                                  for n, d in tensors.items()} for c, tensors in plain.deltas.items()})
    pipe.load_shira_weights(plain, adapter_name="plain")
    written = snapshot(pipe)
    pipe.unload_shira_weights()
    pipe.load_shira_weights(respelled, adapter_name="respelled")
    assert_unchanged(pipe, written)
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)


def test_compiled_unet_is_not_recompiled_by_switching(sd):
    # Writes are in place on the same storage: a compiled graph sees new values, with no guard failing.
    unet = sd.unet
    compiled = torch.compile(unet, backend="eager", fullgraph=False)
    sample = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    hidden = torch.randn(1, 4, unet.config.cross_attention_dim)
    base = compiled(sample, 10, hidden).sample
    a = random_adapter(sd, 1, components=("unet",), suffixes=("to_q.weight",), scale=3.0)
    b = random_adapter(sd, 2, components=("unet",), suffixes=("ff.net.2.weight", "conv1.weight"), scale=3.0)
    sd.load_shira_weights(a, adapter_name="a")
    sd.load_shira_weights(b, adapter_name="b")
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = []
        for names in (["a"], ["b"], ["a", "b"], []):
            sd.set_shira_adapters(names)
            outputs.append(compiled(sample, 10, hidden).sample)
        assert torch.equal(outputs[-1], base)
        assert not torch.allclose(outputs[0], base) and not torch.allclose(outputs[1], outputs[0])
    sd.set_shira_adapters(["b"])
    eager = unet(sample, 10, hidden).sample
    assert torch.allclose(outputs[1], eager, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_fp16_and_model_cpu_offload(offload):
    pipe = tiny_pipeline("sd", dtype=torch.float16)
    before = snapshot(pipe)
    if offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to("cuda")
    base_images = generate(pipe)
    pipe.load_shira_weights(random_adapter(pipe, 0, scale=2.0), adapter_name="a")
    assert not np.allclose(generate(pipe), base_images, atol=1e-3)
    pipe.unload_shira_weights()
    assert np.array_equal(generate(pipe), base_images)
    assert_unchanged(pipe, before)


def sequence_of_writes(device: str, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Loads, fusion, both hotswap paths and unloads on a pipeline on `device`; the weights after each step."""
    pipe = tiny_pipeline("sd", dtype=dtype).to(device)
    styles = [random_adapter(pipe, seed, scale=0.3) for seed in range(3)]
    pipe.load_shira_weights(styles[0], adapter_name="a")
    pipe.load_shira_weights(styles[1], adapter_name="b", alpha=0.7)
    states = [snapshot(pipe)]
    for step in (lambda: pipe.set_shira_adapters(["a", "b"], [0.6, -0.4]),
                 lambda: pipe.load_shira_weights(styles[2], adapter_name="a", hotswap=True),  # shares weights with b
                 lambda: pipe.unload_shira_weights("b"),
                 lambda: pipe.load_shira_weights(styles[1], adapter_name="a", hotswap=True, alpha=1.3),  # alone
                 lambda: pipe.unload_shira_weights()):
        step()
        states.append(snapshot(pipe))
    return states


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_writes_are_bit_identical_to_the_cpu(dtype):
    # Every write is gather, fp32 sums, one cast, scatter: IEEE operations that give the same bits on any device.
    on_gpu, on_cpu = sequence_of_writes("cuda", dtype), sequence_of_writes("cpu", dtype)
    for step, (gpu, cpu) in enumerate(zip(on_gpu, on_cpu)):
        differ = [key for key in cpu if not torch.equal(gpu[key], cpu[key])]
        assert not differ, (step, differ[:3])
    assert all(torch.equal(on_gpu[-1][key], value) for key, value in snapshot(tiny_pipeline("sd", dtype=dtype)).items())


def test_unload_after_the_pipeline_changed_dtype_restores_the_new_dtypes_originals():
    pipe = tiny_pipeline("sd")
    pipe.load_shira_weights(random_adapter(pipe, 0, ("unet",)), adapter_name="a")
    reference = tiny_pipeline("sd").to(torch.float16)  # the same base weights, cast without the adapter
    pipe.to(torch.float16)
    pipe.unload_shira_weights()
    after, expected = snapshot(pipe), snapshot(reference)
    assert all(torch.equal(after[key], expected[key]) for key in expected)
