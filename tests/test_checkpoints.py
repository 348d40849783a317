"""Checkpoints survive kills: each is written to a hidden temp folder and renamed into place when complete,
`--resume_from_checkpoint latest` takes only complete ones, and every output file is replaced atomically."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shira_diffusion.cli import main
from shira_diffusion.testing import tiny_pipeline
from shira_diffusion.durable import host_tag
from shira_diffusion.checkpoints import checkpoint_problem, find_checkpoint, prune_checkpoints
from shira_diffusion.training import TrainingConfig, train

from .helpers import draw_style_folder, one_thread  # noqa: F401  (an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tiny_pipeline("sd").save_pretrained(root / "model")
    return {"model": str(root / "model"), "data": str(draw_style_folder(root / "data", count=4)), "root": root}


SETTINGS = dict(resolution=32, center_crop=True, random_flip=True, train_batch_size=2, max_train_steps=6, learning_rate=3e-2, density=0.2,
                lr_scheduler="constant", lr_warmup_steps=0, report_to="none", checkpointing_steps=2, calibration_batches=2, mask="snip",
                seed=0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"])  # 2 steps per epoch


def config(setup, output_dir, **overrides) -> TrainingConfig:
    return TrainingConfig(pretrained_model_name_or_path=setup["model"], train_data_dir=setup["data"], output_dir=str(output_dir),
                          **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def full(setup):
    """An uninterrupted run: the reference every interrupted one must reproduce exactly."""
    return train(config(setup, setup["root"] / "full"))


def assert_same_file(a: Path, b: Path) -> None:
    """Every tensor bit-identical (torch.equal), the same keys."""
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    different = [key for key in left if not torch.equal(left[key], right[key])]
    assert not different, different[:3]


def test_latest_skips_a_half_written_checkpoint_cleans_temp_folders_and_resumes_exactly(setup, full, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(full.output_dir, cut)
    # As a run killed while writing step 6 leaves things: the adapter not yet written, checkpoint-6 half in its
    # temp folder; and checkpoint-4 as an older version (which wrote in place) left it when killed mid-save.
    (cut / "shira_weights.safetensors").unlink()
    os.replace(cut / "checkpoint-6", cut / ".checkpoint-6.tmp")
    (cut / ".checkpoint-6.tmp" / "scheduler.bin").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (cut / f".README.md.{host_tag()}.{dead}.x1y2z3.tmp").write_text("half a card")  # a killed writer's temp file
    optimizer = cut / "checkpoint-4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"checkpoint-4: incomplete checkpoint \(optimizer.bin is cut short"):
        resumed = train(config(setup, cut, resume_from_checkpoint="latest"))
    assert resumed.global_step == 6 and len(resumed.losses) == 4  # from checkpoint-2
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-6)
    assert_same_file(resumed.adapter_path, full.adapter_path)
    assert sorted(p.name for p in cut.iterdir() if p.name.startswith(".")) == []  # temp leftovers removed
    assert checkpoint_problem(cut / "checkpoint-4") is None and checkpoint_problem(cut / "checkpoint-6") is None  # rewritten


def test_a_crash_while_saving_leaves_no_checkpoint_and_the_next_run_resumes_exactly(setup, full, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    real_save = torch.save
    saves = []

    def crash_on_the_fourth_optimizer_file(obj, f, *args, **kwargs):  # checkpoint-4: optimizer.bin written, then "killed"
        real_save(obj, f, *args, **kwargs)
        saves.append(str(f))
        if str(f).endswith("optimizer.bin") and len([s for s in saves if s.endswith("optimizer.bin")]) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", crash_on_the_fourth_optimizer_file)
    with pytest.raises(KeyboardInterrupt):
        train(config(setup, out))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [".checkpoint-4.tmp", "checkpoint-2"]
    assert find_checkpoint(out, "latest").name == "checkpoint-2"
    resumed = train(config(setup, out, resume_from_checkpoint="latest"))
    assert resumed.global_step == 6 and len(resumed.losses) == 4
    assert_same_file(resumed.adapter_path, full.adapter_path)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_an_explicit_incomplete_checkpoint_is_an_error_before_any_model_loads(setup, full, tmp_path, capsys, monkeypatch):
    from shira_diffusion.training import loop

    monkeypatch.setattr(loop, "load_family", lambda *a, **k: pytest.fail("a model was loaded before the error"))
    out = tmp_path / "explicit"
    shutil.copytree(full.output_dir, out)
    (out / "checkpoint-4" / "random_states_0.pkl").unlink()
    args = ["train", "--pretrained_model_name_or_path", setup["model"], "--train_data_dir", setup["data"], "--output_dir", str(out),
            "--resolution", "32", "--report_to", "none", "--resume_from_checkpoint"]
    for which in ("checkpoint-4", str(out / "checkpoint-4")):
        assert main(args + [which]) == 2
        err = capsys.readouterr().err
        assert "error: --resume_from_checkpoint " in err and "checkpoint-4: incomplete checkpoint (no random_states_0.pkl)" in err
        assert "Traceback" not in err


def test_pruning_counts_only_complete_checkpoints(full, tmp_path):
    for step in (2, 4, 6):
        shutil.copytree(full.output_dir / "checkpoint-2", tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-6" / "trainable.safetensors").unlink()  # an older version's half-written one
    prune_checkpoints(tmp_path, 2)  # room for one more: one complete one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert checkpoint_problem(tmp_path / "checkpoint-6") == "no trainable.safetensors"
    with pytest.warns(UserWarning, match="checkpoint-6: incomplete checkpoint"):
        assert find_checkpoint(tmp_path, "latest").name == "checkpoint-4"


def test_a_crash_while_writing_the_lora_file_keeps_the_previous_one_whole(setup, tmp_path, monkeypatch):
    """diffusers' save_lora_weights writes in place; the trainer has it write beside and renames the whole file."""
    import safetensors.torch

    first = train(config(setup, tmp_path / "lora", adapter="lora", rank=2, max_train_steps=2, checkpointing_steps=0))
    before = first.adapter_path.read_bytes()
    real = safetensors.torch.save_file

    def torn_save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if Path(filename).name == "pytorch_lora_weights.safetensors":
            Path(filename).write_bytes(Path(filename).read_bytes()[:100])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", torn_save)
    with pytest.raises(OSError, match="No space left"):
        train(config(setup, tmp_path / "lora", adapter="lora", rank=2, max_train_steps=3, checkpointing_steps=0))
    assert first.adapter_path.read_bytes() == before
    assert not [p.name for p in first.output_dir.iterdir() if p.name.startswith(".")]


def _train_command(setup, output_dir: Path) -> list[str]:
    flags = {**SETTINGS, "checkpointing_steps": 1, "max_train_steps": 16, "resume_from_checkpoint": "latest"}
    args = [sys.executable, "-m", "shira_diffusion.cli", "train", "--pretrained_model_name_or_path", setup["model"],
            "--train_data_dir", setup["data"], "--output_dir", str(output_dir)]
    for key, value in flags.items():
        args += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return args


def _checkpoints(out: Path) -> int:
    return len(list(out.glob("checkpoint-*"))) if out.is_dir() else 0


def _entries(out: Path) -> set[str]:
    try:
        return set(os.listdir(out))
    except FileNotFoundError:
        return set()


def _run(command: list[str], out: Path, kill_at=None, deadline: float = 240.0) -> tuple[int, str, float]:
    """Run the trainer; `kill_at(elapsed, names in out)` -> True sends SIGKILL. (exit status, stderr, seconds
    until masks.safetensors appeared, i.e. until training could start; inf if it never did)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with open(out.parent / f"{out.name}.stderr", "w+") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        started, ready = time.perf_counter(), float("inf")
        try:
            while process.poll() is None:
                elapsed, names = time.perf_counter() - started, _entries(out)
                assert elapsed < deadline, "the trainer hung"
                if ready == float("inf") and "masks.safetensors" in names:
                    ready = elapsed
                if kill_at is not None and kill_at(elapsed, names):
                    break
                time.sleep(0.002)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
        log.seek(0)
        return process.returncode, log.read(), ready


def _killer(out: Path, rng: random.Random):
    """A seeded kill moment for one run: either while a checkpoint is being written (just after its folder,
    temp or final, appears) or a random moment within the step after the 1st to 3rd new checkpoint."""
    before, saving, seen = _entries(out), rng.random() < 0.6, {}
    target, pause = _checkpoints(out) + rng.randint(1, 3), rng.uniform(0.0, 0.02 if saving else 0.1)

    def kill_at(elapsed: float, names: set[str]) -> bool:
        if saving and any("checkpoint-" in name for name in names - before):
            seen.setdefault("at", elapsed)
        elif not saving and sum(1 for name in names if name.startswith("checkpoint-")) >= target:
            seen.setdefault("at", elapsed)
        return "at" in seen and elapsed > seen["at"] + pause

    return kill_at


@pytest.mark.slow
def test_a_trainer_killed_at_random_moments_always_resumes_to_the_uninterrupted_adapter(setup, tmp_path):
    """SIGKILL `python -m shira_diffusion.cli train` at seeded random moments, restarting it each time with
    --resume_from_checkpoint latest: once while it starts (imports, model loading, masks), then six times during
    training (mostly while a checkpoint is being written). The final adapter is bit-identical to an uninterrupted run's."""
    code, stderr, ready = _run(_train_command(setup, tmp_path / "reference"), tmp_path / "reference")
    assert code == 0 and ready < float("inf"), stderr[-3000:]
    out, rng, states = tmp_path / "killed", random.Random(1234), []
    early = rng.uniform(0.3, 1.0) * ready
    code, stderr, _ = _run(_train_command(setup, out), out, kill_at=lambda elapsed, _: elapsed > early)
    assert code == -signal.SIGKILL and "Traceback" not in stderr, stderr[-3000:]
    for attempt in range(6):
        code, stderr, _ = _run(_train_command(setup, out), out, kill_at=_killer(out, rng))
        assert code in (0, -signal.SIGKILL) and "Traceback" not in stderr, f"attempt {attempt}: exit {code}\n{stderr[-3000:]}"
        states.append(sorted(_entries(out)))
    code, stderr, _ = _run(_train_command(setup, out), out)
    assert code == 0, stderr[-3000:]
    assert _checkpoints(out) == 16, states
    assert_same_file(out / "shira_weights.safetensors", tmp_path / "reference" / "shira_weights.safetensors")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
