"""Model cards (huggingface_hub ModelCard), the grids the package writes, and quiet library loading."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from shira_diffusion.cards import hub_model_id
from shira_diffusion.grids import cap_pixels, image_grid, labelled_grid
from shira_diffusion.quiet import quiet_libraries
from shira_diffusion.testing import tiny_pipeline
from shira_diffusion.training import TrainingConfig, train

from .helpers import draw_style_folder, random_adapter

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory) -> Path:
    """The tiny SD pipeline as a Hub cache snapshot of 'hf-internal-testing/tiny-sd' whose own card says its licence."""
    folder = tmp_path_factory.mktemp("hub") / "models--hf-internal-testing--tiny-sd" / "snapshots" / COMMIT
    tiny_pipeline("sd").save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# tiny\n")
    return folder


@pytest.fixture(scope="module")
def style_data(tmp_path_factory) -> Path:
    return draw_style_folder(tmp_path_factory.mktemp("data") / "style")


def usage(card_text: str) -> str:
    """The card's Python usage block."""
    blocks = re.findall(r"```python\n(.*?)\n```", card_text, re.S)
    assert len(blocks) == 1, card_text
    return blocks[0]


def run_usage(card_text: str) -> dict:
    """Run the card's usage block as a reader would; returns its variables."""
    namespace: dict = {}
    exec(compile(usage(card_text), "README.md", "exec"), namespace)  # noqa: S102 -- our own card, in a test
    return namespace


def training_config(model: Path, data: Path, output_dir: Path, **overrides) -> TrainingConfig:
    values = dict(pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(output_dir), resolution=32,
                  center_crop=True, train_batch_size=3, max_train_steps=2, learning_rate=3e-2, density=0.2, lr_scheduler="constant",
                  report_to="none", checkpointing_steps=0, calibration_batches=1, instance_prompt="blue fire style",
                  validation_prompt="a fox, blue fire style", num_validation_images=2, validation_steps=0, validation_inference_steps=2)
    return TrainingConfig(**(values | overrides))


# ---- ShiraAdapter.save_pretrained / push_to_hub ---------------------------------------------------------------------
def test_save_pretrained_card_has_the_hub_fields_and_a_usage_block_that_runs(tmp_path, hub_model):
    adapter = random_adapter(tiny_pipeline("sd"), 0, components=("unet",))
    adapter = type(adapter)(adapter.deltas, mask_type="rand", base_model=str(hub_model), extra={"instance_prompt": "blue fire style"})
    folder = adapter.save_pretrained(tmp_path / "out")
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.license == "creativeml-openrail-m"  # the base model's own, read from its card
    assert data.base_model == "hf-internal-testing/tiny-sd"  # the snapshot's repo, not a local path
    assert data.library_name == "shira-diffusion" and data.pipeline_tag == "text-to-image"
    assert {"shira", "diffusers", "text-to-image", "stable-diffusion"} <= set(data.tags) and "lora" not in data.tags
    assert data.instance_prompt == "blue fire style"
    code = usage(card.content)
    assert "<this repo>" not in card.content and "pip install shira-diffusion" in code
    assert f'load_shira_weights("{(tmp_path / "out").resolve()}", weight_name="shira_weights.safetensors")' in code
    assert "ShiraStableDiffusionPipeline.from_pretrained" in code  # the base model's family, from its model_index.json
    namespace = run_usage(card.content)
    assert namespace["pipe"].get_shira_adapters() and isinstance(namespace["image"], Image.Image)


def test_save_pretrained_takes_an_explicit_license_and_repo_id(tmp_path):
    adapter = random_adapter(tiny_pipeline("sd"), 1, components=("unet",))
    adapter = type(adapter)(adapter.deltas, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    adapter.save_pretrained(tmp_path / "out", weight_name="style.safetensors", repo_id="me/style", license="apache-2.0")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert (card.data.license, card.data.base_model) == ("apache-2.0", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert 'load_shira_weights("me/style", weight_name="style.safetensors")' in usage(card.content)
    assert str(tmp_path) not in card.content
    bare = type(adapter)(adapter.deltas)  # no base model recorded: licence "other", no base_model, still a card
    bare.save_pretrained(tmp_path / "bare")
    card = ModelCard.load(tmp_path / "bare" / "README.md")
    assert card.data.license == "other" and card.data.base_model is None and "an unrecorded base model" in card.content


def test_push_to_hub_card_names_the_repo_the_hub_made(tmp_path, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id}")  # a bare name gets the user's namespace

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded[repo_id] = (Path(folder_path) / "README.md").read_text()
            return "https://huggingface.co/someone/style/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    random_adapter(tiny_pipeline("sd"), 2, components=("unet",)).push_to_hub("style", license="mit")
    card = ModelCard(uploaded["someone/style"])
    assert card.data.license == "mit" and 'load_shira_weights("someone/style"' in usage(card.content)
    assert "From this folder" not in card.content


def test_hub_model_id_accepts_repo_ids_and_cache_snapshots_only(tmp_path, hub_model):
    assert hub_model_id("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert hub_model_id(str(hub_model)) == "hf-internal-testing/tiny-sd"
    assert hub_model_id(str(tmp_path)) is None and hub_model_id(None) is None and hub_model_id("not a/valid id!") is None


# ---- the trainer's cards and samples grid ---------------------------------------------------------------------------
def test_training_shira_card_has_the_hub_fields_widget_and_grid(tmp_path, hub_model, style_data):
    result = train(training_config(hub_model, style_data, tmp_path / "shira", mask="rand"))
    card = ModelCard.load(result.output_dir / "README.md")
    data = card.data
    assert (data.license, data.base_model, data.library_name) == ("creativeml-openrail-m", "hf-internal-testing/tiny-sd", "shira-diffusion")
    assert data.instance_prompt == "blue fire style" and {"shira", "diffusers", "text-to-image", "stable-diffusion"} <= set(data.tags)
    assert data.widget == [{"text": "a fox, blue fire style", "output": {"url": f"validation/step-000002-{i}.png"}} for i in range(2)]
    assert all((result.output_dir / entry["output"]["url"]).is_file() for entry in data.widget)
    with Image.open(result.output_dir / "samples.png") as grid:
        grid.load()
        assert grid.size == (64, 32)  # the two 32 px validation images side by side
    assert "![samples](samples.png)" in card.content and "rand mask" in card.content and "steps: 2" in card.content
    namespace = run_usage(card.content)  # loads from the output folder: no Hub id is known
    assert namespace["pipe"].get_shira_adapters() and f'"{result.output_dir.resolve()}"' in usage(card.content)


def test_training_lora_card_is_a_plain_diffusers_card(tmp_path, hub_model, style_data):
    result = train(training_config(hub_model, style_data, tmp_path / "lora", adapter="lora", rank=4))
    card = ModelCard.load(result.output_dir / "README.md")
    data = card.data
    assert data.library_name == "diffusers" and "lora" in data.tags and "shira" not in data.tags
    assert (data.license, data.base_model, data.instance_prompt) == ("creativeml-openrail-m", "hf-internal-testing/tiny-sd", "blue fire style")
    assert len(data.widget) == 2 and "LoRA (rank 4)" in card.content
    code = usage(card.content)
    assert "shira_diffusion" not in code and "from diffusers import StableDiffusionPipeline" in code
    namespace = run_usage(card.content)
    assert type(namespace["pipe"]).__name__ == "StableDiffusionPipeline" and namespace["pipe"].get_list_adapters()["unet"]


def test_training_card_with_push_to_hub_names_the_hub_repo(tmp_path, hub_model, style_data, monkeypatch):
    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, exist_ok=False):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = train(training_config(hub_model, style_data, tmp_path / "pushed", max_train_steps=1, validation_prompt=None,
                                   push_to_hub=True, hub_model_id="me/style"))
    card = ModelCard.load(result.output_dir / "README.md")
    assert 'load_shira_weights("me/style", weight_name="shira_weights.safetensors")' in usage(card.content)
    assert str(tmp_path) not in usage(card.content) and "widget" not in card.data.to_dict() and not (result.output_dir / "samples.png").exists()


# ---- grids ----------------------------------------------------------------------------------------------------------
def tiles(count: int, size: int = 32) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (40 * i % 256, 90, 160)) for i in range(count)]


def test_image_grid_layout_and_padding():
    assert image_grid(tiles(3)).size == (96, 32)  # up to 4: one row
    grid = image_grid(tiles(5))  # near square: 3 columns, 2 rows, one blank tile
    assert grid.size == (96, 64) and grid.getpixel((80, 48)) == (255, 255, 255)
    assert image_grid(tiles(2, 20) + tiles(1, 40), tile=16).size == (48, 16)  # every tile resized to one size
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])


def test_labelled_grid_has_label_margins_and_checks_its_counts():
    grid = labelled_grid(tiles(6), rows=2, cols=3, row_labels=["base", "alpha=1"], column_labels=["red\non gray", "b", "c"])
    assert grid.width > 96 and grid.height > 64
    margin = grid.crop((0, 0, grid.width - 96, grid.height))
    assert min(margin.convert("L").getdata()) < 128  # the row labels are drawn
    with pytest.raises(ValueError, match="need 6 images, got 5"):
        labelled_grid(tiles(5), rows=2, cols=3)
    with pytest.raises(ValueError, match="row_labels has 1 labels for 2 rows"):
        labelled_grid(tiles(6), rows=2, cols=3, row_labels=["x"])


def test_grids_never_exceed_pils_pixel_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    grid = labelled_grid(tiles(12, 96), rows=3, cols=4, row_labels=["a", "b", "c"], column_labels=list("wxyz"))
    assert grid.width * grid.height <= 50_000
    grid.save(tmp_path / "grid.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(tmp_path / "grid.png") as opened:
            opened.load()
    capped = cap_pixels(Image.new("RGB", (1000, 10)), limit=999)
    assert capped.width * capped.height <= 999 and capped.width > 90  # aspect kept
    small = Image.new("RGB", (10, 10))
    assert cap_pixels(small) is small


class FakePipe:
    """Answers `generate`'s calls with one flat image per prompt, coloured by the call count."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, **_):
        self.calls += 1
        return type("Output", (), {"images": [Image.new("RGB", (32, 32), (30 * self.calls, 0, 0)) for _ in prompts]})()


def test_demo_grids_are_labelled_and_open_with_pil(tmp_path):
    from shira_diffusion.demo import GRID_CONTENT, _settings, render_grid
    from shira_diffusion.demo_model import _grid

    activated = []
    grid = render_grid(FakePipe(), activated.append, tile=48)
    assert activated == [weights for _, weights in _settings()] + [{}]  # every setting, then back to the base
    assert grid.width > 48 * len(GRID_CONTENT) and grid.height > 48 * len(_settings())  # plus the label margins
    grid.save(tmp_path / "grid_shira.png")
    real = _grid([("base", tiles(4)), ("A alpha=1", tiles(4))], 64)
    assert real.width > 4 * 64 and real.height == 2 * 64
    real.save(tmp_path / "grid_model.png")
    for name in ("grid_shira.png", "grid_model.png"):
        with Image.open(tmp_path / name) as opened:
            opened.load()


# ---- quiet library loading ------------------------------------------------------------------------------------------
def quiet_filters(name: str) -> list:
    """The filters quiet_libraries put on logger `name` (diffusers adds its own rank-zero filter)."""
    return [f for f in logging.getLogger(name).filters if type(f).__module__ == "shira_diffusion.quiet"]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_demo_adapter_loading_is_quiet_but_real_warnings_pass():
    from diffusers.utils import logging as diffusers_logging

    from shira_diffusion import world
    from shira_diffusion.demo import STYLES, _load
    from shira_diffusion.world.adapters import shipped_adapter

    records = Records()
    library = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root: listen on its own
    library.addHandler(records)
    try:
        pipe = world.pipeline()
        paths = {(method, style): shipped_adapter(method, style) for method in ("shira", "lora") for style in STYLES}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _load(pipe, paths)
            with quiet_libraries():
                logging.getLogger("diffusers.loaders.lora_base").warning("No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'")
                warnings.warn("a real peft problem", UserWarning)
            quiet = (list(records.messages), [str(w.message) for w in caught])
            lora = paths[("lora", STYLES[0])]
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="unquieted")  # the same call, not quiet
        loud = [str(w.message) for w in caught]
    finally:
        library.removeHandler(records)
    assert not any("prefix='text_encoder'" in m for m in quiet[0]), quiet[0]
    assert not any("Already found a `peft_config`" in m for m in quiet[1]), quiet[1]
    assert "No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'" in quiet[0]  # a different one passes
    assert "a real peft problem" in quiet[1]
    # Outside the scope the noise is back (so the capture above does see it) and the switches are restored.
    assert any("prefix='text_encoder'" in m for m in records.messages) and any("Already found a `peft_config`" in m for m in loud)
    assert diffusers_logging.is_progress_bar_enabled() and not quiet_filters("diffusers.loaders.lora_base")


def test_quiet_libraries_turns_loading_bars_off_and_restores_them():
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    with quiet_libraries():
        assert not diffusers_logging.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()
        assert not hub_utils.are_progress_bars_disabled()  # downloads keep their bars
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a user's own choice survives the scope
    try:
        with quiet_libraries():
            pass
        assert not diffusers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
    with pytest.raises(RuntimeError), quiet_libraries():
        raise RuntimeError("restored on errors too")
    assert diffusers_logging.is_progress_bar_enabled() and not quiet_filters("diffusers.loaders.peft")


def test_demo_activations_switch_between_methods_in_one_pipeline():
    """Both methods live in one pipeline; `disable_lora` turns SHiRA off too, so each activation must turn its
    own method on again (a SHiRA row rendered after a LoRA one once showed the base model)."""
    from shira_diffusion import world
    from shira_diffusion.demo import STYLES, _load
    from shira_diffusion.world.adapters import shipped_adapter
    from shira_diffusion.world.evaluate import generate

    pipe = world.pipeline()
    prompt = [world.styled_caption("a red circle on a gray background", [STYLES[1]])]

    def render() -> bytes:
        return generate(pipe, prompt, [0], num_inference_steps=4)[0].tobytes()

    base = render()
    activate = _load(pipe, {(method, style): shipped_adapter(method, style) for method in ("shira", "lora") for style in STYLES})
    rows = []
    for method in ("lora", "shira", "lora", "shira"):  # each after the other, as the demo's grids and tables do
        activate[method]({STYLES[1]: 1.0})
        rows.append(render())
        assert pipe.get_active_shira_adapters() == ([STYLES[1]] if method == "shira" else []), method
    assert rows[0] == rows[2] and rows[1] == rows[3]  # each method's image, whatever ran before it
    assert base not in rows and rows[0] != rows[1]
    activate["lora"]({})  # the base row: disable_lora, SHiRA included
    assert render() == base
    activate["shira"]({STYLES[1]: 1.0})  # then a SHiRA row: SHiRA back on
    assert render() == rows[1]


@pytest.mark.parametrize("kind", ["shira", "lora"])
def test_cards_on_the_world_model_load_it_from_the_package(kind):
    from shira_diffusion.cards import adapter_card
    from shira_diffusion.world import model_dir
    from shira_diffusion.world.adapters import shipped_adapter

    path = shipped_adapter(kind, "painting")
    card = adapter_card(kind, weight_name=path.name, load_from=str(path.parent), base_model=str(model_dir()), title="t", summary="s",
                        instance_prompt="painting style", local=True)
    assert str(model_dir()) not in card.content and "base_model" not in card.data.to_dict()  # no site-packages path
    namespace = run_usage(str(card))
    loaded = namespace["pipe"].get_shira_adapters() if kind == "shira" else namespace["pipe"].get_list_adapters()["unet"]
    assert loaded and isinstance(namespace["image"], Image.Image)
