"""datasets_meta prompt files, `dataset check`, the offline demo and the notebook."""

import json
from pathlib import Path

import nbformat
from PIL import Image

from shira_diffusion.cli import main
from shira_diffusion.datasets import check_dataset, make_style_dataset
from shira_diffusion.evaluation import load_prompts

ROOT = Path(__file__).resolve().parents[1]


def test_validation_prompt_files_have_the_papers_counts():
    bluefire = load_prompts(ROOT / "datasets_meta/bluefire/validation_prompts.json")
    paintings = load_prompts(ROOT / "datasets_meta/paintings/validation_prompts.json")
    assert (len(bluefire), sum(p.seen for p in bluefire)) == (30, 9)
    assert (len(paintings), sum(p.seen for p in paintings)) == (21, 9)
    unseen = {p.concept for p in bluefire if not p.seen}
    assert {"football", "monster", "sword", "chess rook", "lion", "koala"} <= unseen
    assert {"lion", "dog", "cat", "koala", "panda"} <= {p.concept for p in paintings if not p.seen}
    assert all("blue fire style" in p.prompt for p in bluefire) and all("painting style" in p.prompt for p in paintings)
    assert len(load_prompts(ROOT / "datasets_meta/fusion_prompts.json")) >= 5


def test_dataset_check_reports_each_planted_defect_by_name(tmp_path, capsys):
    train, _ = make_style_dataset(tmp_path / "style", "brush", train=6, heldout=1, size=48)
    assert check_dataset(train, resolution=32, require_license=True)[0] == []
    (train / "train_002_triangle.png").write_bytes(b"this is not a png")
    rows = [json.loads(line) for line in (train / "metadata.jsonl").read_text().splitlines()]
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["file_name"] != "train_004_ring.png"))
    (train / "zz_copy.png").write_bytes((train / "train_000_circle.png").read_bytes())
    Image.new("RGB", (16, 16)).save(train / "small.png")
    assert main(["dataset", "check", str(train), "--resolution", "32", "--require_license"]) == 1
    out = capsys.readouterr().out
    assert "train_002_triangle.png: unreadable image" in out
    assert "train_004_ring.png: no caption" in out
    assert "zz_copy.png: exact duplicate of train_000_circle.png" in out
    assert "small.png: 16x16 is smaller than the training resolution 32" in out
    assert "zz_copy.png: no license field" in out
    assert main(["dataset", "check", str(tmp_path / "missing")]) == 2


def test_demo_runs_offline_on_the_world_and_reports_the_judges_numbers(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "20", "--seeds", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    sources = {name: info["source"] for name, info in results["adapters"].items()}
    assert sources == {"shira blue fire": "trained live", "shira painting": "shipped (same recipe)",
                       "lora blue fire": "shipped (same recipe)", "lora painting": "shipped (same recipe)"}
    assert results["adapters"]["shira blue fire"]["steps"] == 20
    base = results["judge"]["base"]
    assert set(base) == {"blue fire", "painting", "fused prompts"}
    assert all(0 <= base[prompts]["styles"][style]["mean"] <= 1 for prompts in base for style in ("blue fire", "painting"))
    for method in ("shira", "lora"):
        table = results["judge"][method]
        assert set(table) == {"blue fire alpha=0.5", "blue fire alpha=1", "painting alpha=0.5", "painting alpha=1", "fused alpha=1", "retention"}
        assert set(table["retention"]) == {"blue fire", "painting"}
        assert (out / f"grid_{method}.png").is_file()
    assert all(ms > 0 for ms in results["switch_ms"].values())
    report = (out / "report.md").read_text()
    assert "trained live" in report and "grid_shira.png" in report and "Concept retention under fusion" in report


def test_demo_with_a_model_folder_runs_the_real_model_flow(tmp_path):
    from shira_diffusion.testing import tiny_pipeline

    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    assert main(["demo", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "demo"), "--steps", "8", "--inference_steps", "2", "--resolution", "32"]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["training"]) == {"shira_blue_glow", "shira_brush", "lora_blue_glow", "lora_brush"}
    assert len({run["trainable_parameters"] for run in results["training"].values()}) == 1  # SHiRA r*(m+n) == LoRA rank r
    assert set(results["fusion_retention"]) == {"shira", "lora"}


def test_demo_live_choices_are_every_method_and_world_style():
    from shira_diffusion.cli.demo import LIVE_CHOICES  # a literal: the CLI module must not import torch
    from shira_diffusion.world import STYLE_SETS
    from shira_diffusion.world.adapters import METHODS

    assert set(LIVE_CHOICES) == {f"{method}:{style}" for method in METHODS for style in STYLE_SETS}


def test_demo_refuses_an_unknown_live_adapter(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--live", "shira:sepia"]) == 2
    assert "--live 'shira:sepia'" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_notebook_is_committed_with_its_images_and_runs_top_to_bottom():
    from nbclient import NotebookClient

    path = ROOT / "notebooks/multi_style_fusion.ipynb"
    notebook = nbformat.read(path, as_version=4)
    committed = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in committed) >= 3  # the grids a reader sees on the repository page
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "base restored bit for bit after unload: True" in printed and "retention of blue fire under fusion" in printed
