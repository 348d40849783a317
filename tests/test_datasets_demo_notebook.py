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
    assert main(["dataset", "check", str(train), "--resolution", "32", "--require-license"]) == 1
    out = capsys.readouterr().out
    assert "train_002_triangle.png: unreadable image" in out
    assert "train_004_ring.png: no caption" in out
    assert "zz_copy.png: exact duplicate of train_000_circle.png" in out
    assert "small.png: 16x16 is smaller than the training resolution 32" in out
    assert "zz_copy.png: no license field" in out
    assert main(["dataset", "check", str(tmp_path / "missing")]) == 2


def test_demo_runs_offline_and_writes_the_report(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "8", "--inference_steps", "2"]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["training"]) == {"shira_blue_glow", "shira_brush", "lora_blue_glow", "lora_brush"}
    counts = {run["trainable_parameters"] for run in results["training"].values()}
    assert len(counts) == 1  # SHiRA r*(m+n) == LoRA rank r: equal trainable parameters
    assert set(results["fusion_retention"]) == {"shira", "lora"}
    assert all(ms > 0 for ms in results["switch_ms"].values())
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Concept retention under fusion" in report and "grid_shira.png" in report
    assert (tmp_path / "demo" / "grid_shira.png").is_file()


def test_notebook_is_committed_without_outputs_and_runs_top_to_bottom():
    from nbclient import NotebookClient

    path = ROOT / "notebooks/multi_style_fusion.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count") for cell in notebook.cells if cell.cell_type == "code")
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "base restored bit for bit after unload: True" in printed
