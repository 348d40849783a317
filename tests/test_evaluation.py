"""HPSv2 scorer (tiny open_clip config, HPS checkpoint layout) and the evaluation runner, offline."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from shira_diffusion.cli import main
from shira_diffusion.evaluation import (Fusion, HPSv2Scorer, MissingExtraError, Prompt, load_prompts, preprocess, resolve_version, run_evaluation,
                                        search_dirs, summarize_records, version_of_file)
from shira_diffusion.testing import tiny_pipeline

from .helpers import random_adapter

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights for a registered tiny open_clip config, saved like HPS_v2.1_compressed.pt."""
    import open_clip

    folder = tmp_path_factory.mktemp("hps")
    (folder / "tiny-hps.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(str(folder / "tiny-hps.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    return folder / "HPS_v2.1_compressed.pt"


@pytest.fixture(scope="module")
def scorer(checkpoint):
    return HPSv2Scorer(checkpoint, model_name="tiny-hps", batch_size=4)


def test_preprocessing_matches_a_hand_computed_reference():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (37, 61, 4), dtype=np.uint8), "RGBA")
    expected = torch.from_numpy(np.asarray(rgba.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    scale = 224 / 61
    size = (round(37 * scale), 224)  # longest side (width) to 224
    expected = F.interpolate(expected[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    top = (224 - size[0]) // 2
    padded = torch.zeros(3, 224, 224)
    padded[:, top : top + size[0], :] = expected  # black letterbox bars above and below
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    padded = (padded - mean[:, None, None]) / std[:, None, None]
    ours = preprocess(rgba)
    assert ours.shape == (3, 224, 224)
    assert torch.allclose(ours, padded, atol=1e-5)
    assert torch.allclose(ours[:, 0, 0], -mean / std)  # the bars are zero pixels, normalised


def test_scores_are_100_cosine_and_independent_of_batch_size(checkpoint, scorer):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(5)]
    prompts = [f"a picture number {i}" for i in range(5)]
    batched = scorer.score(images, prompts)
    one_at_a_time = HPSv2Scorer(checkpoint, model_name="tiny-hps", batch_size=1).score(images, prompts)
    assert np.allclose(batched, one_at_a_time, atol=1e-4)
    with torch.no_grad():
        image_features = scorer.model.encode_image(preprocess(images[0])[None])
        text_features = scorer.model.encode_text(scorer.tokenizer([prompts[0]]))
    cosine = F.cosine_similarity(image_features, text_features).item()
    assert batched[0] == pytest.approx(100 * cosine, abs=1e-3)
    assert all(-100 <= s <= 100 for s in batched)
    assert scorer.score(images[:2], "one prompt for all")[0] != batched[0]
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        scorer.score(images[:2], ["a", "b", "c"])


@pytest.fixture()
def no_hub(monkeypatch, tmp_path):
    """HOME and HPS_ROOT in tmp_path; hf_hub_download refuses (and counts its calls)."""
    import huggingface_hub

    calls = []

    def refuse(repo, filename, **kwargs):
        calls.append((repo, filename))
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"{filename} is not cached")

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "root"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    return calls


def test_missing_checkpoint_names_the_folders_the_hf_command_and_the_flag(no_hub, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        HPSv2Scorer(model_name="tiny-hps")
    message = str(error.value)
    for part in ("HPS_v2.1_compressed.pt not found", f"$HPS_ROOT ({tmp_path / 'root'})", f"~/.cache/hpsv2 ({tmp_path / 'home' / '.cache' / 'hpsv2'})",
                 "`hf download xswu/HPSv2 HPS_v2.1_compressed.pt`", "--hps_checkpoint PATH"):
        assert part in message, part
    assert "huggingface-cli" not in message and no_hub == [("xswu/HPSv2", "HPS_v2.1_compressed.pt")]
    monkeypatch.delenv("HPS_ROOT")
    with pytest.raises(FileNotFoundError, match=r"\$HPS_ROOT \(not set\).*`hf download xswu/HPSv2 HPS_v2_compressed.pt`"):
        HPSv2Scorer(version="v2.0", model_name="tiny-hps")
    assert search_dirs() == [tmp_path / "home" / ".cache" / "hpsv2"]
    with pytest.raises(FileNotFoundError, match="nope.pt: no such HPSv2 checkpoint"):
        HPSv2Scorer(tmp_path / "nope.pt")


def test_official_folders_are_searched_before_the_hub(checkpoint, no_hub, monkeypatch, tmp_path):
    import huggingface_hub

    home_copy = tmp_path / "home" / ".cache" / "hpsv2" / "HPS_v2.1_compressed.pt"
    home_copy.parent.mkdir(parents=True)
    shutil.copy(checkpoint, home_copy)
    assert HPSv2Scorer(model_name="tiny-hps").checkpoint == str(home_copy)
    root_copy = tmp_path / "root" / "HPS_v2.1_compressed.pt"
    root_copy.parent.mkdir()
    shutil.copy(checkpoint, root_copy)
    assert HPSv2Scorer(model_name="tiny-hps").checkpoint == str(root_copy)  # $HPS_ROOT first, as the official package
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "root" / "HPS_v2_compressed.safetensors")
    v20 = HPSv2Scorer(version="v2.0", model_name="tiny-hps")
    assert v20.checkpoint == str(tmp_path / "root" / "HPS_v2_compressed.safetensors") and v20.version == "v2.0"
    assert no_hub == []  # found locally: the Hub was never asked
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **kw: str(checkpoint))  # the Hub cache
    root_copy.unlink()
    home_copy.unlink()
    assert HPSv2Scorer(model_name="tiny-hps").checkpoint == str(checkpoint)


def test_version_comes_from_official_file_names_and_a_contradiction_is_an_error(checkpoint, tmp_path):
    assert [version_of_file(n) for n in ("a/HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt", "HPS_v2_compressed.safetensors",
                                         "HPS_v2.1_compressed.safetensors", "hps.pt", "HPS_v2.pt")] == ["v2.0", "v2.1", "v2.0", "v2.1", None, None]
    v20 = tmp_path / "HPS_v2_compressed.pt"
    shutil.copy(checkpoint, v20)
    scorer = HPSv2Scorer(v20, model_name="tiny-hps")
    assert (scorer.version, scorer.version_source, scorer.version_note) == ("v2.0", "file name", None)
    assert HPSv2Scorer(v20, version="v2.0", model_name="tiny-hps").version_source == "given"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "HPS_v2_compressed.pt").write_bytes(b"not even a checkpoint")  # refused before it is read
    with pytest.raises(ValueError, match=r"HPS_v2_compressed.pt: the official HPS v2.0 checkpoint .* but version v2.1 was asked for \(--hps_version\)"):
        HPSv2Scorer(tmp_path / "junk" / "HPS_v2_compressed.pt", version="v2.1", model_name="tiny-hps")
    with pytest.raises(ValueError, match=r"must be one of \['v2.0', 'v2.1'\].*got 'v2'"):
        resolve_version(None, "v2")
    unofficial = tmp_path / "my-hps.pt"
    shutil.copy(checkpoint, unofficial)
    guessed = HPSv2Scorer(unofficial, model_name="tiny-hps")
    assert (guessed.version, guessed.version_source) == ("v2.1", "assumed")
    assert "v2.1 assumed: my-hps.pt is not an official file name" in guessed.version_note and "--hps_version" in guessed.version_note
    stated = HPSv2Scorer(unofficial, version="v2.0", model_name="tiny-hps")
    assert (stated.version, stated.version_source, stated.version_note) == ("v2.0", "given", None)
    assert resolve_version(None, None) == ("v2.1", "default")


def test_missing_open_clip_is_a_user_error_naming_the_extra(monkeypatch, checkpoint):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now fails, as without the extra
    with pytest.raises(MissingExtraError, match=r'HPSv2 scoring needs the eval extra .*pip install "shira-diffusion\[eval\]"') as error:
        HPSv2Scorer(checkpoint, model_name="tiny-hps")
    assert isinstance(error.value, ValueError) and isinstance(error.value, ImportError)  # the CLI reports ValueErrors


def test_score_takes_an_image_a_path_or_a_list_of_both(scorer, tmp_path):
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (48, 40 + 9 * i, 3), dtype=np.uint8)) for i in range(3)]
    images[0].save(tmp_path / "zero.png")
    images[1].save(tmp_path / "one.png")
    reference = scorer.score(images, "a fox")
    single = scorer.score(images[0], "a fox")
    assert isinstance(single, list) and single == pytest.approx(reference[:1], abs=1e-5)
    assert scorer.score(str(tmp_path / "zero.png"), "a fox") == pytest.approx(reference[:1], abs=1e-5)
    assert scorer.score(tmp_path / "one.png", ["a fox"]) == pytest.approx(reference[1:2], abs=1e-5)
    mixed = scorer.score([str(tmp_path / "zero.png"), tmp_path / "one.png", images[2]], "a fox")
    assert mixed == pytest.approx(reference, abs=1e-5)
    per_image = scorer.score([tmp_path / "zero.png", images[1]], ["a fox", "a koala"])
    assert per_image[0] == pytest.approx(reference[0], abs=1e-5) and per_image[1] != pytest.approx(reference[1], abs=1e-5)
    assert scorer.score([], "a fox") == []
    with pytest.raises(FileNotFoundError, match="missing.png"):
        scorer.score([images[0], tmp_path / "missing.png"], "a fox")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(OSError, match="text.png"):
        scorer.score(tmp_path / "text.png", "a fox")
    with pytest.raises(TypeError, match="image 1: expected a PIL image or a file path, got int"):
        scorer.score([images[0], 3], "a fox")
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        scorer.score(images[0], ["a", "b"])


class _Payload:
    """Unpickling this runs code: a checkpoint holding it must be refused, not loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoints_that_are_not_tensors_only_or_not_clip_are_refused_clearly(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    marker = tmp_path / "code-ran"
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "payload.pt")
    with pytest.raises(ValueError, match=r"payload\.pt: not a tensors-only checkpoint, refusing to unpickle"):
        HPSv2Scorer(tmp_path / "payload.pt", model_name="tiny-hps")
    assert not marker.exists()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a readable \.safetensors checkpoint"):
        HPSv2Scorer(tmp_path / "junk.safetensors", model_name="tiny-hps")
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-clip'"):
        HPSv2Scorer(checkpoint, model_name="no-such-clip")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "hps.safetensors")  # the accepted alternative
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    assert HPSv2Scorer(tmp_path / "hps.safetensors", model_name="tiny-hps").score([image], "red") == pytest.approx(
        HPSv2Scorer(checkpoint, model_name="tiny-hps").score([image], "red"), abs=1e-4)
    assert set(load_file(tmp_path / "hps.safetensors")) == set(state)


def test_summary_table_on_fixed_scores():
    records = [
        {"adapters": "base", "alpha": 0.0, "score": 20.0},
        {"adapters": "base", "alpha": 0.0, "score": 22.0},
        {"adapters": "a", "alpha": 1.0, "score": 30.0},
        {"adapters": "a", "alpha": 1.0, "score": 34.0},
        {"adapters": "a", "alpha": 1.0, "score": 32.0},
        {"adapters": "a", "alpha": 0.5, "score": 25.0},
    ]
    summary = {(r["adapters"], r["alpha"]): r for r in summarize_records(records)}
    assert summary[("a", 1.0)]["mean"] == 32.0 and summary[("a", 1.0)]["std"] == pytest.approx(2.0)
    assert summary[("base", 0.0)]["mean"] == 21.0 and summary[("a", 0.5)]["n"] == 1


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na fox\n\n  a koala  \n")
    assert load_prompts(tmp_path / "p.txt") == [Prompt("a fox"), Prompt("a koala")]
    (tmp_path / "p.json").write_text(json.dumps(["a lion", {"prompt": "a sword", "concept": "sword", "seen": False}]))
    assert load_prompts(tmp_path / "p.json")[1] == Prompt("a sword", "sword", False)
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(ValueError, match="entry 0 is neither"):
        load_prompts(tmp_path / "bad.json")


def test_runner_end_to_end_resumes_and_writes_every_report(tmp_path, scorer):
    pipe = tiny_pipeline("sd")
    random_adapter(pipe, 0, components=("unet",), scale=2.0).save(tmp_path / "a.safetensors")
    random_adapter(pipe, 1, components=("unet",), scale=2.0).save(tmp_path / "b.safetensors")
    lora_pipe = tiny_pipeline("sd")
    lora_pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(lora_pipe.unet))
    adapters = {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors", "l": tmp_path / "lora" / "pytorch_lora_weights.safetensors"}
    prompts = [Prompt("a fox"), Prompt("a koala")]
    calls = {"n": 0}
    original = type(pipe).__call__

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    type(pipe).__call__ = counting
    try:
        kwargs = dict(seeds=[0, 1], out_dir=tmp_path / "eval", scorer=scorer, alphas=(1.0, 0.5), fusions=[Fusion.parse("a+b:0.7,0.5")], num_inference_steps=2, model_id="tiny")
        result = run_evaluation(pipe, adapters, prompts, **kwargs)
        settings = 1 + 2 * (3 + 1)  # base + per alpha (3 adapters + 1 fusion)
        assert calls["n"] == result.generated == settings * 2 * 2 == len(result.records)
        again = run_evaluation(pipe, adapters, prompts, **kwargs)  # the same pipe: the first run left it as it was
        assert again.generated == 0 and calls["n"] == settings * 4 and len(again.records) == len(result.records)
    finally:
        type(pipe).__call__ = original
    by_key = {r["key"]: r for r in result.records}
    assert by_key["a+b@0.7,0.5|1|0|0"]["weights"] == {"a": 0.7, "b": 0.5} and by_key["a|0.5|1|1"]["weights"] == {"a": 0.5}
    base_image = np.asarray(Image.open(tmp_path / "eval" / by_key["base|0|0|0"]["image"]))
    for label in ("a", "l"):
        assert not np.array_equal(np.asarray(Image.open(tmp_path / "eval" / by_key[f"{label}|1|0|0"]["image"])), base_image)
    assert all(r["hps_version"] == "v2.1" and isinstance(r["score"], float) for r in result.records)
    table = (tmp_path / "eval" / "summary.md").read_text()
    assert "| a+b@0.7,0.5 |" in table and "α=0.5" in table and "±" in table
    for name in ("records.csv", "summary.csv", "score_vs_alpha.png", "grids/prompt000.png", "grids/prompt001.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    assert pipe.get_active_shira_adapters() == [] and pipe.get_shira_adapters() == {} and pipe.get_list_adapters() == {}


def test_eval_cli_generates_without_scoring_and_reports_bad_flags(tmp_path, capsys):
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("a fox\n")
    base = ["eval", "--pretrained_model_name_or_path", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.txt"), "--output_dir", str(tmp_path / "out"), "--num_inference_steps", "2"]
    assert main(base + ["--seeds", "0", "--no_score"]) == 0
    assert (tmp_path / "out" / "records.jsonl").is_file()
    assert (tmp_path / "out" / "grids" / "prompt000.png").is_file() and not (tmp_path / "out" / "score_vs_alpha.png").exists()
    assert "No HPSv2 scores yet: 1 images" in (tmp_path / "out" / "summary.md").read_text()
    assert main(base + ["--adapter", "nofile"]) == 2 and "expected NAME=FILE" in capsys.readouterr().err
    assert main(base + ["--fusion", "a"]) == 2 and "expected 'name1+name2" in capsys.readouterr().err
