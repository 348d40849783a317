"""Generate and score every prompt x seed x alpha for the base model, each adapter alone and each fusion.

One pipeline is loaded once; SHiRA adapters are loaded once each and switched with `set_shira_adapters`
(fusion = several active with weights x alpha); LoRA files go through diffusers' own loader and run unfused
with `set_adapters` at the same strengths (as diffusers users run them; fuse/unfuse would leave rounding
drift in the base weights for the settings after it). The pipeline is returned as it came in, also when the
run fails: the adapters this call loaded are unloaded and the SHiRA adapters that were active before are
active again.

Work is keyed by (setting, alpha, prompt, seed), where a fusion's setting label carries its weights
(`a+b@0.7,0.5`): images and scores already on disk are not redone, and records without a score are scored
when a later run has a scorer. The settings the records depend on (model, steps, guidance, size, scheduler,
dtype, seed policy, adapter files, HPS version / model / checkpoint) are kept in `run_settings.json`; a
resume with other settings is refused (use a new `out_dir`, or `overwrite=True` / `--overwrite`).
Under `accelerate launch` each process takes a share of the work and the main process merges the records.

Outputs in `out_dir`: `images/`, `records.jsonl` and `records.csv` (one row per image), `summary.md` and
`summary.csv` (mean ± std of HPS x 100 per setting and alpha; std over images, ddof=1), `grids/`
(per prompt: rows = settings with their alpha, columns = seeds, labelled on a margin; tiles at most
GRID_TILE px, at most GRID_SEEDS seeds per file and more files when one would pass PIL's
Image.MAX_IMAGE_PIXELS, so every grid opens with PIL), `score_vs_alpha.png` and `run_settings.json`.

While it runs, the pipeline's own denoising bar is off (the run's "images" bar is the one display) and two
third-party messages the user cannot act on are dropped: diffusers' "No LoRA keys associated to CLIPTextModel
found with the prefix='text_encoder'" (a UNet-only LoRA) and PEFT's "Already found a `peft_config` attribute"
(a second LoRA in the same model). Both are restored afterwards; nothing else is filtered.

Usage:
    result = run_evaluation(pipe, {"bluefire": "bluefire.safetensors"}, load_prompts("prompts.json"),
                            seeds=range(30), out_dir="eval", scorer=HPSv2Scorer())
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..diffusers_verbs import lora_only
from ..grids import pixel_limit
from ..quiet import quiet_libraries
from ..format import METADATA_KEY, SHIRA_WEIGHT_NAME
from .hps import require_extra
from .prompts import Prompt

BASE = "base"
SETTINGS_NAME = "run_settings.json"
SEED_POLICY = "torch.Generator('cpu').manual_seed(seed), one per image"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RESERVED = set("+@,:|/\\= ")  # characters that would make labels, keys or image paths ambiguous
FLOAT32_MAX = 3.4028234663852886e38  # strengths are applied to float32 (or narrower) weights
OUTPUTS = ("records.jsonl", "records.csv", "summary.md", "summary.csv", "score_vs_alpha.png", SETTINGS_NAME)
GRID_TILE = 256  # longest tile side in grids: they are for looking over a run; the full-size images are in images/
GRID_SEEDS = 10  # seeds (columns) per grid file at most: wider grids are unreadable on a screen
GRID_PAD = 4  # px around grid labels
@dataclass(frozen=True)
class Fusion:
    """Several adapters active together, e.g. Fusion(("bluefire", "paintings"), (0.7, 0.5)); alpha scales all."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    @property
    def label(self) -> str:
        """'a+b' when every weight is 1, else 'a+b@0.7,0.5': fusions with other weights never share a label."""
        joined = "+".join(self.names)
        if all(w == 1.0 for w in self.weights):
            return joined
        return joined + "@" + ",".join(f"{w:g}" if float(f"{w:g}") == w else repr(w) for w in self.weights)

    @classmethod
    def parse(cls, text: str) -> "Fusion":
        """'a+b' (weights 1) or 'a+b:0.7,0.5'. Usage: Fusion.parse("bluefire+paintings:0.7,0.5")"""
        names, _, weights = text.partition(":")
        parts = tuple(n for n in names.split("+") if n)
        try:
            values = tuple(float(w) for w in weights.split(",")) if weights else (1.0,) * len(parts)
        except ValueError:
            raise ValueError(f"--fusion {text!r}: weights must be numbers (expected 'name1+name2[:w1,w2]')") from None
        if len(parts) < 2 or len(values) != len(parts):
            raise ValueError(f"--fusion {text!r}: expected 'name1+name2[:w1,w2]' with one weight per adapter")
        for value in values:
            _check_strength(f"--fusion {text!r}: weight", value)
        return cls(parts, values)


def _check_strength(what: str, value: float) -> None:
    """A strength (alpha, fusion weight or their product) must be finite and fit float32: inf / nan would
    silently turn every adapted weight into inf / nan."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise ValueError(f"{what} must be a finite number with |x| <= {FLOAT32_MAX!r} (float32), got {value!r}")


def _check_run_config(seeds: Sequence[int], alphas: Sequence[float], adapters: Mapping, settings: Sequence[tuple], steps: int,
                      guidance: float, height, width) -> None:
    """Every count >= 1 and every number usable, before a model runs or anything is written (a count of zero
    would 'succeed' having done nothing)."""
    if not seeds:
        raise ValueError("no seeds: give at least one seed (--seeds / --num_seeds >= 1)")
    if adapters and not alphas:
        raise ValueError("no alphas: give at least one adapter strength (--alphas)")
    if not settings:
        raise ValueError("nothing to evaluate: no adapters, no fusions and the base model left out (--no_base)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    _check_strength("guidance_scale", guidance)
    for name, size in (("height", height), ("width", width)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be None (the model's) or an integer >= 1, got {size!r}")
    for label, strengths, alpha in settings:
        _check_strength(f"alpha of {label}", alpha)
        for name, strength in strengths.items():
            _check_strength(f"strength of {name} in {label} at alpha {alpha!r}", strength)


@dataclass
class EvaluationResult:
    out_dir: Path
    records: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    generated: int = 0  # images made by this call (the rest came from disk)
    scored: int = 0  # records scored by this call


def resolve_adapter(name: str, path: str | Path) -> tuple[Path, str]:
    """(the .safetensors file, 'shira' or 'lora') for a file or a training output folder; errors name the adapter.
    Usage: file, kind = resolve_adapter("bluefire", "out/bluefire")"""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        candidates = [path / SHIRA_WEIGHT_NAME, path / LORA_WEIGHT_NAME]
        found = [p for p in candidates if p.is_file()] or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(
                f"adapter {name}: {path} is a folder with {'no' if not found else 'several'} .safetensors files"
                f"{'' if not found else ' (' + ', '.join(p.name for p in found) + ')'}; pass the file itself"
            )
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"adapter {name}: {path}: no such file or folder")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if METADATA_KEY in (handle.metadata() or {}):
                return path, "shira"
            if any("lora" in key for key in handle.keys()):
                return path, "lora"
    except (SafetensorError, OSError) as error:
        raise ValueError(f"adapter {name}: {path}: not a readable .safetensors file ({error})") from None
    raise ValueError(f"adapter {name}: {path}: neither a SHiRA adapter nor a LoRA file")


def adapter_kind(path: str | Path) -> str:
    """'shira' or 'lora', from the safetensors header and key names. Usage: adapter_kind("style.safetensors")"""
    return resolve_adapter(Path(path).stem, path)[1]


def fingerprint(path: str | Path) -> str:
    """Size + SHA-256 of the first and last MiB: tells files apart in milliseconds, even 2 GB checkpoints."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 1 << 20:
            handle.seek(max(1 << 20, size - (1 << 20)))
            digest.update(handle.read())
    return f"{size}:{digest.hexdigest()[:16]}"


def _check_names(names: Iterable[str], fusions: Sequence[Fusion]) -> None:
    for name in names:
        if not name or name == BASE or RESERVED & set(name):
            raise ValueError(f"adapter name {name!r}: must be non-empty, not {BASE!r}, and free of {''.join(sorted(RESERVED))!r}")
    labels = [f.label for f in fusions]
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(f"fusion {label} is given twice")


def _settings(names: Sequence[str], fusions: Sequence[Fusion], alphas: Sequence[float], include_base: bool):
    """(label, {adapter: strength}, alpha) for every setting to evaluate."""
    settings = [(BASE, {}, 0.0)] if include_base else []
    for alpha in alphas:
        settings += [(name, {name: alpha}, alpha) for name in names]
        settings += [(f.label, {n: alpha * w for n, w in zip(f.names, f.weights)}, alpha) for f in fusions]
    return settings


def _key(label: str, alpha: float, prompt_index: int, seed: int) -> str:
    return f"{label}|{alpha:g}|{prompt_index}|{seed}"


def _plain(value: Any) -> Any:
    """JSON round trip (tuples -> lists, dtypes -> str) so stored and current settings compare equal."""
    return json.loads(json.dumps(value, default=str))


def _scorer_settings(scorer) -> dict | None:
    if scorer is None:
        return None
    settings = {"scorer": type(scorer).__name__, "version": getattr(scorer, "version", None), "model": getattr(scorer, "model_name", None)}
    if getattr(scorer, "version_source", None):  # 'file name', 'given', 'default' or 'assumed' (see hps.py)
        settings["version_source"] = scorer.version_source
    checkpoint = getattr(scorer, "checkpoint", None)
    if checkpoint is not None:
        settings["checkpoint"] = Path(checkpoint).name
        settings["checkpoint_fingerprint"] = fingerprint(checkpoint)
    return settings


def _run_settings(pipe, model_id: str, steps: int, guidance: float, height, width, files: Mapping[str, Path], scorer, extra) -> dict:
    scheduler = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return _plain({
        "model": model_id, **dict(extra or {}), "num_inference_steps": steps, "guidance_scale": guidance,
        "height": height, "width": width, "scheduler": {"class": type(pipe.scheduler).__name__, **scheduler},
        "dtype": str(pipe.dtype), "device": torch.device(pipe.device).type, "seed_policy": SEED_POLICY,
        "adapters": {name: fingerprint(path) for name, path in files.items()}, "hps": _scorer_settings(scorer),
    })


def _differences(stored: Mapping, current: Mapping) -> list[str]:
    """What differs between the settings on disk and now; new adapters and a first scorer are extensions."""
    out = []
    for key, now in current.items():
        before = stored.get(key)
        if key == "adapters":
            out += [f"adapter {n}: the file changed" for n in now if n in (before or {}) and before[n] != now[n]]
        elif key == "hps":  # how the version was decided is not part of the results: a guess confirmed later is fine
            if before and now:
                out += [f"hps {k}: {before.get(k)!r} before, {now.get(k)!r} now" for k in sorted(set(before) | set(now))
                        if k != "version_source" and before.get(k) != now.get(k)]
        elif isinstance(now, dict) and isinstance(before, dict):
            out += [f"{key} {k}: {before.get(k)!r} before, {now.get(k)!r} now" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        elif before != now:
            out.append(f"{key}: {before!r} before, {now!r} now")
    return out


def _read_records(path: Path) -> dict[str, dict]:
    done = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done[record["key"]] = record
        except (json.JSONDecodeError, TypeError, KeyError, RecursionError) as error:  # RecursionError: absurd nesting
            raise ValueError(f"{path} line {number}: not a record ({type(error).__name__}: {error}); fix or delete the file") from None
    return done


def _prepare_out_dir(out_dir: Path, current: dict, prompts: Sequence[Prompt], overwrite: bool) -> tuple[dict, dict]:
    """(records already on disk, settings to store); raises ValueError when the folder holds other settings."""
    records_path, settings_path = out_dir / "records.jsonl", out_dir / SETTINGS_NAME
    if overwrite:
        return {}, current
    done = _read_records(records_path) if records_path.is_file() else {}
    if not settings_path.is_file():
        if done:
            raise ValueError(f"{records_path} has no {SETTINGS_NAME} next to it (made by an older version): use a new output folder, or --overwrite / overwrite=True to discard it")
        return done, current
    try:
        stored = json.loads(settings_path.read_text())
    except (json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{settings_path}: not valid JSON ({error}); use a new output folder or --overwrite") from None
    problems = _differences(stored, current)
    for record in done.values():
        index = record.get("prompt_index")
        if isinstance(index, int) and index < len(prompts):
            now = prompts[index]
            if record.get("prompt") != now.prompt:
                problems.append(f"prompt {index}: {record.get('prompt')!r} before, {now.prompt!r} now")
                break
            if (record.get("concept"), record.get("seen")) != (now.concept, now.seen):  # the summary groups by them
                problems.append(f"prompt {index} ({now.prompt!r}): concept {record.get('concept')!r}, seen {record.get('seen')!r} "
                                f"before, concept {now.concept!r}, seen {now.seen!r} now")
                break
    if problems:
        raise ValueError(
            f"{out_dir} holds results made with other settings ({'; '.join(problems)}): use a new output folder "
            "(--output_dir), or --overwrite / overwrite=True to discard them"
        )
    # the scorer settings of this call when it has one (they equal the stored ones, bar a now-confirmed version)
    merged = {**current, "adapters": {**stored.get("adapters", {}), **current["adapters"]}, "hps": current["hps"] or stored.get("hps")}
    return done, merged


def _clear_outputs(out_dir: Path) -> None:
    """--overwrite: remove what earlier runs wrote here (and only that)."""
    for name in OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    for part in out_dir.glob("records.part*.jsonl"):
        part.unlink()
    for folder in ("images", "grids"):
        if (out_dir / folder).is_dir():
            shutil.rmtree(out_dir / folder)


@contextmanager
def pipeline_bar_off(pipe) -> Iterator[None]:
    """The pipeline's per-image denoising bar off inside the block (the caller shows its own), then its
    configuration as before. Usage: with pipeline_bar_off(pipe): pipe(prompt)"""
    # diffusers keeps the configuration in `_progress_bar_config` and has no getter; absent means the default {}
    before = dict(getattr(pipe, "_progress_bar_config", None) or {})
    pipe.set_progress_bar_config(**{**before, "disable": True})
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**before)


class _PipeState:
    """Loads this run's adapters and gives the pipeline back as it came in (`restore`, also after a failure)."""

    def __init__(self, pipe, files: Mapping[str, Path], kinds: Mapping[str, str]):
        self.pipe, self.files, self.kinds = pipe, files, kinds
        self.engine = pipe.shira_engine
        self.prior_active, self.prior_enabled = list(self.engine.active), self.engine.enabled
        self.shira_loaded: list[str] = []
        self.lora_loaded = False
        clash = [n for n, k in kinds.items() if k == "shira" and n in self.engine.alphas]
        if clash:
            raise ValueError(f"adapter {clash[0]}: the pipeline already has a SHiRA adapter of that name; unload it or rename --adapter")
        if "lora" in kinds.values():
            existing = {n for names in lora_only(pipe, "get_list_adapters")().values() for n in names}
            if existing or getattr(pipe, "num_fused_loras", 0):
                raise ValueError(f"the pipeline already has LoRA adapters ({sorted(existing) or 'fused'}): unload them before evaluating LoRA files")

    def load(self) -> None:
        if not self.prior_enabled:
            self.engine.set_enabled(True)
        for name, path in self.files.items():  # each adapter is loaded once; switching never reloads anything
            if self.kinds[name] == "shira":
                self.pipe.load_shira_weights(path, adapter_name=name)
                self.shira_loaded.append(name)
            else:
                self.lora_loaded = True  # set first: a half-done load is cleaned up too
                with quiet_libraries():  # UNet-only LoRA files; several LoRAs in one UNet
                    self.pipe.load_lora_weights(str(path), adapter_name=name)

    def activate(self, strengths: Mapping[str, float]) -> None:
        shira = {n: s for n, s in strengths.items() if self.kinds[n] == "shira"}
        lora = {n: s for n, s in strengths.items() if self.kinds[n] == "lora"}
        self.pipe.set_shira_adapters(list(shira), list(shira.values()))
        if lora:  # diffusers' verbs on the LoRA layers only: theirs would switch the SHiRA adapters too
            lora_only(self.pipe, "enable_lora")()
            lora_only(self.pipe, "set_adapters")(list(lora), adapter_weights=list(lora.values()))
        elif self.lora_loaded:
            lora_only(self.pipe, "disable_lora")()

    def restore(self) -> None:
        if self.lora_loaded:
            lora_only(self.pipe, "unload_lora_weights")()  # removes the LoRA layers: the modules are the original ones again
        if self.shira_loaded:
            self.pipe.unload_shira_weights(self.shira_loaded)  # bit-exact
        self.engine.set_active({name: self.engine.alphas[name] for name in self.prior_active})
        if self.engine.enabled != self.prior_enabled:
            self.engine.set_enabled(self.prior_enabled)


def run_evaluation(
    pipe,
    adapters: Mapping[str, str | Path],
    prompts: Sequence[Prompt],
    seeds: Iterable[int],
    out_dir: str | Path,
    scorer=None,
    alphas: Sequence[float] = (1.0, 0.75, 0.5),
    fusions: Sequence[Fusion] = (),
    include_base: bool = True,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    model_id: str = "",
    overwrite: bool = False,
    extra_settings: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Run (or resume) an evaluation. `pipe` must have the SHiRA methods (`add_shira_support`); it is left as it
    came in. `adapters` maps names to .safetensors files or training output folders; `extra_settings` (e.g.
    revision, variant) are stored with the run settings and must match on resume.
    Usage: run_evaluation(pipe, {"a": "a.safetensors"}, prompts, range(4), "eval", scorer=HPSv2Scorer())"""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    seeds = list(seeds)
    _check_names(adapters, fusions)
    _check_run_config(seeds, alphas, adapters, _settings(list(adapters), fusions, alphas, include_base), num_inference_steps,
                      guidance_scale, height, width)
    resolved = {name: resolve_adapter(name, path) for name, path in adapters.items()}
    files, kinds = {n: f for n, (f, _) in resolved.items()}, {n: k for n, (_, k) in resolved.items()}
    for fusion in fusions:
        unknown = [n for n in fusion.names if n not in adapters]
        if unknown:
            raise ValueError(f"fusion {fusion.label}: unknown adapter {unknown[0]!r} (adapters: {sorted(adapters)})")
        if len({kinds[n] for n in fusion.names}) > 1:
            raise ValueError(f"fusion {fusion.label}: mixes SHiRA and LoRA adapters")
    pipe_state = _PipeState(pipe, files, kinds)  # checks the pipeline before anything is written
    state = PartialState()
    current = _run_settings(pipe, model_id, num_inference_steps, guidance_scale, height, width, files, scorer, extra_settings)
    done, settings = _prepare_out_dir(out_dir, current, prompts, overwrite)  # every process checks, before any write
    if scorer is not None or any(r.get("score") is not None for r in done.values()):  # the plot: checked now, not after hours
        require_extra("matplotlib", "the evaluation's score-vs-alpha plot")
    state.wait_for_everyone()
    if state.is_main_process:
        if overwrite:
            _clear_outputs(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    state.wait_for_everyone()

    setting_list = _settings(list(adapters), fusions, alphas, include_base)
    work, requested = [], set()
    for label, strengths, alpha in setting_list:
        for index in range(len(prompts)):
            for seed in seeds:
                requested.add(_key(label, alpha, index, seed))
                record = done.get(_key(label, alpha, index, seed))
                if record is None or (scorer is not None and record.get("score") is None):
                    work.append((label, strengths, alpha, index, seed))
    version = getattr(scorer, "version", None)
    new_records, generated = [], 0
    try:
        pipe_state.load()
        with state.split_between_processes(work) as share, pipeline_bar_off(pipe):
            progress = tqdm(total=len(share), desc="images", disable=not state.is_local_main_process)
            by_setting: dict[tuple, list] = {}
            for item in share:
                by_setting.setdefault((item[0], item[2]), []).append(item)
            for (label, alpha), items in by_setting.items():
                strengths, active = items[0][1], False
                images, rows = [], []
                for _, _, _, index, seed in items:
                    path = out_dir / "images" / label / f"alpha{alpha:g}" / f"p{index:03d}-s{seed}.png"
                    if path.is_file():  # made by an earlier run with the same settings (run_settings.json)
                        image = Image.open(path).convert("RGB")
                    else:
                        if not active:  # settings whose images all exist (re-scoring) never switch
                            pipe_state.activate(strengths)
                            active = True
                        generator = torch.Generator(device="cpu").manual_seed(seed)
                        image = pipe(prompts[index].prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                     height=height, width=width, generator=generator).images[0]
                        path.parent.mkdir(parents=True, exist_ok=True)
                        image.save(path)
                        generated += 1
                    images.append(image)
                    rows.append({
                        "key": _key(label, alpha, index, seed), "prompt": prompts[index].prompt, "prompt_index": index,
                        "concept": prompts[index].concept, "seen": prompts[index].seen, "seed": seed, "alpha": alpha,
                        "adapters": label, "weights": strengths, "model": model_id, "steps": num_inference_steps,
                        "guidance": guidance_scale, "hps_version": version, "image": str(path.relative_to(out_dir)),
                    })
                    progress.update(1)
                if scorer is not None:
                    for row, score in zip(rows, scorer.score(images, [r["prompt"] for r in rows])):
                        row["score"] = score
                new_records += rows
            progress.close()
    finally:
        pipe_state.restore()
    part = out_dir / f"records.part{state.process_index}.jsonl"
    part.write_text("".join(json.dumps(r) + "\n" for r in new_records))
    state.wait_for_everyone()
    result = EvaluationResult(out_dir, generated=generated, scored=sum("score" in r for r in new_records))
    if state.is_main_process:
        for index in range(state.num_processes):
            part = out_dir / f"records.part{index}.jsonl"
            done.update(_read_records(part))
            part.unlink()
        order = {(label, alpha): i for i, (label, _, alpha) in enumerate(setting_list)}
        everything = sorted(done.values(), key=lambda r: (order.get((r["adapters"], r["alpha"]), len(order)), r["adapters"], -r["alpha"], r["prompt_index"], r["seed"]))
        (out_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in everything))  # all, for later runs
        result.records = [r for r in everything if r["key"] in requested]  # the reports cover what this call asked for
        result.summary = summarize_records(result.records)
        write_reports(out_dir, result.records, result.summary, prompts, seeds, note=_version_note(settings.get("hps")))
    state.wait_for_everyone()
    return result


def summarize_records(records: Sequence[Mapping]) -> list[dict]:
    """Mean ± std (ddof=1) of the scores per (setting, alpha), in first-seen order (run_evaluation writes the
    records base first, then per alpha each adapter and each fusion in the order given).
    Usage: rows = summarize_records(result.records)"""
    groups: dict[tuple[str, float], list[float]] = {}
    for record in records:
        if record.get("score") is not None:
            groups.setdefault((record["adapters"], record["alpha"]), []).append(float(record["score"]))
    return [
        {"adapters": label, "alpha": alpha, "n": len(scores), "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0}
        for (label, alpha), scores in groups.items()
    ]


def _version_note(hps: Mapping | None) -> str | None:
    """The line summary.md adds when the HPS version was not known but assumed (an unofficial file name)."""
    if not hps or hps.get("version_source") != "assumed":
        return None
    return (f"HPS version {hps.get('version')} is assumed, not known: the checkpoint {hps.get('checkpoint')} does not have an "
            "official file name (HPS_v2_compressed.pt = v2.0, HPS_v2.1_compressed.pt = v2.1). Pass --hps_version to state it.")


def summary_markdown(records: Sequence[Mapping], summary: Sequence[Mapping], note: str | None = None) -> str:
    """The paper-format table: rows = settings, columns = alpha (the base score in each column); a plain note
    when nothing is scored; `note` (e.g. an assumed HPS version) goes under the title.
    Usage: text = summary_markdown(result.records, result.summary)"""
    if not summary:
        return (f"No HPSv2 scores yet: {len(records)} images were generated without scoring (--no_score). "
                "Run the same command with a scorer (--hps_checkpoint, or the default checkpoint) to score them.\n")
    alphas = sorted({row["alpha"] for row in summary if row["adapters"] != BASE}, reverse=True)
    labels = list(dict.fromkeys(row["adapters"] for row in summary))
    cell = {(row["adapters"], row["alpha"]): f"{row['mean']:.1f} ± {row['std']:.1f}" for row in summary}
    version = next((r.get("hps_version") for r in records if r.get("hps_version")), None)
    unscored = sum(r.get("score") is None for r in records)
    lines = [f"HPSv2{f' {version}' if version else ''} x 100, mean ± std over images (n per cell in summary.csv)", ""]
    if note:
        lines[1:1] = ["", f"Note: {note}"]
    columns = [f"α={a:g}" for a in alphas] or ["score"]
    lines.append("| adapters | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for label in labels:
        if label == BASE:
            lines.append("| base | " + " | ".join(cell.get((BASE, 0.0), "") for _ in columns) + " |")
        else:
            lines.append(f"| {label} | " + " | ".join(cell.get((label, a), "") for a in alphas) + " |")
    if unscored:
        lines += ["", f"{unscored} images are not scored yet (generated with --no_score)."]
    return "\n".join(lines) + "\n"


def write_reports(out_dir: Path, records: Sequence[Mapping], summary: Sequence[Mapping], prompts: Sequence[Prompt], seeds: Sequence[int],
                  note: str | None = None) -> None:
    """records.csv, summary.md / .csv (paper format: rows = adapter sets, columns = alpha), grids, plot.
    Usage: write_reports(Path("eval"), result.records, result.summary, prompts, seeds)"""
    columns = ["prompt", "prompt_index", "concept", "seen", "seed", "alpha", "adapters", "weights", "hps_version", "model", "steps", "guidance", "score", "image"]
    with open(out_dir / "records.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({**record, "weights": json.dumps(record["weights"])})
    with open(out_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["adapters", "alpha", "n", "mean", "std"])
        writer.writeheader()
        writer.writerows(summary)
    (out_dir / "summary.md").write_text(summary_markdown(records, summary, note))
    write_grids(out_dir, records, prompts, seeds)
    if summary:  # images generated without scoring have nothing to plot
        _write_plot(out_dir, summary)


def _grid_font(size: int):
    """PIL's default font at `size` px (Pillow >= 10.1 with FreeType), else its fixed bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def grid_layout(rows: int, seeds: int, image_size: tuple[int, int], margin: tuple[int, int], limit: int) -> tuple[int, int, tuple[int, int]]:
    """(rows per file, seeds per file, tile size) for a grid of `rows` settings x `seeds` seeds with label
    margins (left, top), so that no file has more than `limit` pixels: tiles at most GRID_TILE px, at most
    GRID_SEEDS seeds per file, fewer seeds and then smaller tiles (down to 16 px) if even one row is too big.
    Usage: per_file, seeds_per_file, tile = grid_layout(13, 30, (512, 512), (120, 40), Image.MAX_IMAGE_PIXELS)"""
    scale = min(1.0, GRID_TILE / max(image_size))
    tile = (max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale)))
    left, top = margin
    columns = min(seeds, GRID_SEEDS)
    while (left + columns * tile[0]) * (top + tile[1]) > limit and (columns > 1 or min(tile) > 16):
        if columns > 1:
            columns -= 1
        else:
            tile = (max(8, tile[0] // 2), max(8, tile[1] // 2))
    fitting = (limit // (left + columns * tile[0]) - top) // tile[1]
    return max(1, min(rows, fitting)), columns, tile


def _chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def _fit_text(draw, text: str, width: int, font) -> str:
    """`text`, shortened with '...' until it fits in `width` px."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-4] + "..." if len(text) > 4 else ""
    return text


def _labelled_grid(tiles: list[list[Image.Image | None]], row_labels: list[str], column_labels: list[str], title: str,
                   tile: tuple[int, int], margin: tuple[int, int], font) -> Image.Image:
    """diffusers' make_image_grid of the tiles (a missing image is a grey tile) on a white canvas with the
    title and the column labels above and the row labels to the left."""
    from diffusers.utils import make_image_grid
    from PIL import ImageDraw

    blank = Image.new("RGB", tile, (220, 220, 220))
    flat = [image.resize(tile, Image.Resampling.LANCZOS) if image is not None else blank for row in tiles for image in row]
    block = make_image_grid(flat, rows=len(tiles), cols=len(tiles[0]))
    left, top = margin
    canvas = Image.new("RGB", (left + block.width, top + block.height), "white")
    canvas.paste(block, (left, top))
    draw = ImageDraw.Draw(canvas)
    line = top // 2
    draw.text((GRID_PAD, GRID_PAD), _fit_text(draw, title, canvas.width - 2 * GRID_PAD, font), fill="black", font=font)
    for column, text in enumerate(column_labels):
        draw.text((left + column * tile[0] + GRID_PAD, line), _fit_text(draw, text, tile[0] - GRID_PAD, font), fill="black", font=font)
    for row, text in enumerate(row_labels):
        draw.text((GRID_PAD, top + row * tile[1] + GRID_PAD), text, fill="black", font=font)
    return canvas


def write_grids(out_dir: Path, records: Sequence[Mapping], prompts: Sequence[Prompt], seeds: Sequence[int]) -> list[Path]:
    """Per prompt, labelled grids of its images (rows: settings and alpha, base first; columns: seeds) in
    out_dir/grids: prompt000.png, or prompt000-part1of3.png ... when one file would be too big for PIL to
    reopen (Image.MAX_IMAGE_PIXELS) or wider than GRID_SEEDS seeds. Usage: write_grids(Path("eval"), records, prompts, seeds)"""
    grid_dir = out_dir / "grids"
    grid_dir.mkdir(exist_ok=True)
    limit = pixel_limit()  # read now: a user (or a test) may have changed it
    written = []
    for index, prompt in enumerate(prompts):
        for stale in [*grid_dir.glob(f"prompt{index:03d}.png"), *grid_dir.glob(f"prompt{index:03d}-part*.png")]:
            stale.unlink()  # an earlier run may have split differently
        rows: dict[tuple, dict[int, str]] = {}
        for record in records:  # records come in setting order, base first
            if record["prompt_index"] == index:
                rows.setdefault((record["adapters"], record["alpha"]), {})[record["seed"]] = record["image"]
        if rows:
            written += _write_prompt_grids(out_dir, grid_dir, index, prompt.prompt, rows, list(seeds), limit)
    return written


def _write_prompt_grids(out_dir: Path, grid_dir: Path, index: int, prompt: str, rows: Mapping[tuple, Mapping[int, str]],
                        seeds: list[int], limit: int) -> list[Path]:
    from PIL import ImageDraw

    keys = list(rows)
    with Image.open(out_dir / next(iter(rows[keys[0]].values()))) as first:
        size = first.size
    font = _grid_font(max(10, min(20, min(GRID_TILE, max(size)) // 14)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [label if label == BASE else f"{label}  alpha={alpha:g}" for label, alpha in keys]
    line = max(font.getbbox("Ag0")[3], 8) + GRID_PAD
    margin = (2 * GRID_PAD + max(int(measure.textlength(text, font=font)) for text in labels), 2 * line + GRID_PAD)
    per_file, seeds_per_file, tile = grid_layout(len(keys), len(seeds), size, margin, limit)
    pages = [(r, s) for r in _chunks(range(len(keys)), per_file) for s in _chunks(seeds, seeds_per_file)]
    paths = []
    for number, (row_indices, page_seeds) in enumerate(pages, 1):
        part = f" [part {number} of {len(pages)}]" if len(pages) > 1 else ""
        tiles = [[_open_tile(out_dir, rows[keys[r]].get(seed)) for seed in page_seeds] for r in row_indices]
        grid = _labelled_grid(tiles, [labels[r] for r in row_indices], [f"seed {seed}" for seed in page_seeds],
                              f"prompt {index}{part}: {prompt}", tile, margin, font)
        path = grid_dir / (f"prompt{index:03d}.png" if len(pages) == 1 else f"prompt{index:03d}-part{number}of{len(pages)}.png")
        grid.save(path)
        paths.append(path)
    return paths


def _open_tile(out_dir: Path, relative: str | None) -> Image.Image | None:
    if relative is None:
        return None
    with Image.open(out_dir / relative) as image:
        return image.convert("RGB")


def _write_plot(out_dir: Path, summary: Sequence[Mapping]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(row["adapters"] for row in summary):
        points = sorted((row["alpha"], row["mean"], row["std"]) for row in summary if row["adapters"] == label)
        if label == BASE and points:
            axes.axhline(points[0][1], color="gray", linestyle="--", label="base")
            continue
        axes.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=label)
    axes.set_xlabel("α")
    axes.set_ylabel("HPSv2 × 100")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "score_vs_alpha.png", dpi=100)
    plt.close(figure)
