"""The shapes world's renderer, styles, tokenizer and style datasets: ground truth and determinism."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shira_diffusion.data import DataSource, load_examples
from shira_diffusion.world import (
    BACKGROUNDS, COLOURS, HELDOUT, SHAPES, STYLE_SETS, STYLES, Scene, combinations, render, sample_scene, stylize,
    write_style_dataset,
)
from shira_diffusion.world.vocabulary import WORDS, build_tokenizer


def test_render_draws_the_named_colours_where_the_mask_says():
    scene = Scene("square", "red", "gray", 0.5, 0.5, 0.3)
    image, coverage = render(scene, 32)
    pixels = np.asarray(image)
    assert image.size == (32, 32) and coverage.shape == (32, 32)
    assert np.all(np.abs(pixels[coverage == 1] - COLOURS["red"]) <= 1)
    assert np.all(np.abs(pixels[coverage == 0] - COLOURS["gray"]) <= 1)
    assert 0.2 < coverage.mean() < 0.35  # (0.6 * 0.9)^2 of the image


def test_shapes_differ_in_coverage_and_outline():
    areas = {shape: render(Scene(shape, "blue", "white"), 32)[1].sum() for shape in SHAPES}
    assert areas["triangle"] < areas["circle"] < areas["square"]


def test_sampling_is_seeded_and_keeps_heldout_combinations_apart():
    first = [sample_scene(np.random.default_rng(5), "train") for _ in range(3)]
    again = [sample_scene(np.random.default_rng(5), "train") for _ in range(3)]
    assert first == again
    rng = np.random.default_rng(0)
    drawn = {sample_scene(rng, "train").combination for _ in range(2000)}
    assert drawn.isdisjoint(HELDOUT) and drawn == set(combinations("train"))
    assert set(combinations("heldout")) == set(HELDOUT)
    assert len(combinations("all")) == len(SHAPES) * (len(COLOURS) - 1) * len(BACKGROUNDS)


@pytest.mark.parametrize("bad", [dict(shape="star"), dict(colour="pink"), dict(background="red"), dict(colour="white", background="white")])
def test_bad_scenes_are_refused_with_the_reason(bad):
    values = dict(shape="circle", colour="red", background="gray") | bad
    with pytest.raises(ValueError, match="|".join(str(v) for v in bad.values())):
        Scene(**values)


def test_styles_blend_linearly_and_zero_changes_nothing():
    image, coverage = render(Scene("circle", "red", "black", 0.5, 0.6, 0.25), 32)
    plain = np.asarray(image, np.float32)
    assert np.array_equal(np.asarray(stylize(image, coverage, {}, np.random.default_rng(0))), np.asarray(image))
    for name in STYLES:
        full = np.asarray(stylize(image, coverage, {name: 1.0}, np.random.default_rng(1)), np.float32)
        half = np.asarray(stylize(image, coverage, {name: 0.5}, np.random.default_rng(1)), np.float32)
        assert np.abs(full - plain).mean() > 10, name  # a visible style
        assert np.allclose(half, (plain + full) / 2, atol=1.01), name
    with pytest.raises(ValueError, match="sepia"):
        stylize(image, coverage, {"sepia": 1.0}, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stylize(image, coverage, {"painting": 1.5}, np.random.default_rng(0))


def test_blue_fire_rises_above_the_object():
    image, coverage = render(Scene("square", "yellow", "black", 0.5, 0.65, 0.2), 32)
    fire = np.asarray(stylize(image, coverage, {"blue fire": 1.0}, np.random.default_rng(0)), np.float32)
    rows = np.nonzero(coverage.max(axis=1) > 0.5)[0]
    above, below = fire[max(0, rows[0] - 6):rows[0]], fire[rows[-1] + 2:]
    assert above[..., 2].mean() > 60 > below[..., 2].mean()  # blue over the object, dark ground beneath


def test_every_world_word_is_one_token(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    for word in WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    assert len(tokenizer("a red circle on a white background, blue fire style, painting style").input_ids) <= tokenizer.model_max_length
    assert tokenizer.tokenize("koala") == list("koal") + ["a</w>"]  # other words still tokenize


@pytest.mark.parametrize("style", list(STYLE_SETS))
def test_style_datasets_have_the_papers_sizes_and_load_in_the_trainer(tmp_path, style):
    folder = write_style_dataset(tmp_path / "set", style, seed=3)
    examples = load_examples(DataSource(train_data_dir=str(folder)))
    records = [(Path(examples.name(i)), examples.captions[i]) for i in range(len(examples))]
    recipe = STYLE_SETS[style]
    assert len(records) == len(recipe.concepts) * recipe.images_per_concept == {"blue fire": 54, "painting": 90}[style]
    assert all(caption.endswith(STYLES[style][0]) for _, caption in records)
    assert Image.open(records[0][0]).size == (32, 32)
    prompts = json.loads((folder / "validation_prompts.json").read_text())
    seen = {p["concept"] for p in prompts if p["seen"]}
    assert seen == {f"{colour} {shape}" for shape, colour in recipe.concepts}
    trained = {caption.split(" on ")[0].removeprefix("a ") for _, caption in records}
    assert all(p["concept"] not in trained for p in prompts if not p["seen"])
    again = write_style_dataset(tmp_path / "again", style, seed=3)
    assert (again / records[5][0].name).read_bytes() == records[5][0].read_bytes()


def test_style_sets_cover_every_style():
    assert set(STYLE_SETS) == set(STYLES)
