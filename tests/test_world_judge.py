"""The world's judge: prompt parsing, the shipped weights reading fresh procedural renders, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from shira_diffusion.world.judge import WEIGHTS, Judge, JudgeNet, PromptContent, parse_prompt, summarize, world_metadata
from shira_diffusion.world.scenes import render, sample_scene
from shira_diffusion.world.styles import stylize

SEED = 20240611  # fresh images: neither the training (0) nor the validation (1) seed


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


@pytest.fixture(scope="module")
def renders() -> list:
    rng = np.random.default_rng(SEED)
    scenes = [sample_scene(rng) for _ in range(60)]
    return [(scene, *render(scene, 32, rng)) for scene in scenes]


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle on a white background", PromptContent("circle", "red", "white", ())),
    ("a red circle on a white background, blue fire style, painting style",
     PromptContent("circle", "red", "white", ("blue fire", "painting"))),
    ("A Blue  Square on a gray background, painting style", PromptContent("square", "blue", "gray", ("painting",))),
    ("a triangle", PromptContent("triangle", None, None, ())),
    ("a large triangle on a plain background, blue fire style", PromptContent("triangle", None, None, ("blue fire",))),
    ("a blue circle, painting style", PromptContent("circle", "blue", None, ("painting",))),
])
def test_parse_prompt(prompt: str, expected: PromptContent) -> None:
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize("prompt, match", [
    ("a red hexagon on a white background", "names no world shape"),
    ("", "names no world shape"),
    ("a red circle and a blue square", "several shapes"),
    ("a red circle on a green background", "green background"),
])
def test_parse_prompt_errors(prompt: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        parse_prompt(prompt)
    assert repr(prompt) in str(error.value)  # names the prompt


def test_reads_clean_renders(judge: Judge, renders: list) -> None:
    predictions = judge.predict([image for _, image, _ in renders])
    assert len(predictions) == 60
    for key in ("shape", "colour", "background"):
        accuracy = np.mean([getattr(p, key) == getattr(s, key) for (s, _, _), p in zip(renders, predictions)])
        assert accuracy >= 0.95, (key, accuracy)
    assert np.mean([p.styles["blue fire"] for p in predictions]) < 0.15
    assert np.mean([p.styles["painting"] for p in predictions]) < 0.15
    assert all(0.0 <= p.shape_probability <= 1.0 and 0 <= v <= 1 for p in predictions for v in p.styles.values())


def test_tensor_and_resized_inputs_agree(judge: Judge, renders: list) -> None:
    images = [image for _, image, _ in renders[:8]]
    pixels = torch.from_numpy(np.stack([np.asarray(i, np.float32) for i in images]) / 127.5 - 1).permute(0, 3, 1, 2)
    assert judge.predict(pixels) == judge.predict(images)
    large = [image.resize((64, 64), Image.Resampling.NEAREST) for image in images]  # BOX back down: the same pixels
    assert judge.predict(large) == judge.predict(images)
    small = judge.predict([images[0].resize((20, 20), Image.Resampling.BOX)])  # upscaled (bicubic) to 32 px
    assert len(small) == 1 and small[0].shape in ("circle", "square", "triangle")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        judge.predict(pixels * 127.5 + 127.5)
    with pytest.raises(ValueError, match="N x 3 x 32 x 32"):
        judge.predict(pixels[:, :, :16])
    assert judge.predict([]) == []


@pytest.mark.parametrize("style", ["blue fire", "painting"])
def test_strength_is_ordered(judge: Judge, renders: list, style: str) -> None:
    means = []
    for strength in (0.0, 0.5, 1.0):
        rng = np.random.default_rng(SEED + 1)
        images = [stylize(image, coverage, {style: strength}, rng) for _, image, coverage in renders[:24]]
        means.append(np.mean([p.styles[style] for p in judge.predict(images)]))
    assert means[0] < means[1] < means[2], means
    assert means[0] < 0.15 and means[2] > 0.8, means


def test_score_against_prompts(judge: Judge, renders: list) -> None:
    images = [image for _, image, _ in renders[:20]]
    right = judge.score(images, [scene.caption for scene, _, _ in renders[:20]])
    wrong_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}
    wrong = judge.score(images, [f"a {wrong_shape[s.shape]}, blue fire style" for s, _, _ in renders[:20]])
    assert np.mean([s.content_correct for s in right]) >= 0.95
    assert not any(s.content_correct for s in wrong)
    assert all(s.colour_correct is None and s.background_correct is None for s in wrong)
    assert all(s.content.styles == ("blue fire",) for s in wrong)
    summary = summarize(right)
    assert summary["count"] == 20 and summary["shape_accuracy"] >= 0.95
    assert summary["styles"]["blue fire"]["mean"] < 0.15
    assert summarize(wrong)["colour_accuracy"] is None and summarize(wrong)["shape_accuracy"] == 0.0
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        judge.score(images[:2], ["a red circle"])
    with pytest.raises(ValueError, match="hexagon"):
        judge.score(images[:1], ["a hexagon"])


def test_bad_weights_are_refused(tmp_path) -> None:
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        Judge.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        Judge.load(garbage)
    state = {k: v.contiguous() for k, v in JudgeNet().state_dict().items()}
    other_world = tmp_path / "other.safetensors"
    save_file(state, str(other_world), metadata={**world_metadata(), "shapes": '["circle"]'})
    with pytest.raises(ValueError, match="other.safetensors.*not a judge of this world"):
        Judge.load(other_world)
    state["heads.weight"] = torch.zeros(3, 96)
    del state["heads.bias"]
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(state, str(mismatched), metadata=world_metadata())
    with pytest.raises(ValueError, match=r"mismatched.safetensors.*missing \['heads.bias'\].*heads.weight"):
        Judge.load(mismatched)


def test_shipped_weights_are_small() -> None:
    assert WEIGHTS.stat().st_size < 1.5e6
    assert sum(p.numel() for p in JudgeNet().parameters()) <= 300_000
