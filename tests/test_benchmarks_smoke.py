"""Every benchmark runs in --smoke mode and writes JSON with the machine, its rows and medians."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "switch": ["shira-diffusion ms", "diffusers LoRA ms", "PEFT SHiRA ms"],
    "exactness": ["shira-diffusion max |W-W0|", "diffusers LoRA max |W-W0|"],
    "overhead": ["ms per step", "vs base"],
    "compile": ["recompilations"],
    "training": ["peak memory MB", "steps/s", "memory vs LoRA"],
    "size": ["bytes per parameter"],
    "masks": ["seconds"],
    "eval": ["HPSv2Scorer images/s (incl. one load)", "official pattern timed on", "speed-up"],
    "world_quality": ["shape accuracy", "content accuracy", "painting strength"],
    "fidelity": ["method", "blue fire α=1", "painting retention", "fused content α=1"],
    "cli": ["command", "seconds"],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_smoke(name, tmp_path):
    subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["benchmark"] == name and result["smoke"] is True
    assert {"cpu", "cores", "torch", "gpu"} <= set(result["machine"])
    assert result["rows"] and all(any(column in row for row in result["rows"]) for column in EXPECTED[name])
    assert (tmp_path / f"{name}.md").read_text().startswith(f"### {name}")
    if name == "exactness":
        assert all(row["shira-diffusion max |W-W0|"] == 0.0 for row in result["rows"])
    if name == "size":
        ours = next(r for r in result["rows"] if r["file"] == "shira-diffusion fp16")
        peft = next(r for r in result["rows"] if r["file"].startswith("PEFT"))
        assert ours["bytes per parameter"] < peft["bytes per parameter"]
    if name == "compile":  # switching sets and hotswapping from files: no recompilation
        assert [row["recompilations"] for row in result["rows"][:2]] == [0, 0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_usage_error(tmp_path):
    found = subprocess.run([sys.executable, "-m", "benchmarks.switch", "--smoke", "--device", "cuda", "--out", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert found.returncode == 2 and "--device cuda: torch sees no CUDA device" in found.stderr
    assert "Traceback" not in found.stderr and not list(tmp_path.iterdir())
