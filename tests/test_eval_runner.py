"""run_evaluation: distinct fusion settings, guarded resume, re-scoring, pipeline restored, summary layout."""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from shira_diffusion.evaluation import Fusion, Prompt, resolve_adapter, run_evaluation, summarize_records, summary_markdown
from shira_diffusion.testing import tiny_pipeline

from .helpers import assert_unchanged, random_adapter, snapshot

PROMPTS = [Prompt("a fox")]
FAST = dict(seeds=[0], alphas=(1.0,), num_inference_steps=1, height=32, width=32, model_id="tiny")


class FakeScorer:
    """Stands in for HPSv2Scorer: the runner only needs version / model_name / checkpoint and score()."""

    version, model_name = "v2.1", "tiny-hps"

    def __init__(self, checkpoint, fail_on_call=None):
        self.checkpoint, self.fail_on_call, self.calls = checkpoint, fail_on_call, 0

    def score(self, images, prompts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("scorer failed on purpose")
        return [float(np.asarray(image, dtype=np.float32).mean()) for image in images]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    pipe = tiny_pipeline("sd")
    random_adapter(pipe, 0, components=("unet",), scale=2.0).save(folder / "a.safetensors")
    random_adapter(pipe, 1, components=("unet",), scale=2.0).save(folder / "b.safetensors")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    (folder / "ckpt1.bin").write_bytes(b"one checkpoint")
    (folder / "ckpt2.bin").write_bytes(b"another checkpoint")
    return folder


@pytest.fixture()
def pipe():
    pipe = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_fusions_of_the_same_adapters_with_other_weights_are_separate_settings(files, pipe, tmp_path):
    adapters = {"a": files / "a.safetensors", "b": files / "b.safetensors"}
    fusions = [Fusion.parse("a+b:0.9,0.1"), Fusion.parse("a+b:0.1,0.9"), Fusion.parse("a+b")]
    result = run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path, fusions=fusions, include_base=False, **FAST)
    by_label = {r["adapters"]: r for r in result.records}
    assert result.generated == 5 and list(by_label) == ["a", "b", "a+b@0.9,0.1", "a+b@0.1,0.9", "a+b"]
    assert by_label["a+b@0.9,0.1"]["weights"] == {"a": 0.9, "b": pytest.approx(0.1)}
    assert by_label["a+b@0.1,0.9"]["weights"] == {"a": pytest.approx(0.1), "b": 0.9}
    images = {label: np.asarray(Image.open(tmp_path / r["image"])) for label, r in by_label.items()}
    assert len({r["image"] for r in by_label.values()}) == 5
    assert not np.array_equal(images["a+b@0.9,0.1"], images["a+b@0.1,0.9"])
    with pytest.raises(ValueError, match="fusion a\\+b is given twice"):
        run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path / "dup", fusions=[Fusion.parse("a+b"), Fusion.parse("a+b:1,1")], **FAST)
    with pytest.raises(ValueError, match="--fusion 'a\\+b:x,y': weights must be numbers"):
        Fusion.parse("a+b:x,y")
    for bad in ("base", "a+b", "a@1"):
        with pytest.raises(ValueError, match=re.escape(f"adapter name '{bad}'")):
            run_evaluation(pipe, {bad: files / "a.safetensors"}, PROMPTS, out_dir=tmp_path / "bad", **FAST)
    assert not (tmp_path / "dup").exists() and not (tmp_path / "bad").exists()


def test_pipeline_is_left_as_found_after_success_and_after_a_failure(files, pipe, tmp_path):
    pipe.load_shira_weights(random_adapter(pipe, 5, components=("unet",)), alpha=0.5, adapter_name="users_own")
    before = snapshot(pipe)  # the user's adapter is active in these weights
    adapters = {"a": files / "a.safetensors", "b": files / "b.safetensors", "l": files / "lora"}  # a LoRA output folder
    run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path / "ok", fusions=[Fusion.parse("a+b:0.5,0.5")], **FAST)
    assert_unchanged(pipe, before)  # bit-exact, and no LoRA layers left (their names would differ)
    assert list(pipe.get_shira_adapters()) == ["users_own"] and pipe.get_active_shira_adapters() == ["users_own"]
    assert pipe.get_list_adapters() == {"unet": ["users_own"]}  # no LoRA adapter left
    again = run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path / "ok", **FAST)  # a second run on the same pipe
    assert again.generated == 0
    # fail while a SHiRA setting is active (2nd score call), then while the LoRA is active (4th: base, a, b, l)
    for fail_on_call in (2, 4):
        scorer = FakeScorer(files / "ckpt1.bin", fail_on_call=fail_on_call)
        with pytest.raises(RuntimeError, match="on purpose"):
            run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path / f"fail{fail_on_call}", scorer=scorer, **FAST)
        assert_unchanged(pipe, before)
        assert list(pipe.get_shira_adapters()) == ["users_own"] and pipe.get_list_adapters() == {"unet": ["users_own"]}
    pipe.disable_shira()
    disabled = snapshot(pipe)
    run_evaluation(pipe, {"a": files / "a.safetensors"}, PROMPTS, out_dir=tmp_path / "disabled", **FAST)
    assert_unchanged(pipe, disabled)
    assert pipe.get_active_shira_adapters() == [] and list(pipe.get_shira_adapters()) == ["users_own"]


def test_lora_settings_match_diffusers_set_adapters_at_each_alpha(files, pipe, tmp_path):
    result = run_evaluation(pipe, {"l": files / "lora"}, PROMPTS, out_dir=tmp_path, **{**FAST, "alphas": (1.0, 0.5)})
    reference = tiny_pipeline("sd")
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(files / "lora"), adapter_name="l")
    for record in result.records:
        if record["adapters"] == "l":
            reference.set_adapters(["l"], adapter_weights=[record["alpha"]])
            expected = reference("a fox", num_inference_steps=1, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
            assert np.array_equal(np.asarray(Image.open(tmp_path / record["image"])), np.asarray(expected))
    images = [np.asarray(Image.open(tmp_path / r["image"])) for r in result.records]
    assert not np.array_equal(images[1], images[2]) and not np.array_equal(images[0], images[1])


def test_resume_refuses_other_settings_and_overwrite_starts_over(files, pipe, tmp_path):
    adapters = {"a": files / "a.safetensors"}
    first = run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path, scorer=FakeScorer(files / "ckpt1.bin"), **FAST)
    assert first.generated == 2 and json.loads((tmp_path / "run_settings.json").read_text())["num_inference_steps"] == 1
    changes = [
        ({"num_inference_steps": 2}, "num_inference_steps: 1 before, 2 now"),
        ({"guidance_scale": 1.0}, "guidance_scale: 7.5 before, 1.0 now"),
        ({"model_id": "other"}, "model: 'tiny' before, 'other' now"),
        ({"height": 64, "width": 64}, "height: 32 before, 64 now"),
        ({"scorer": FakeScorer(files / "ckpt2.bin")}, "hps checkpoint: 'ckpt1.bin' before, 'ckpt2.bin' now"),
        ({"prompts": [Prompt("a koala")]}, "prompt 0: 'a fox' before, 'a koala' now"),
        ({"adapters": {"a": files / "b.safetensors"}}, "adapter a: the file changed"),
    ]
    for change, message in changes:
        kwargs = {**FAST, "adapters": adapters, "prompts": PROMPTS, "scorer": FakeScorer(files / "ckpt1.bin"), **change}
        with pytest.raises(ValueError, match="holds results made with other settings") as error:
            run_evaluation(pipe, out_dir=tmp_path, **kwargs)
        assert message in str(error.value) and "--overwrite" in str(error.value)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="scheduler timestep_spacing"):
        run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path, **FAST)
    more = run_evaluation(pipe, {**adapters, "b": files / "b.safetensors"}, PROMPTS, out_dir=tmp_path / "x", **FAST)
    assert more.generated == 3
    extended = run_evaluation(pipe, {**adapters, "b": files / "b.safetensors"}, PROMPTS, out_dir=tmp_path / "x", **{**FAST, "seeds": [0, 1]})
    assert extended.generated == 3 and len(extended.records) == 6  # new adapters and seeds extend a run
    narrowed = run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path / "x", **FAST)  # fewer adapters and seeds
    assert narrowed.generated == 0 and {(r["adapters"], r["seed"]) for r in narrowed.records} == {("base", 0), ("a", 0)}
    assert len((tmp_path / "x" / "records.jsonl").read_text().splitlines()) == 6  # the rest stays for later runs
    with pytest.raises(ValueError, match=r"prompt 0 \('a fox'\): concept None, seen None before, concept 'animals', seen None now"):
        run_evaluation(pipe, adapters, [Prompt("a fox", concept="animals")], out_dir=tmp_path / "x", **FAST)
    redone = run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path, overwrite=True, **{**FAST, "num_inference_steps": 2})
    assert redone.generated == 2 and {r["steps"] for r in redone.records} == {2}
    assert json.loads((tmp_path / "run_settings.json").read_text())["hps"] is None


def test_images_made_without_a_scorer_are_scored_by_a_later_run(files, pipe, tmp_path):
    adapters = {"a": files / "a.safetensors"}
    unscored = run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path, **{**FAST, "seeds": [0, 1]})
    assert unscored.generated == 4 and not any("score" in r for r in unscored.records)
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("No HPSv2 scores yet: 4 images") and "|" not in text
    scored = run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path, scorer=FakeScorer(files / "ckpt1.bin"), **{**FAST, "seeds": [0, 1]})
    assert scored.generated == 0 and scored.scored == 4 and all(isinstance(r["score"], float) for r in scored.records)
    assert (tmp_path / "score_vs_alpha.png").is_file() and "| a | " in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "run_settings.json").read_text())["hps"]["checkpoint"] == "ckpt1.bin"


def test_summary_keeps_the_base_and_lists_settings_in_run_order(files, pipe, tmp_path):
    base_only = [{"adapters": "base", "alpha": 0.0, "score": 20.0}, {"adapters": "base", "alpha": 0.0, "score": 22.0}]
    text = summary_markdown(base_only, summarize_records(base_only))
    assert "| adapters | score |" in text and "| base | 21.0 ± 1.4 |" in text
    adapters = {"b": files / "b.safetensors", "a": files / "a.safetensors"}
    result = run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path, scorer=FakeScorer(files / "ckpt1.bin"),
                            fusions=[Fusion.parse("b+a:0.5,1")], **{**FAST, "alphas": (0.5, 1.0)})
    assert [row["adapters"] for row in result.summary][:4] == ["base", "b", "a", "b+a@0.5,1"]
    assert [(r["adapters"], r["alpha"]) for r in result.records][:5] == [("base", 0.0), ("b", 0.5), ("a", 0.5), ("b+a@0.5,1", 0.5), ("b", 1.0)]
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert lines[2] == "| adapters | α=1 | α=0.5 |" and lines[4].startswith("| base | ") and lines[5].startswith("| b | ")


def test_bad_adapter_paths_and_records_name_the_file(files, pipe, tmp_path):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter x: .*corrupt.safetensors: not a readable .safetensors file"):
        resolve_adapter("x", tmp_path / "corrupt.safetensors")
    with pytest.raises(ValueError, match="adapter x: .*empty is a folder with no .safetensors files"):
        resolve_adapter("x", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="adapter x: .*nope: no such file or folder"):
        resolve_adapter("x", tmp_path / "nope")
    assert resolve_adapter("l", files / "lora") == (files / "lora" / "pytorch_lora_weights.safetensors", "lora")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "records.jsonl").write_text('{"key": "base|0|0|0"\n')
    with pytest.raises(ValueError, match=r"out/records.jsonl line 1: not a record"):
        run_evaluation(pipe, {}, PROMPTS, out_dir=tmp_path / "out", **FAST)
    (tmp_path / "out" / "records.jsonl").write_text('{"key": "base|0|0|0"}\n')
    with pytest.raises(ValueError, match="has no run_settings.json next to it"):
        run_evaluation(pipe, {}, PROMPTS, out_dir=tmp_path / "out", **FAST)


def _find_tile(grid: np.ndarray, tile: np.ndarray) -> tuple[int, int] | None:
    """(x, y) of an exact copy of `tile` in `grid`, or None."""
    h, w = tile.shape[:2]
    for y, x in zip(*np.nonzero(np.all(grid[: grid.shape[0] - h + 1, : grid.shape[1] - w + 1] == tile[0, 0], axis=-1))):
        if np.array_equal(grid[y : y + h, x : x + w], tile):
            return int(x), int(y)
    return None


def test_grids_stay_under_pils_pixel_limit_and_are_labelled(files, pipe, tmp_path, monkeypatch):
    import warnings

    limit = 20_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # small, so that a tiny run needs splitting
    adapters = {"a": files / "a.safetensors", "b": files / "b.safetensors"}
    seeds = [0, 1, 2, 3]
    result = run_evaluation(pipe, adapters, PROMPTS, out_dir=tmp_path, fusions=[Fusion.parse("a+b:0.7,0.5")],
                            **{**FAST, "seeds": seeds, "alphas": (1.0, 0.5)})
    rows = 1 + 2 * 3  # base + per alpha: a, b, a+b
    assert len(result.records) == rows * len(seeds) and rows * 32 * len(seeds) * 32 > limit  # one unlabelled grid would not fit
    grids = sorted((tmp_path / "grids").iterdir())
    assert len(grids) > 1 and all(re.fullmatch(r"prompt000-part\d+of\d+\.png", g.name) for g in grids)
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a grid past the limit fails here
        arrays = []
        for grid in grids:
            with Image.open(grid) as image:
                image.load()
                assert image.width * image.height <= limit
                arrays.append(np.asarray(image.convert("RGB")))
    for record in result.records:
        tile = np.asarray(Image.open(tmp_path / record["image"]).convert("RGB"))
        found[record["key"]] = [(n, spot) for n, grid in enumerate(arrays) if (spot := _find_tile(grid, tile)) is not None]
    assert all(found.values()), [k for k, v in found.items() if not v]  # every image is in a grid
    for number, grid in enumerate(arrays):
        spots = [spot for places in found.values() for n, spot in places if n == number]
        left, top = min(x for x, _ in spots), min(y for _, y in spots)
        assert left > 20 and top > 10  # margins for the row and column labels
        assert (grid[:top] < 100).any() and (grid[top:, :left] < 100).any()  # dark label text in both margins


def test_grid_layout_at_paper_scale_fits_pils_default_limit():
    from shira_diffusion.evaluation import grid_layout
    from shira_diffusion.evaluation.runner import GRID_SEEDS
    from shira_diffusion.grids import DEFAULT_PIXEL_LIMIT as PIL_DEFAULT_MAX_PIXELS

    rows, seeds, margin = 13, 30, (260, 44)  # base + 3 alphas x (3 adapters + 1 fusion), 30 seeds, 512 px
    assert rows * 512 * seeds * 512 > PIL_DEFAULT_MAX_PIXELS  # the unlabelled single grid of before
    per_file, seeds_per_file, tile = grid_layout(rows, seeds, (512, 512), margin, PIL_DEFAULT_MAX_PIXELS)
    assert (margin[0] + seeds_per_file * tile[0]) * (margin[1] + per_file * tile[1]) <= PIL_DEFAULT_MAX_PIXELS
    assert seeds_per_file == GRID_SEEDS and per_file == rows and tile == (256, 256)
    per_file, seeds_per_file, tile = grid_layout(400, 30, (768, 512), margin, 2_000_000)  # many settings, a low limit
    assert (margin[0] + seeds_per_file * tile[0]) * (margin[1] + per_file * tile[1]) <= 2_000_000 and tile == (256, 171)


def test_known_third_party_noise_is_silenced_only_while_loading_and_one_bar_shows(files, pipe, tmp_path):
    import logging
    import warnings

    from diffusers import StableDiffusionPipeline

    from shira_diffusion.quiet import quiet_libraries

    second = tiny_pipeline("sd")
    second.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora2", unet_lora_layers=get_peft_model_state_dict(second.unet))
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' loggers do not propagate to the root logger
    pipe.set_progress_bar_config(desc="users own")
    seen_config = []
    original = type(pipe).__call__

    def recording(self, *args, **kwargs):
        seen_config.append(dict(self._progress_bar_config))
        return original(self, *args, **kwargs)

    type(pipe).__call__ = recording
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_evaluation(pipe, {"l1": files / "lora", "l2": tmp_path / "lora2"}, PROMPTS, out_dir=tmp_path / "out", **FAST)
            noisy = [str(w.message) for w in caught] + messages
            assert not [m for m in noisy if "No LoRA keys associated" in m or "Already found a `peft_config`" in m], noisy
            count = len(caught)
            with quiet_libraries():  # only those messages: others from the same sources still show
                logging.getLogger("diffusers.loaders.lora_base").warning("No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'")
                warnings.warn("a different peft warning", UserWarning)
            logging.getLogger("diffusers.loaders.peft").warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'")
            warnings.warn("Already found a `peft_config` attribute in the model.", UserWarning)  # restored after the block
            after = [str(w.message) for w in caught[count:]]
    finally:
        type(pipe).__call__ = original
        logging.getLogger("diffusers").removeHandler(handler)
    assert "prefix='unet'" in messages[-2] and "prefix='text_encoder'" in messages[-1]
    assert after == ["a different peft warning", "Already found a `peft_config` attribute in the model."]
    assert seen_config and all(config == {"desc": "users own", "disable": True} for config in seen_config)  # one bar: the runner's
    assert pipe._progress_bar_config == {"desc": "users own"}  # the user's configuration is back
