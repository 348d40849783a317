"""Bad input never hangs, never prints a traceback and never runs for nothing: FIFOs in data folders, non-UTF-8
or dangling metadata rows, images whose header claims a huge size, out-of-range --resolution, OS and format
errors in the CLI, read-only output folders, truncated weights, counts below one and strengths outside float32."""

import errno
import importlib
import json
import os
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from safetensors import SafetensorError
from safetensors.torch import save_file

from shira_diffusion.cli import main
from shira_diffusion.data import DatasetError, DataSource, load_examples
from shira_diffusion.datasets import check_dataset
from shira_diffusion.testing import tiny_pipeline

from .helpers import draw_style_folder, finishes


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "sd"
    tiny_pipeline("sd").save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if the trainer gets as far as loading a model."""
    from shira_diffusion.training import loop

    monkeypatch.setattr(loop, "load_family", lambda *a, **k: pytest.fail("a model was loaded before the error"))


def train_args(model, data, out, *extra) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", model, "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "32", "--report_to", "none", *extra]


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
    return err.splitlines()[-1]


# ---- data listings ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_a_fifo_named_like_an_image_is_never_opened(model, tmp_path, capsys):
    data = draw_style_folder(tmp_path / "data", count=4)
    os.mkfifo(data / "8.png")
    with pytest.warns(UserWarning, match=r"8.png: a FIFO, not a regular file; skipped"):
        examples = finishes(data / "8.png", lambda: load_examples(DataSource(train_data_dir=str(data))))
    assert [Path(examples.name(i)).name for i in range(len(examples))] == ["0.png", "1.png", "2.png", "3.png"]
    assert finishes(data / "8.png", lambda: main(["dataset", "check", str(data), "--resolution", "32"])) == 1
    assert "8.png: a FIFO, not a regular file (skipped)" in capsys.readouterr().out
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="8.png: a FIFO"):
        assert finishes(data / "8.png", lambda: main(train_args(model, data, out, "--max_train_steps", "1", "--train_batch_size", "2",
                                                                "--instance_prompt", "blue fire style"))) == 0
    assert (out / "shira_weights.safetensors").is_file()
    # A metadata row naming the FIFO is an error, still without opening it.
    with open(data / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "8.png", "text": "x"}) + "\n")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"metadata.jsonl:5: \"file_name\" '8.png': a FIFO, not an image file"):
        finishes(data / "8.png", lambda: load_examples(DataSource(train_data_dir=str(data))))


def test_metadata_that_is_not_utf8_is_an_error_naming_file_and_line(model, tmp_path, capsys, no_model_loads):
    data = draw_style_folder(tmp_path / "data", count=4)
    lines = (data / "metadata.jsonl").read_bytes().splitlines()
    lines[2] = lines[2].replace(b"shape 2", b"shape \xff\xfe 2")
    (data / "metadata.jsonl").write_bytes(b"\n".join(lines))
    assert main(train_args(model, data, tmp_path / "out")) == 2
    assert re.search(r"error: .*data/metadata.jsonl:3: not UTF-8 text \(byte 0xff at column \d+\)", last_error(capsys))
    defects, _ = check_dataset(data)
    assert len(defects) == 1 and "metadata.jsonl:3: not UTF-8 text" in str(defects[0])
    (data / "3.txt").write_bytes(b"caption \xe9")  # a latin-1 .txt caption
    (data / "metadata.jsonl").unlink()
    with pytest.raises(DatasetError, match=r"3.txt: not UTF-8 text"):
        load_examples(DataSource(train_data_dir=str(data), instance_prompt="style"))
    # A byte-order mark and deeply nested JSON: a BOM is fine, nesting is a line error (not a RecursionError).
    rows = [json.dumps({"file_name": f"{i}.png", "text": "t"}) for i in range(4)]
    (data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())
    assert len(load_examples(DataSource(train_data_dir=str(data)))) == 4
    (data / "metadata.jsonl").write_text("\n".join(rows + ["[" * 100_000]))
    with pytest.raises(DatasetError, match=r"metadata.jsonl:5: expected"):
        load_examples(DataSource(train_data_dir=str(data)))


def test_a_metadata_row_for_a_missing_image_is_an_error_naming_file_line_and_image(model, tmp_path, capsys, no_model_loads):
    data = draw_style_folder(tmp_path / "data", count=4)
    (data / "2.png").unlink()
    assert main(train_args(model, data, tmp_path / "out", "--instance_prompt", "style")) == 2
    assert re.search(r"error: .*data/metadata.jsonl:3: \"file_name\" '2.png': no such file$", last_error(capsys))
    assert main(["dataset", "check", str(data)]) == 1
    assert "metadata.jsonl:3: \"file_name\" '2.png': no such file" in capsys.readouterr().out
    (data / "sub").mkdir()
    Image.new("RGB", (40, 40)).save(data / "sub" / "2.png")
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace('"2.png"', '"sub/2.png"'))
    with pytest.raises(DatasetError, match=r"metadata.jsonl:3: \"file_name\" 'sub/2.png': not a regular file|metadata.jsonl:3: \"file_name\" 'sub/2.png': .*not an image file"):
        load_examples(DataSource(train_data_dir=str(data)))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_an_image_whose_header_claims_too_many_pixels_is_refused_before_decoding(model, tmp_path, capsys, monkeypatch, no_model_loads):
    data = draw_style_folder(tmp_path / "data", count=4)
    (data / "3.png").write_bytes(png_claiming(10_000, 10_000))  # 1e8 pixels: over PIL's limit, under twice it (PIL only warns)
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    real_load = ImageFile.ImageFile.load

    def load(image):
        assert image.width * image.height <= Image.MAX_IMAGE_PIXELS, "decoded an image over the limit"
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    assert main(train_args(model, data, tmp_path / "out")) == 2
    assert re.search(r"error: .*3.png: unreadable image \(Image size \(100000000 pixels\) exceeds limit of \d+ pixels.*MAX_IMAGE_PIXELS",
                     last_error(capsys))
    defects, stats = check_dataset(data)
    assert [str(d) for d in defects if d.file == "3.png"][0].startswith("3.png: too large to decode (Image size (100000000 pixels)")
    assert stats["images"] == 4


@pytest.mark.parametrize("resolution, message", [
    ("8192", "--resolution must be at most 4096, got 8192"),
    ("4", "--resolution must be a positive multiple of 8, got 4"),
    ("0", "--resolution must be a positive multiple of 8, got 0"),
    ("-64", "--resolution must be a positive multiple of 8, got -64"),
])
def test_resolution_is_bounded_before_any_model_loads(model, tmp_path, capsys, no_model_loads, resolution, message):
    data = draw_style_folder(tmp_path / "data", count=4)
    args = train_args(model, data, tmp_path / "out")
    args[args.index("--resolution") + 1] = resolution
    assert main(args) == 2
    assert message in last_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--learning_rate", "--noise_offset", "--adam_epsilon"])
def test_infinite_rates_and_weights_are_refused_before_any_model_loads(model, tmp_path, capsys, no_model_loads, flag):
    assert main(train_args(model, draw_style_folder(tmp_path / "data", count=4), tmp_path / "out", flag, "inf")) == 2
    assert f"{flag} must be a finite number, got inf" in last_error(capsys)


# ---- CLI errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/a.safetensors"), "error: /out/a.safetensors: No space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "error: /ro/x: Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/secret"), "error: /secret: Permission denied"),
    (SafetensorError("Error while deserializing header: HeaderTooLarge"), "error: SafetensorError: Error while deserializing header: HeaderTooLarge"),
    (RecursionError("maximum recursion depth exceeded"), "error: RecursionError: maximum recursion depth exceeded"),
    (OverflowError("int too large to convert to float"), "error: OverflowError: int too large to convert to float"),
    (ValueError("two\nlines"), "error: two lines"),
])
def test_main_turns_os_and_format_errors_into_one_line_and_exit_2(monkeypatch, capsys, error, expected):
    def run(args):
        raise error

    monkeypatch.setattr(importlib.import_module("shira_diffusion.cli.inspect"), "run", run)
    monkeypatch.delenv("SHIRA_DEBUG", raising=False)
    assert main(["inspect", "x.safetensors"]) == 2
    assert capsys.readouterr().err == expected + "\n"
    monkeypatch.setenv("SHIRA_DEBUG", "1")  # the traceback on request
    with pytest.raises(type(error)):
        main(["inspect", "x.safetensors"])


def test_a_deeply_nested_prompt_file_is_a_one_line_error(model, tmp_path, capsys):
    (tmp_path / "prompts.json").write_text("[" * 100_000)
    args = ["eval", "--pretrained_model_name_or_path", model, "--prompts", str(tmp_path / "prompts.json"), "--output_dir", str(tmp_path / "o"),
            "--no_score"]
    assert main(args) == 2
    assert last_error(capsys) == f"error: {tmp_path / 'prompts.json'}: JSON nested too deeply"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_convert_and_extract_into_a_read_only_folder_fail_before_the_work(tmp_path, capsys, monkeypatch):
    import shira_diffusion.convert

    for name in ("lora_to_shira", "extract_shira"):
        monkeypatch.setattr(shira_diffusion.convert, name, lambda *a, **k: pytest.fail("converted before checking the output folder"))
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for args in (["convert", "lora.safetensors", str(folder / "out.safetensors")],
                     ["extract", "base.safetensors", "tuned.safetensors", str(folder / "sub" / "out.safetensors")]):
            assert main(args) == 2
            assert last_error(capsys) == f"error: {folder}: folder is not writable, cannot write out.safetensors there"
    finally:
        folder.chmod(0o755)
    assert sorted(folder.iterdir()) == []


def test_extract_from_a_pipeline_with_a_truncated_weight_file_names_the_file(tmp_path, capsys):
    pipe = tiny_pipeline("sd")
    pipe.save_pretrained(tmp_path / "base")
    pipe.save_pretrained(tmp_path / "tuned")
    weights = tmp_path / "tuned" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), str(tmp_path / "out.safetensors")]) == 2
    assert f"error: {weights}: not a readable safetensors file (truncated or corrupt?)" in last_error(capsys)
    assert not (tmp_path / "out.safetensors").exists()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "tiny.safetensors"))
    assert main(["extract", str(tmp_path / "tiny.safetensors"), str(tmp_path / "tiny.safetensors"), str(tmp_path / "o.json")]) == 2
    assert "o.json: SHiRA adapters are saved as .safetensors files" in last_error(capsys)


# ---- counts and strengths --------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--num_seeds", "0"], "argument --num_seeds: must be an integer >= 1, got 0"),
    (["--num_inference_steps", "0"], "argument --num_inference_steps: must be an integer >= 1, got 0"),
    (["--batch_size", "-1"], "argument --batch_size: must be an integer >= 1, got -1"),
    (["--resolution", "0"], "argument --resolution: the image size must be a positive multiple of 8, got 0"),
    (["--resolution", "5000"], "argument --resolution: the image size must be at most 4096, got 5000"),
    (["--alphas", "1", "inf"], "argument --alphas: must be a finite number with |x| <= 3.4028234663852886e+38 (float32), got inf"),
    (["--alphas", "nan"], "argument --alphas: must be a finite number"),
    (["--alphas", "3.5e38"], "argument --alphas: must be a finite number with |x| <= 3.4028234663852886e+38 (float32), got 3.5e38"),
    (["--guidance_scale=-inf"], "argument --guidance_scale: must be a finite number"),
])
def test_eval_refuses_counts_below_one_and_strengths_outside_float32(model, tmp_path, capsys, monkeypatch, flags, message):
    import shira_diffusion.evaluation as evaluation

    monkeypatch.setattr(evaluation, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "prompts.txt").write_text("a fox\n")
    args = ["eval", "--pretrained_model_name_or_path", model, "--prompts", str(tmp_path / "prompts.txt"), "--output_dir", str(tmp_path / "o"),
            "--no_score", *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--seeds", "0"], ["--steps", "0"], ["--rank", "0", "--model", "m"], ["--inference_steps", "-2", "--model", "m"]])
def test_demo_refuses_counts_below_one(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "demo"), *flags])
    assert exit_info.value.code == 2 and "must be an integer >= 1" in capsys.readouterr().err


def test_run_evaluation_checks_counts_and_strengths_before_touching_the_pipeline(tmp_path):
    from shira_diffusion.evaluation import Fusion, run_evaluation
    from shira_diffusion.evaluation.prompts import Prompt

    prompts, out = [Prompt("a fox")], tmp_path / "o"
    cases = [
        (dict(seeds=[]), "no seeds"),
        (dict(seeds=[0], num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
        (dict(seeds=[0], include_base=False), "nothing to evaluate"),
        (dict(seeds=[0], alphas=[float("inf")], adapters={"a": "a.safetensors"}), "alpha of a must be a finite number"),
        (dict(seeds=[0], alphas=[3e38], adapters={"a": "a.safetensors", "b": "b.safetensors"}, fusions=[Fusion(("a", "b"), (2.0, 1.0))]),
         r"strength of a in a\+b@2,1 at alpha 3e\+38 must be a finite number with \|x\| <= 3.4028234663852886e\+38"),
        (dict(seeds=[0], alphas=[], adapters={"a": "a.safetensors"}), "no alphas"),
        (dict(seeds=[0], height=0), "height must be None"),
        (dict(seeds=[0], guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    ]
    for kwargs, message in cases:
        kwargs = {"adapters": {}, **kwargs}
        with pytest.raises(ValueError, match=message):
            run_evaluation(None, kwargs.pop("adapters"), prompts, out_dir=out, **kwargs)  # None: the pipeline is never used
    assert not out.exists()
    with pytest.raises(ValueError, match=r"--fusion 'a\+b:1,1e39': weight must be a finite number"):
        Fusion.parse("a+b:1,1e39")


def test_prompt_files_that_are_not_utf8_or_nest_too_deeply_name_the_file(tmp_path):
    from shira_diffusion.evaluation.prompts import load_prompts

    latin = tmp_path / "prompts.txt"
    latin.write_bytes("a caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts.txt: not UTF-8 text"):
        load_prompts(latin)
    bomb = tmp_path / "prompts.json"
    bomb.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"prompts.json: JSON nested too deeply"):
        load_prompts(bomb)
