"""The trainer's data: local folders (metadata.jsonl read by datasets' imagefolder, .txt captions) and datasets
(`--dataset_name`: save_to_disk folders, local folders for load_dataset), every error before any model loads.
Offline: conftest sets HF_DATASETS_OFFLINE and a per-session HF_DATASETS_CACHE."""

import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from shira_diffusion.cli import main
from shira_diffusion.data import DatasetError, DataSource, ImageCaptions, StyleDataset, collate, load_examples, open_image, scan_folder
from shira_diffusion.datasets import check_dataset

from .helpers import draw_style_folder, finishes

datasets.disable_progress_bars()


def png_bytes(shade: int = 0, size: tuple[int, int] = (40, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 80, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


FEATURES = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"), "score": datasets.Value("int64")})


def table(count: int = 4, images: list[bytes] | None = None, texts: list | None = None) -> datasets.Dataset:
    images = images or [png_bytes(40 * i) for i in range(count)]
    texts = texts if texts is not None else [f"row {i}, ink style" for i in range(len(images))]
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "text": texts, "score": list(range(len(images)))},
                                      features=FEATURES)


def saved(path: Path, data) -> str:
    data.save_to_disk(str(path))
    return str(path)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- local folders -------------------------------------------------------------------------------------------
def test_the_tests_cache_is_a_session_folder_not_the_home_cache():
    assert str(datasets.config.HF_DATASETS_CACHE) == os.environ["HF_DATASETS_CACHE"]
    assert not str(datasets.config.HF_DATASETS_CACHE).startswith(str(Path.home() / ".cache"))
    assert datasets.config.HF_DATASETS_OFFLINE


def test_a_folder_with_metadata_is_read_by_imagefolder_and_nothing_is_written_into_it(tmp_path):
    folder = draw_style_folder(tmp_path / "data", count=4)
    before = files_under(folder)
    cache = tmp_path / "cache"
    examples = load_examples(DataSource(train_data_dir=str(folder), cache_dir=str(cache)))
    assert isinstance(examples, ImageCaptions) and len(examples) == 4
    assert [examples[i][1] for i in range(4)] == [f"shape {i}, blue fire style" for i in range(4)]
    image, _ = examples[2]
    assert image.mode == "RGB" and image.size == (48, 40)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(folder / "2.png").convert("RGB")))
    assert examples.describe() == f"4 images from folder {folder}" and examples.name(1) == str(folder / "1.png")
    assert files_under(folder) == before  # no Arrow cache, lock or index beside the user's images
    assert any(p.suffix == ".arrow" for p in cache.rglob("*"))  # the imagefolder builder ran, caching into --cache_dir
    with pytest.raises(IndexError):
        examples[4]


def test_txt_captions_beside_images_and_the_instance_prompt_fill_in_where_metadata_has_no_row(tmp_path):
    folder = draw_style_folder(tmp_path / "data", count=4, captions=False)
    (folder / "1.txt").write_text("  one, ink style \n")
    (folder / "2.txt").write_text("two, ink style")
    with pytest.raises(DatasetError, match=r"data: 2 of 4 images have no caption, e.g. 0.png \(add it to metadata.jsonl or a .txt file"):
        load_examples(DataSource(train_data_dir=str(folder)))
    examples = load_examples(DataSource(train_data_dir=str(folder), instance_prompt="ink style"))
    assert [examples[i][1] for i in range(4)] == ["ink style", "one, ink style", "two, ink style", "ink style"]
    # A metadata row wins over a .txt file; images without either take the prompt.
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "1.png", "text": "from metadata"}) + "\n")
    examples = load_examples(DataSource(train_data_dir=str(folder), instance_prompt="ink style"))
    assert [examples[i][1] for i in range(4)] == ["ink style", "from metadata", "two, ink style", "ink style"]
    bare = draw_style_folder(tmp_path / "bare", count=2, captions=False)
    with pytest.raises(DatasetError, match=r"bare: no captions \(metadata.jsonl or .txt files\) and no --instance_prompt"):
        load_examples(DataSource(train_data_dir=str(bare)))


def test_caption_column_names_the_metadata_column_of_a_folder(tmp_path):
    folder = draw_style_folder(tmp_path / "data", count=2, captions=False)
    rows = [{"file_name": f"{i}.png", "prompt": f"prompt {i}", "license": "CC0-1.0"} for i in range(2)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(DataSource(train_data_dir=str(folder), caption_column="prompt"))
    assert [examples[i][1] for i in range(2)] == ["prompt 0", "prompt 1"]
    with pytest.raises(DatasetError, match=r"metadata.jsonl: no 'text' caption column \(columns: file_name, prompt, license\)"):
        load_examples(DataSource(train_data_dir=str(folder), instance_prompt="style"))
    plain = draw_style_folder(tmp_path / "plain", count=2, captions=False)
    with pytest.raises(DatasetError, match=r"plain/metadata.jsonl: no such file, so there is no caption column 'prompt'"):
        load_examples(DataSource(train_data_dir=str(plain), caption_column="prompt", instance_prompt="style"))


@pytest.mark.parametrize("lines, message", [
    ([b'{"file_name": "0.png", "text": "a"}', b'{"file_name": "1.png", "text": "caf\xe9"}'], r"metadata.jsonl:2: not UTF-8 text \(byte 0xe9 at column 36\)"),
    ([b'{"file_name": "0.png", "text": "a"}', b"", b"{not json"], r"metadata.jsonl:3: expected a JSON object"),
    ([b'{"file_name": "0.png", "text": "a"}', b"[" * 100_000], r"metadata.jsonl:2: expected a JSON object"),
    ([b'{"file_name": "0.png", "text": "a"}', b'{"file_name": "1.png", "text": null}'], r"metadata.jsonl:2: \"text\" of 1.png must be a non-empty string, got null"),
    ([b'{"file_name": "0.png", "text": "a"}', b'{"file_name": "1.png", "text": "  "}'], r"metadata.jsonl:2: \"text\" of 1.png must be a non-empty string, got \"  \""),
    ([b'{"file_name": "0.png", "text": "a"}', b'{"file_name": "1.png", "text": 5}'], r"metadata.jsonl:2: \"text\" of 1.png must be a non-empty string, got 5"),
    ([b'{"file_name": "0.png", "text": "a"}', b"", b'{"file_name": "7.png", "text": "b"}'], r"metadata.jsonl:3: \"file_name\" '7.png': no such file$"),
    ([b'{"file_name": "0.png", "text": "a"}', b'{"file_name": "0.png", "text": "b"}'], r"metadata.jsonl:2: a second row for 0.png"),
    ([b'{"file_name": "0.png", "text": "a"}', b'{"file_name": "../0.png", "text": "b"}'], r"metadata.jsonl: datasets could not read it \(ValueError: Invalid metadata file_name '../0.png'"),
    ([b'{"name": "0.png", "text": "a"}'], r"metadata.jsonl:1: \"file_name\" must be a file name, got null"),
    ([b"", b"  "], r"metadata.jsonl: no rows"),
])
def test_metadata_errors_name_the_file_and_line(tmp_path, lines, message):
    folder = draw_style_folder(tmp_path / "data", count=2, captions=False)
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(DatasetError, match=message):
        load_examples(DataSource(train_data_dir=str(folder), instance_prompt="style"))


def test_a_metadata_row_for_an_image_in_a_subfolder_or_a_bad_txt_caption_is_an_error(tmp_path):
    folder = draw_style_folder(tmp_path / "data", count=2)
    (folder / "sub").mkdir()
    Image.new("RGB", (40, 40)).save(folder / "sub" / "2.png")
    with open(folder / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "sub/2.png", "text": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"metadata.jsonl:3: \"file_name\" 'sub/2.png': a regular file, not an image file \(.png, .*\) directly in the folder"):
        load_examples(DataSource(train_data_dir=str(folder)))
    plain = draw_style_folder(tmp_path / "plain", count=2, captions=False)
    (plain / "0.txt").write_bytes(b"caption \xe9")
    (plain / "1.txt").write_text("  \n")
    scan = scan_folder(plain)
    assert scan.problems == [("0.txt", "not UTF-8 text (byte 0xe9 at offset 8)"), ("1.txt", "empty caption for 1.png")]
    with pytest.raises(DatasetError, match=r"plain/0.txt: not UTF-8 text .*and 1 more problems: shira-diffusion dataset check"):
        load_examples(DataSource(train_data_dir=str(plain), instance_prompt="style"))


def test_an_undecodable_image_in_a_folder_is_named_and_images_past_the_limit_are_never_opened(tmp_path):
    folder = draw_style_folder(tmp_path / "data", count=4, captions=False)
    (folder / "3.png").write_bytes(png_bytes()[:60])  # truncated
    with pytest.raises(DatasetError, match=r"data/3.png: unreadable image \("):
        load_examples(DataSource(train_data_dir=str(folder), instance_prompt="style"))
    (folder / "2.png").write_bytes(png_claiming(10_000, 10_000))  # over PIL's limit: refused from its header
    with pytest.raises(DatasetError, match=r"data/2.png: unreadable image \(Image size \(100000000 pixels\) exceeds limit .*MAX_IMAGE_PIXELS"):
        load_examples(DataSource(train_data_dir=str(folder), instance_prompt="style"))
    # DreamBooth class images: the first N by name, every one captioned with the class prompt, captions never read.
    (folder / "metadata.jsonl").write_text("not json at all")
    classes = load_examples(DataSource(train_data_dir=str(folder)), limit=2, caption="a shape")
    assert len(classes) == 2 and [classes[i][1] for i in range(2)] == ["a shape", "a shape"]
    assert classes.name(1).endswith("1.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_fifos_named_like_images_or_named_by_a_row_are_never_opened(tmp_path):
    folder = draw_style_folder(tmp_path / "data", count=3)
    os.mkfifo(folder / "8.png")
    with pytest.warns(UserWarning, match=r"8.png: a FIFO, not a regular file; skipped"):
        examples = finishes(folder / "8.png", lambda: load_examples(DataSource(train_data_dir=str(folder))))
    assert [Path(examples.name(i)).name for i in range(len(examples))] == ["0.png", "1.png", "2.png"]
    with open(folder / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "8.png", "text": "x"}) + "\n")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"metadata.jsonl:4: \"file_name\" '8.png': a FIFO, not an image file"):
        finishes(folder / "8.png", lambda: load_examples(DataSource(train_data_dir=str(folder))))
    # The same folder through load_dataset (--dataset_name): its row for the FIFO is refused when decoded, not opened.
    with pytest.raises(DatasetError, match=r"split train\) row 3: unreadable image \(.*8.png: a FIFO, not a regular file\)"):
        finishes(folder / "8.png", lambda: load_examples(DataSource(dataset_name=str(folder), caption_column="text")))
    with pytest.raises(DatasetError, match="a FIFO, not a regular file"):
        finishes(folder / "8.png", lambda: open_image(folder / "8.png"))


def test_images_are_read_upright_and_high_bit_depth_pngs_are_scaled(tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    upright = np.zeros((64, 32, 3), np.uint8)
    upright[:16] = 255  # a white band at the top of a 32 wide, 64 high photo
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: stored rotated, shown after turning 90 degrees clockwise
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(folder / "phone.jpg", exif=exif, quality=100)
    gradient = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    Image.fromarray(gradient).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode == "I;16"
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "phone.jpg", "text": "a"}) + "\n" + json.dumps({"file_name": "deep.png", "text": "b"}))

    phone = np.asarray(open_image(folder / "phone.jpg"))
    assert phone.shape == (64, 32, 3) and phone[:12].mean() > 230 and phone[20:].mean() < 25  # upright
    deep = np.asarray(open_image(folder / "deep.png"))
    assert deep.dtype == np.uint8 and np.abs(deep[..., 0].astype(float) - gradient / 257).max() <= 0.5  # scaled, not clipped
    dataset = StyleDataset(load_examples(DataSource(train_data_dir=str(folder))), 32, True, False, 0)
    assert dataset[1]["original_size"] == (64, 32)  # SDXL's original_size: the upright height and width
    assert abs(float(dataset[0]["pixel_values"].mean())) < 0.1  # the gradient: mean grey, not near-white (~0.98)
    defects, stats = check_dataset(folder, resolution=48)
    assert [str(d) for d in defects] == ["phone.jpg: 32x64 is smaller than the training resolution 48"]  # upright size
    assert stats["images"] == 2
    # The same bytes from a dataset's image cells decode the same way.
    rows = table(images=[(folder / "phone.jpg").read_bytes(), (folder / "deep.png").read_bytes()], texts=["a", "b"])
    examples = load_examples(DataSource(dataset_name=saved(tmp_path / "saved", rows), caption_column="text"))
    assert np.array_equal(np.asarray(examples[0][0]), phone) and np.array_equal(np.asarray(examples[1][0]), deep)


def test_dataset_check_reports_a_null_caption_by_line_once(tmp_path, capsys):
    folder = draw_style_folder(tmp_path / "nulls", count=2)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "x"}) + "\n" + json.dumps({"file_name": "1.png", "text": None}))
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: \"text\" of 1.png must be a non-empty string, got null"):
        load_examples(DataSource(train_data_dir=str(folder)))
    assert main(["dataset", "check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert 'metadata.jsonl:2: "text" of 1.png must be a non-empty string' in out and "1.png: no caption" not in out
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "0.png", "text": "x"}\n{"file_name": "1.png", "text": "\xff"}')
    defects, stats = check_dataset(folder)
    assert [str(d) for d in defects] == ["metadata.jsonl:2: not UTF-8 text (byte 0xff at column 33)"] and stats == {"images": 2}


# ---- datasets (--dataset_name) -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["Dataset", "DatasetDict"])
def test_a_dataset_saved_with_save_to_disk_is_read_with_load_from_disk(tmp_path, kind):
    rows = table(3)
    data = rows if kind == "Dataset" else datasets.DatasetDict({"train": rows, "test": table(1)})
    name = saved(tmp_path / "saved", data)
    examples = load_examples(DataSource(dataset_name=name, caption_column="text"))
    assert [examples[i][1] for i in range(3)] == ["row 0, ink style", "row 1, ink style", "row 2, ink style"]
    assert examples[1][0].mode == "RGB" and examples[1][0].getpixel((0, 0)) == (40, 80, 200)
    assert examples.describe() == f"dataset {name} (split train), 3 rows" and examples.name(2) == f"dataset {name} (split train) row 2"
    prompted = load_examples(DataSource(dataset_name=name, instance_prompt="ink style"))  # no --caption_column
    assert [prompted[i][1] for i in range(3)] == ["ink style"] * 3
    first = load_examples(DataSource(dataset_name=name, caption_column="text"), limit=2, caption="a shape")
    assert len(first) == 2 and first[1][1] == "a shape"
    with pytest.raises(DatasetError, match=r"drop --dataset_config_name"):
        load_examples(DataSource(dataset_name=name, dataset_config_name="default", caption_column="text"))


def test_the_train_split_else_the_only_split_else_an_error_naming_the_splits(tmp_path):
    only = saved(tmp_path / "only", datasets.DatasetDict({"validation": table(2)}))
    assert load_examples(DataSource(dataset_name=only, caption_column="text")).describe() == f"dataset {only} (split validation), 2 rows"
    several = saved(tmp_path / "several", datasets.DatasetDict({"validation": table(2), "test": table(1)}))
    with pytest.raises(DatasetError, match=r"several: no 'train' split and 2 others to choose from: validation, test"):
        load_examples(DataSource(dataset_name=several, caption_column="text"))


def test_a_local_folder_as_dataset_name_goes_through_load_dataset(tmp_path):
    folder = draw_style_folder(tmp_path / "data", count=3)
    before = files_under(folder)
    examples = load_examples(DataSource(dataset_name=str(folder), caption_column="text"))
    assert [examples[i][1] for i in range(3)] == [f"shape {i}, blue fire style" for i in range(3)]
    assert examples.describe() == f"dataset {folder} (split train), 3 rows"
    assert files_under(folder) == before
    with pytest.raises(DatasetError, match=r"no caption column 'caption' \(--caption_column\); its columns: image, text"):
        load_examples(DataSource(dataset_name=str(folder), caption_column="caption"))


@pytest.mark.parametrize("change, message", [
    (dict(image_column="picture"), r"no image column 'picture' \(--image_column\); its columns: image, text, score"),
    (dict(image_column="text"), r"column 'text' \(--image_column\) holds Value\('string'\), not images"),
    (dict(caption_column="prompt"), r"no caption column 'prompt' \(--caption_column\); its columns: image, text, score"),
    (dict(caption_column="score"), r"column 'score' \(--caption_column\) holds Value\('int64'\), not captions"),
    (dict(caption_column=None), r"no --caption_column and no --instance_prompt: name the column .*\(its columns: image, text, score\)"),
])
def test_a_missing_or_wrong_column_is_an_error_listing_the_columns(tmp_path, change, message):
    name = saved(tmp_path / "saved", table(2))
    with pytest.raises(DatasetError, match=rf"dataset .*saved \(split train\): {message}"):
        load_examples(DataSource(**{"dataset_name": name, "caption_column": "text", **change}))


@pytest.mark.parametrize("texts, message", [
    (["a", None, "c"], r"row 1: caption column 'text' must hold a non-empty string, got null"),
    (["a", "b", " "], r"row 2: caption column 'text' must hold a non-empty string, got \" \""),
])
def test_a_caption_that_is_not_a_non_empty_string_is_an_error_naming_the_row(tmp_path, texts, message):
    name = saved(tmp_path / "saved", table(3, texts=texts))
    with pytest.raises(DatasetError, match=message):
        load_examples(DataSource(dataset_name=name, caption_column="text"))
    assert len(load_examples(DataSource(dataset_name=name, instance_prompt="style"))) == 3  # the column is not used


@pytest.mark.parametrize("bad, message", [
    (b"not an image", r"row 1: unreadable image \(not an image format PIL can read\)"),
    (png_bytes()[:70], r"row 1: unreadable image \("),
    (png_claiming(10_000, 10_000), r"row 1: unreadable image \(Image size \(100000000 pixels\) exceeds limit"),
])
def test_an_image_that_cannot_be_decoded_is_an_error_naming_the_row(tmp_path, bad, message):
    name = saved(tmp_path / "saved", table(images=[png_bytes(), bad, png_bytes()]))
    with pytest.raises(DatasetError, match=rf"dataset .*saved \(split train\) {message}"):
        load_examples(DataSource(dataset_name=name, caption_column="text"))
    assert len(load_examples(DataSource(dataset_name=name, caption_column="text"), limit=1)) == 1  # rows past the limit: never decoded


def test_an_empty_dataset_is_an_error(tmp_path):
    empty = table(0, images=[], texts=[])
    for name in (saved(tmp_path / "one", empty), saved(tmp_path / "dict", datasets.DatasetDict({"train": empty}))):
        with pytest.raises(DatasetError, match=r"dataset .*: no rows"):
            load_examples(DataSource(dataset_name=name, instance_prompt="style"))


def test_exactly_one_source_and_hub_errors_become_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"exactly one of --train_data_dir \(--instance_data_dir\) and --dataset_name, got both"):
        load_examples(DataSource(train_data_dir=str(tmp_path), dataset_name="user/style"))
    with pytest.raises(DatasetError, match="got neither"):
        load_examples(DataSource())
    with pytest.raises(DatasetError, match=r"--dataset_name someone/ink-style: datasets could not load it \(ConnectionError: .*someone/ink-style"):
        load_examples(DataSource(dataset_name="someone/ink-style", caption_column="text"))  # offline: refused at once
    with pytest.raises(DatasetError, match=r"missing: training data folder does not exist"):
        load_examples(DataSource(train_data_dir=str(tmp_path / "missing"), instance_prompt="x"))
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_examples(DataSource(train_data_dir=str(tmp_path)), limit=0)


# ---- the torch dataset ---------------------------------------------------------------------------------------
def test_style_dataset_repeats_seeds_augmentations_by_epoch_and_index_and_pickles(tmp_path):
    name = saved(tmp_path / "saved", table(3, images=[png_bytes(40 * i, (64, 40)) for i in range(3)]))
    examples = load_examples(DataSource(dataset_name=name, caption_column="text"))
    dataset = StyleDataset(examples, 32, center_crop=False, random_flip=True, seed=7, repeats=2)
    assert len(dataset) == 6 and [dataset[i]["caption"] for i in range(6)] == [f"row {i // 2}, ink style" for i in range(6)]
    first = [dataset[i]["crop_top_left"] for i in range(6)]
    assert first == [dataset[i]["crop_top_left"] for i in range(6)]  # same (seed, epoch, index): same crop
    dataset.set_epoch(1)
    assert [dataset[i]["crop_top_left"] for i in range(6)] != first
    copy = pickle.loads(pickle.dumps(dataset))  # DataLoader workers get a pickled copy
    assert torch.equal(copy[3]["pixel_values"], dataset[3]["pixel_values"])
    batch = collate([dataset[0], dataset[5]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["original_sizes"] == [(40, 64), (40, 64)]
    assert batch["captions"] == ["row 0, ink style", "row 2, ink style"] and len(batch["crops_top_left"]) == 2
    assert float(batch["pixel_values"].min()) >= -1.0 and float(batch["pixel_values"].max()) <= 1.0
    with pytest.raises(IndexError):
        dataset[6]
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        StyleDataset(examples, 32, False, False, 0, repeats=0)
