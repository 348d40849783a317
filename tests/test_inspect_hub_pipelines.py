"""inspect (interference), the Hub round trip (offline), and the mixin on SD3 and Flux pipelines."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from shira_diffusion import ShiraAdapter, SparseDelta, add_shira_support
from shira_diffusion.cli import main
from shira_diffusion.inspection import interference, layer_interference
from shira_diffusion.testing import tiny_components, tiny_pipeline

from .helpers import assert_unchanged, random_adapter, snapshot


def one_layer(positions, values=None):
    positions = torch.tensor(positions)
    values = torch.ones(len(positions)) if values is None else torch.tensor(values)
    return ShiraAdapter({"unet": {"w.weight": SparseDelta((4, 4), positions, values)}})


def test_inspect_counts_shared_positions_and_interference(tmp_path, capsys):
    disjoint = interference(one_layer([0, 1, 2]), one_layer([5, 6, 7]))
    assert disjoint["shared_positions"] == 0 and disjoint["shared_fraction"] == 0.0
    overlapping = interference(one_layer([0, 1, 2, 9]), one_layer([1, 2, 3]))
    assert overlapping["shared_positions"] == 2 and overlapping["shared_fraction"] == pytest.approx(2 / 5)
    # Rows 0 and 1 of A1 meet rows 0 and 1 of A2: S1^T S2 is non-zero where their columns pair up.
    a = SparseDelta((2, 2), torch.tensor([0, 3]), torch.tensor([1.0, 2.0]))  # diag(1, 2)
    b = SparseDelta((2, 2), torch.tensor([1]), torch.tensor([3.0]))  # [[0, 3], [0, 0]]
    measures = layer_interference(a, b)
    assert measures["awom_frobenius"] == pytest.approx(3.0) and measures["awor"] == pytest.approx(0.75)
    orthogonal = layer_interference(SparseDelta((2, 2), torch.tensor([0]), torch.ones(1)), SparseDelta((2, 2), torch.tensor([3]), torch.ones(1)))
    assert orthogonal["awom_frobenius"] == 0.0 and orthogonal["awor"] == 1.0
    one_layer([0, 1, 2, 9]).save(tmp_path / "a.safetensors")
    one_layer([1, 2, 3]).save(tmp_path / "b.safetensors")
    assert main(["inspect", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["interference"]["shared_positions"] == 2 and report["adapters"][0]["parameters"] == 4
    assert report["adapters"][0]["bytes"] == (tmp_path / "a.safetensors").stat().st_size
    assert main(["inspect", str(tmp_path / "a.safetensors")]) == 0 and "bytes per parameter" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2


def make_hub_cache(cache_dir, repo_id, files):
    """huggingface_hub's cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot_dir = repo / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    for name, data in files.items():
        (snapshot_dir / name).write_bytes(data)


def test_hub_round_trip_offline(tmp_path, monkeypatch):
    pipe = tiny_pipeline("sd")
    before = snapshot(pipe)
    pipe.load_shira_weights(random_adapter(pipe, 0), adapter_name="style")
    fused = snapshot(pipe)
    folder = pipe.save_shira_weights(tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert "library_name: shira-diffusion" in card and "load_shira_weights" in card
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)
    make_hub_cache(tmp_path / "cache", "someone/style-shira", {"style.safetensors": (folder / "shira_weights.safetensors").read_bytes()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipe.load_shira_weights("someone/style-shira", weight_name="style.safetensors", cache_dir=str(tmp_path / "cache"))
    assert_unchanged(pipe, fused)
    pipe.unload_shira_weights()
    with pytest.raises(ValueError, match="'someone/other' is not a local file or folder, and fetching 'shira_weights.safetensors' from the Hub failed"):
        pipe.load_shira_weights("someone/other", cache_dir=str(tmp_path / "cache"))
    assert_unchanged(pipe, before)


def test_push_to_hub_uploads_the_adapter_and_card(tmp_path, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["adapter"] = ShiraAdapter.load(Path(folder_path) / "shira_weights.safetensors").num_parameters
            return "https://huggingface.co/me/style/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    pipe = tiny_pipeline("sd")
    adapter = random_adapter(pipe, 1)
    pipe.load_shira_weights(adapter, adapter_name="style")
    pipe.save_shira_weights(tmp_path / "out", push_to_hub=True, repo_id="me/style", token="t")
    assert calls == {"token": "t", "repo": ("me/style", None, True), "files": ["README.md", "shira_weights.safetensors"], "adapter": adapter.num_parameters}


@pytest.mark.parametrize("kind, components", [("sd3", ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")), ("flux", ("transformer", "text_encoder", "text_encoder_2"))])
def test_load_fuse_unload_is_exact_on_sd3_and_flux(kind, components):
    pipe = tiny_pipeline(kind)
    suffixes = ("to_q.weight", "to_k.weight", "add_q_proj.weight", "proj_mlp.weight", "q_proj.weight", "fc1.weight", "q.weight", "wi.weight", "ff.net.2.weight")
    before = snapshot(pipe)
    run = lambda: pipe("a fox", num_inference_steps=2, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images  # noqa: E731
    base = run()
    first = random_adapter(pipe, 0, components, suffixes=suffixes, scale=1.0)
    assert first.components == sorted(components)
    pipe.load_shira_weights(first, adapter_name="a")
    pipe.load_shira_weights(random_adapter(pipe, 1, components, suffixes=suffixes, scale=1.0), adapter_name="b")
    pipe.set_shira_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    assert not np.allclose(run(), base, atol=1e-4)
    pipe.unload_shira_weights()
    assert np.array_equal(run(), base)
    assert_unchanged(pipe, before)


def test_add_shira_support_on_a_plain_flux_pipeline():
    pipe = add_shira_support(FluxPipeline(**tiny_components("flux")))
    before = snapshot(pipe)
    pipe.load_shira_weights(random_adapter(pipe, 0, ("transformer",), suffixes=("to_q.weight",)))
    assert pipe.get_active_shira_adapters() == ["default_0"]
    pipe.unload_shira_weights()
    assert_unchanged(pipe, before)
