"""Training checkpoints that survive a kill: written whole or not at all, and only complete ones resumed from.

Invariant: `checkpoint-N` exists only once every process wrote and flushed its files (`save_checkpoint` writes a
hidden `.checkpoint-N.tmp` and renames it); `find_checkpoint(..., "latest")` and pruning consider complete ones
only, skipping with a warning a folder an older version (which wrote in place) or a person left incomplete.

Usage:
    save_checkpoint(accelerator, output_dir, step, limit); path = find_checkpoint(output_dir, "latest")
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .durable import fsync_directory, fsync_tree, remove_stale_temp_files
from .trainables import ConfigError

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# Files every complete checkpoint holds, whatever the launch (DeepSpeed / FSDP keep the optimizer in their own
# layout): our save hook's tensors, written first, and accelerate's RNG states, written last by save_state.
CHECKPOINT_FILES = ("trainable.safetensors", "noise_generator_0.safetensors", "random_states_0.pkl")
# Hidden folders of checkpoints / LoRA files being written (save_checkpoint, the trainer's adapter save); a killed
# run leaves them.
STALE_FOLDER = re.compile(r"\.checkpoint-\d+\.(tmp|old)|\.lora\.tmp")


def find_checkpoint(output_dir: Path, which: str) -> Path | None:
    """`which` as a folder (or a name inside output_dir); 'latest' -> the highest complete checkpoint-N or None.

    An explicit checkpoint that is incomplete is an error; 'latest' skips incomplete ones with a warning."""
    if which != "latest":
        path = Path(which)
        path = path if path.is_dir() else output_dir / which
        if not path.is_dir() or not CHECKPOINT_NAME.fullmatch(path.name):
            raise FileNotFoundError(f"{which}: no such checkpoint folder (expected output_dir/checkpoint-N or 'latest')")
        problem = checkpoint_problem(path)
        if problem:
            raise ConfigError(f"--resume_from_checkpoint {path}: incomplete checkpoint ({problem}), cut off while it was being "
                              "written; give an earlier checkpoint-N or 'latest'")
        return path
    for path in reversed(numbered_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"{path}: incomplete checkpoint ({problem}), skipped; resuming from an earlier one", stacklevel=2)
    return None


def numbered_checkpoints(output_dir: Path) -> list[Path]:
    """output_dir's checkpoint-N folders by N; other names (a user's checkpoint-best) are not the run's."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (a file missing or cut short), or None when it is complete.

    Checkpoints are renamed into place only once written, so this matters for folders left by older versions
    (written in place) and by hand. Cheap: the first and last files save_state writes must be there, safetensors
    headers must cover their files, and accelerate's torch.save files (optimizer.bin, scheduler.bin, ...: zip
    archives) need their end-of-archive record, which a cut-short file lacks."""
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"no {name}"
    for file in sorted(path.iterdir()):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), "pt"):
                    pass
            except (SafetensorError, OSError):
                return f"{file.name} is cut short or unreadable"
        elif file.suffix in (".bin", ".pkl") and not zipfile.is_zipfile(file):
            return f"{file.name} is cut short or unreadable"
    return None


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep at most limit - 1 complete checkpoints, making room for the one about to be written. Incomplete
    ones are not counted (they cannot be resumed from) and are left for the user to inspect."""
    if not limit:
        return
    found = [p for p in numbered_checkpoints(output_dir) if checkpoint_problem(p) is None]
    for old in found[: max(0, len(found) - limit + 1)]:
        shutil.rmtree(old)


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None, output_files: tuple[str, ...] = ()) -> Path:
    """accelerator.save_state into a hidden temp folder, renamed to checkpoint-<step> once every process wrote and
    synced its files: a kill at any moment leaves either no checkpoint-<step> or a complete one."""
    final, temp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        remove_stale_temps(output_dir, output_files)
        prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()  # the temp folder is fresh before any process writes into it
    accelerator.save_state(str(temp))
    fsync_tree(temp)  # each process its own files (on a shared file system, all of them)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # resumed from an earlier checkpoint: this step's old one is replaced
            aside = output_dir / f".checkpoint-{step}.old"
            os.replace(final, aside)
            os.replace(temp, final)
            shutil.rmtree(aside)
        else:
            os.replace(temp, final)
        fsync_directory(output_dir)
    accelerator.wait_for_everyone()
    return final


def remove_stale_temps(output_dir: Path, output_files: tuple[str, ...] = ()) -> None:
    """What a killed run left half-written in output_dir: checkpoint / LoRA temp folders (never complete, never
    read) and the temp files of its atomic writes of `output_files` and validation images (durable removes those
    of writers that no longer run)."""
    for entry in output_dir.iterdir():
        if STALE_FOLDER.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
    for name in output_files:
        remove_stale_temp_files(output_dir / name)
    validation = output_dir / "validation"
    if validation.is_dir():  # temp names start with "." + the target's name
        for target in {m.group(1) for e in validation.iterdir() if (m := re.match(r"\.(step-\d+-\d+\.png)\.", e.name))}:
            remove_stale_temp_files(validation / target)


class TrainedState:
    """What a checkpoint holds besides accelerate's optimizer, scheduler, sampler and RNG states: the trained
    tensors (not the frozen base model), the run's seed and each process's noise generator. Registered as
    accelerate's save / load pre-hooks.

    Usage: state = TrainedState(accelerator, named_parameters, noise_generator, seed); state.register()
    """

    FILE = "trainable.safetensors"

    def __init__(self, accelerator, named: list, noise_generator, seed: int):
        self.accelerator, self.named, self.noise_generator, self.seed = accelerator, named, noise_generator, seed

    def register(self) -> None:
        self.accelerator.register_save_state_pre_hook(self.save)
        self.accelerator.register_load_state_pre_hook(self.load)

    def _generator_file(self, directory) -> str:
        return str(Path(directory) / f"noise_generator_{self.accelerator.process_index}.safetensors")

    def save(self, models, weights, directory) -> None:
        from safetensors.torch import save_file

        weights.clear()  # accelerate would save every model whole, frozen weights included
        if self.accelerator.is_main_process:
            tensors = {name: p.detach().contiguous() for name, p in self.named}
            save_file(tensors, str(Path(directory) / self.FILE), metadata={"seed": str(self.seed)})
        save_file({"state": self.noise_generator.get_state()}, self._generator_file(directory))

    def load(self, models, directory) -> None:
        import torch
        from safetensors.torch import load_file

        models.clear()
        state = load_file(str(Path(directory) / self.FILE))
        missing = [name for name, _ in self.named if name not in state]
        if missing:
            raise ConfigError(f"{directory}: checkpoint does not match this run (no {missing[0]!r}); same --adapter / --mask / targets?")
        with torch.no_grad():
            for name, p in self.named:
                p.copy_(state[name])
        self.noise_generator.set_state(load_file(self._generator_file(directory))["state"])


def checkpoint_seed(path: Path) -> int | None:
    """The seed a checkpoint's run used (None for checkpoints of older versions, which did not record it)."""
    with safe_open(str(path / TrainedState.FILE), "pt") as handle:
        seed = (handle.metadata() or {}).get("seed")
    return int(seed) if seed not in (None, "None") else None
