"""Seeded fuzzing of adapter files through `pipe.load_shira_weights`.

A few valid adapter files for the tiny SD pipeline are mutated (header bytes, the JSON metadata, gap codes, high
gap bits, delta values, tensor names / dtypes / shapes, truncations, extensions). Every mutant must either load
and write exactly W0 + alpha * S of what `ShiraAdapter.load` reads from it (and unload back to W0 bit for bit),
or be refused with ShiraFormatError / ShiraLoadError / FileNotFoundError with every weight unchanged. Anything
else is a failure, reported with the seed and the mutation.

SHIRA_FUZZ_SEED / SHIRA_FUZZ_MUTANTS (environment) change the seed and the number of mutants (default 1234 / 2000).
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shira_diffusion import ShiraAdapter, ShiraFormatError, ShiraLoadError, SparseDelta
from shira_diffusion.format import METADATA_KEY
from shira_diffusion.testing import tiny_pipeline

from .helpers import snapshot

SEED = int(os.environ.get("SHIRA_FUZZ_SEED", "1234"))
MUTANTS = int(os.environ.get("SHIRA_FUZZ_MUTANTS", "2000"))
HANG_SECONDS = 120  # per mutant: a hang dumps every thread's stack and ends the run instead of blocking it
ACCEPTED = (ShiraFormatError, ShiraLoadError, FileNotFoundError)
SUFFIXES = ("deltas", "gaps", "gaps_hi_index", "gaps_hi")


# ---- the valid files ---------------------------------------------------------------------------------------------
def _named(pipe, component: str, ending: str) -> tuple[str, tuple[int, ...]]:
    name, parameter = next((n, p) for n, p in getattr(pipe, component).named_parameters() if n.endswith(ending))
    return name, tuple(parameter.shape)


def _random_delta(shape, density, generator, dtype) -> SparseDelta:
    size = math.prod(shape)
    count = max(1, int(size * density))
    positions = torch.randperm(size, generator=generator)[:count].sort().values
    return SparseDelta(shape, positions, (torch.randn(count, generator=generator) * 0.1).to(dtype))


def base_adapters(pipe) -> dict[str, ShiraAdapter]:
    """Three small valid adapters: random positions (fp32), a struct-like contiguous mask (fp16, two components),
    and edge positions (first and last entry, a negative default strength)."""
    generator = torch.Generator().manual_seed(SEED)
    random_unet = {}
    for ending in ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                   "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight",
                   "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight",
                   "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"):
        name, shape = _named(pipe, "unet", ending)
        random_unet[name] = _random_delta(shape, 0.03, generator, torch.float32)
    q_name, q_shape = _named(pipe, "unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight")
    out_name, out_shape = _named(pipe, "unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight")
    rows = torch.arange(3 * q_shape[1], 6 * q_shape[1])  # three whole rows: gaps of 1
    column = torch.arange(7, math.prod(out_shape), out_shape[1])  # one whole column: gaps of the row length
    text_name, text_shape = _named(pipe, "text_encoder", "layers.0.self_attn.q_proj.weight")
    struct = {
        "unet": {q_name: SparseDelta(q_shape, rows, torch.linspace(-1, 1, rows.numel()).half()),
                 out_name: SparseDelta(out_shape, column, torch.full((column.numel(),), 0.25).half())},
        "text_encoder": {text_name: _random_delta(text_shape, 0.05, generator, torch.float16)},
    }
    ff_name, ff_shape = _named(pipe, "unet", "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight")
    edges = {ff_name: SparseDelta(ff_shape, torch.tensor([0, 1, math.prod(ff_shape) - 1]), torch.tensor([0.5, -0.25, 2.0]))}
    return {
        "random_fp32": ShiraAdapter({"unet": random_unet}, mask_type="random", extra={"steps": 10}),
        "struct_fp16": ShiraAdapter(struct, mask_type="struct", default_alpha=0.75, base_model="tiny/sd"),
        "edges_fp32": ShiraAdapter({"unet": edges}, default_alpha=-1.5),
    }


# ---- mutations ---------------------------------------------------------------------------------------------------
class Parts:
    """A file taken apart: tensors and metadata (None when the bytes do not parse) and the raw bytes."""

    def __init__(self, data: bytes):
        self.data = data
        size = int.from_bytes(data[:8], "little")
        self.header = json.loads(data[8:8 + size])
        self.data_start = 8 + size
        self.tensors = {k: v.clone() for k, v in load_safetensors(data).items()}
        self.metadata = json.loads(self.header["__metadata__"][METADATA_KEY])

    def keys(self) -> list[str]:
        return sorted(self.metadata["shapes"])

    def span(self, name: str) -> tuple[int, int]:
        start, stop = self.header[name]["data_offsets"]
        return self.data_start + start, self.data_start + stop


def _rebuild(tensors: dict[str, torch.Tensor], metadata_text: str) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt", METADATA_KEY: metadata_text})


def _with_header(parts: Parts, header: dict | str) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(text).to_bytes(8, "little") + text + parts.data[parts.data_start:]


ODD_NUMBERS = [0, 1, -1, 2, 0.5, 1.0, 2.0, -1.5, 1e30, 3.4e38, 1e39, -1e39, float("inf"), float("nan"), 10**400, True, None, "1"]
ODD_VALUES = ODD_NUMBERS + [[], {}, [1, 2], {"a": 1}, "text", ""]


def m_metadata_field(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    metadata = json.loads(json.dumps(parts.metadata))
    field = rng.choice(["format_version", "default_alpha", "mask_type", "base_model", "extra", "density", "unknown"])
    value = rng.choice(ODD_NUMBERS if field in ("format_version", "default_alpha") else ODD_VALUES)
    if rng.random() < 0.15:
        metadata.pop(field, None)
        return f"drop metadata {field}", _rebuild(parts.tensors, json.dumps(metadata))
    metadata[field] = value
    return f"metadata {field}={value!r:.40}", _rebuild(parts.tensors, json.dumps(metadata))


def m_shapes(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    metadata = json.loads(json.dumps(parts.metadata))
    shapes = metadata["shapes"]
    key = rng.choice(parts.keys())
    shape = list(shapes[key])
    kind = rng.choice(["dim", "swap", "drop_dim", "add_dim", "drop_key", "add_key", "odd", "table"])
    if kind == "dim":
        i = rng.randrange(len(shape))
        shape[i] = rng.choice([0, -1, shape[i] - 1, shape[i] + 1, 2**31, 2**40, 2**63, 2**64 + 1, 10**30])
        shapes[key] = shape
    elif kind == "swap":
        shapes[key] = shape[::-1]
    elif kind == "drop_dim":
        shapes[key] = shape[:-1]
    elif kind == "add_dim":
        shapes[key] = shape + [rng.choice([1, 2])]
    elif kind == "drop_key":
        del shapes[key]
    elif kind == "add_key":
        shapes[key.replace("weight", "bias")] = shape
    elif kind == "odd":
        shapes[key] = rng.choice(ODD_VALUES + [[True, 32], [32.0, 32], ["32", 32], [[32], 32], [1] * 40])
    else:
        metadata["shapes"] = rng.choice(ODD_VALUES + [[[key, shape]]])
    return f"shapes {kind} {key[-30:]}", _rebuild(parts.tensors, json.dumps(metadata))


def m_metadata_text(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    text = json.dumps(parts.metadata)
    kind = rng.choice(["nest", "nest_extra", "duplicate", "chars", "cut", "huge_int"])
    if kind == "nest":
        depth = rng.choice([10, 63, 65, 1000, 100_000])
        text = "[" * depth + "]" * depth if rng.random() < 0.5 else "[" * depth
    elif kind == "nest_extra":
        depth = rng.choice([10, 60, 62, 63, 200, 5000])
        text = text[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    elif kind == "duplicate":
        text = text[:-1] + ', "default_alpha": 2.0, "default_alpha": 0.5}'
    elif kind == "chars":
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = rng.choice('[]{}",:0123456789.e-aZ \\\x00\u00e9')
        text = "".join(chars)
    elif kind == "cut":
        text = text[: rng.randrange(len(text))]
    else:
        text = text[:-1] + ', "default_alpha": 1' + "0" * rng.choice([300, 5000]) + "}"
    return f"metadata text {kind}", _rebuild(parts.tensors, text)


def _pick_tensor(rng: random.Random, parts: Parts, suffix: str) -> str:
    return f"{rng.choice(parts.keys())}.{suffix}"


def m_gaps(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    tensors = dict(parts.tensors)
    name = _pick_tensor(rng, parts, "gaps")
    gaps = tensors[name].to(torch.int32)
    kind = rng.choice(["set", "set", "reverse", "append", "drop", "dtype", "2d"])
    if kind == "set":
        for _ in range(rng.randint(1, 3)):
            gaps[rng.randrange(gaps.numel())] = rng.choice([0, 1, 2, 31, 32, 33, 1024, 8191, 8192, 65535, rng.randrange(65536)])
        tensors[name] = gaps.to(torch.uint16)
    elif kind == "reverse":
        tensors[name] = gaps.flip(0).to(torch.uint16)
    elif kind == "append":
        tensors[name] = torch.cat([gaps, torch.tensor([1], dtype=torch.int32)]).to(torch.uint16)
    elif kind == "drop":
        tensors[name] = gaps[:-1].to(torch.uint16)
    elif kind == "dtype":
        tensors[name] = gaps.to(rng.choice([torch.int16, torch.int32, torch.int64, torch.float32, torch.uint8]))
    else:
        tensors[name] = gaps.to(torch.uint16).reshape(1, -1)
    return f"gaps {kind} {name[-30:]}", _rebuild(tensors, json.dumps(parts.metadata))


def m_gaps_hi(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    tensors = dict(parts.tensors)
    key = rng.choice(parts.keys())
    count = tensors[f"{key}.gaps"].numel()
    pairs = rng.randint(1, 3)
    index = sorted(rng.choice([0, 1, count - 1, count, -1, rng.randrange(max(1, count))]) for _ in range(pairs))
    if rng.random() < 0.2:
        index = index[::-1]
    high = [rng.choice([0, 1, 2, 2**15, 2**31 - 1, -1, -(2**31)]) for _ in range(pairs)]
    kind = rng.choice(["pairs", "pairs", "lengths", "dtype"])
    tensors[f"{key}.gaps_hi_index"] = torch.tensor(index, dtype=torch.int32)
    tensors[f"{key}.gaps_hi"] = torch.tensor(high, dtype=torch.int32)
    if kind == "lengths":
        tensors[f"{key}.gaps_hi"] = torch.tensor(high + [1], dtype=torch.int32)
    elif kind == "dtype":
        suffix = rng.choice(["gaps_hi_index", "gaps_hi"])
        tensors[f"{key}.{suffix}"] = tensors[f"{key}.{suffix}"].to(rng.choice([torch.int64, torch.int16, torch.float32, torch.uint16]))
    return f"gaps_hi {kind} index={index} high={high} {key[-30:]}", _rebuild(tensors, json.dumps(parts.metadata))


def m_deltas(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    tensors = dict(parts.tensors)
    name = _pick_tensor(rng, parts, "deltas")
    deltas = tensors[name].clone()
    kind = rng.choice(["values", "values", "values", "dtype", "2d", "length"])
    if kind == "values":
        values = [float("nan"), float("inf"), float("-inf"), 65504.0, -65504.0, 1e38, 3.4e38, -3.4e38, 1e-45, -0.0, 1e4]
        for _ in range(rng.randint(1, 3)):
            deltas[rng.randrange(deltas.numel())] = rng.choice(values)
        tensors[name] = deltas
    elif kind == "dtype":
        tensors[name] = deltas.to(rng.choice([torch.float64, torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.bool, torch.uint8]))
    elif kind == "2d":
        tensors[name] = deltas.reshape(1, -1)
    else:
        tensors[name] = deltas[:-1] if rng.random() < 0.5 else torch.cat([deltas, deltas[:1]])
    return f"deltas {kind} {name[-30:]}", _rebuild(tensors, json.dumps(parts.metadata))


def m_names(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    tensors, metadata = dict(parts.tensors), json.loads(json.dumps(parts.metadata))
    key = rng.choice(parts.keys())
    kind = rng.choice(["rename_weight", "rename_component", "drop_tensor", "extra_tensor", "rename_one"])
    if kind == "drop_tensor":
        del tensors[f"{key}.{rng.choice(SUFFIXES)}"]
        return f"drop tensor of {key[-30:]}", _rebuild(tensors, json.dumps(metadata))
    if kind == "extra_tensor":
        tensors[f"{key}.{rng.choice(['positions', 'deltas2', 'gaps'])}x"] = torch.zeros(2)
        return f"extra tensor for {key[-30:]}", _rebuild(tensors, json.dumps(metadata))
    if kind == "rename_weight":  # to another weight (often of the same shape: then it loads there) or to no weight
        new = key.replace(rng.choice(["to_q", "to_k", "to_v", "attn1", "q_proj", "ff.net.0"]),
                          rng.choice(["to_k", "to_out.0", "attn2", "k_proj", "nothing", "ff.net.2"]), 1)
    elif kind == "rename_component":
        new = rng.choice(["vae", "text_encoder", "unet", "nonexistent", ""]) + "." + key.partition(".")[2]
    else:  # one suffix only: the metadata and the tensors disagree
        suffix = rng.choice(SUFFIXES)
        tensors[f"{key}x.{suffix}"] = tensors.pop(f"{key}.{suffix}")
        return f"rename {suffix} of {key[-30:]}", _rebuild(tensors, json.dumps(metadata))
    for suffix in SUFFIXES:
        tensors[f"{new}.{suffix}"] = tensors.pop(f"{key}.{suffix}")
    metadata["shapes"][new] = metadata["shapes"].pop(key)
    return f"{kind} {key[-25:]} -> {new[-25:]}", _rebuild(tensors, json.dumps(metadata))


def m_header_entries(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    header = json.loads(json.dumps(parts.header))
    name = rng.choice([k for k in header if k != "__metadata__"])
    kind = rng.choice(["offsets", "shape", "dtype", "drop", "metadata_type"])
    entry = header[name]
    if kind == "offsets":
        start, stop = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[start, stop + 2], [start + 2, stop], [stop, start], [0, stop - start], [start, 2**64 - 1], [-1, stop]])
    elif kind == "shape":
        entry["shape"] = rng.choice([[], [0], [2**62], [entry["shape"][0] * 2] if entry["shape"] else [1], [-1]])
    elif kind == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F32", "F64", "I32", "U16", "I16", "U8", "BOOL", "F8_E4M3", "X99"])
    elif kind == "drop":
        del header[name]
    else:
        header["__metadata__"] = rng.choice([[], {"x": 1}, "text", {METADATA_KEY: 5}])
    return f"header {kind} {name[-30:]}", _with_header(parts, header)


def m_bytes(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    data = bytearray(parts.data)
    kind = rng.choice(["header", "header", "metadata", "data", "gap_bytes", "hi_bytes", "delta_bytes", "length"])
    if kind in ("gap_bytes", "hi_bytes", "delta_bytes"):
        suffix = {"gap_bytes": "gaps", "hi_bytes": "gaps_hi", "delta_bytes": "deltas"}[kind]
        candidates = [f"{k}.{suffix}" for k in parts.keys() if parts.span(f"{k}.{suffix}")[1] > parts.span(f"{k}.{suffix}")[0]]
        if not candidates:  # empty tensors (no high gap bits): flip in the data region instead
            kind, low, high = "data", parts.data_start, len(data)
        else:
            low, high = parts.span(rng.choice(candidates))
    elif kind == "header":
        low, high = 0, parts.data_start
    elif kind == "metadata":
        low = parts.data.find(METADATA_KEY.encode()) + len(METADATA_KEY) + 3
        low, high = low, parts.data_start - 2
    elif kind == "data":
        low, high = parts.data_start, len(data)
    else:
        size = int.from_bytes(data[:8], "little")
        data[:8] = rng.choice([size - 1, size + 1, 0, 7, len(data), 2**63, 2**64 - 1]).to_bytes(8, "little")
        return f"header length {int.from_bytes(data[:8], 'little')}", bytes(data)
    flips = []
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(low, high)
        data[at] = rng.randrange(256) if rng.random() < 0.5 else data[at] ^ (1 << rng.randrange(8))
        flips.append(at)
    return f"bytes {kind} at {flips}", bytes(data)


def m_length(rng: random.Random, parts: Parts) -> tuple[str, bytes]:
    data = parts.data
    if rng.random() < 0.6:
        cut = rng.choice([0, 1, 7, 8, 9, parts.data_start - 1, parts.data_start, rng.randrange(len(data)), len(data) - 1])
        return f"truncate to {cut}", data[:cut]
    tail = rng.choice([b"\0", b"\0" * 4096, bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), data])
    return f"extend by {len(tail)}", data + tail


MUTATIONS: list[Callable[[random.Random, Parts], tuple[str, bytes]]] = [
    m_metadata_field, m_shapes, m_metadata_text, m_gaps, m_gaps_hi, m_deltas, m_names, m_header_entries, m_bytes, m_length,
]


# ---- the check ---------------------------------------------------------------------------------------------------
def _expected(before: dict[str, torch.Tensor], adapter: ShiraAdapter) -> dict[str, torch.Tensor]:
    """Every weight as the engine must write it: W0 + alpha * S in fp32 (the product rounded first), cast once."""
    expected = dict(before)
    for component, name, delta in adapter.items():
        key = f"{component}.{name}"
        if key not in expected:  # transformers 5 spells CLIP weights with or without "text_model."
            key = f"{component}.{name.removeprefix('text_model.')}" if name.startswith("text_model.") else f"{component}.text_model.{name}"
        weight = expected[key].clone()
        flat = weight.view(-1)
        positions = delta.positions.to(torch.int64)
        scaled = (delta.deltas.to(torch.float32) * adapter.default_alpha).to(torch.float32)
        flat[positions] = (flat[positions].to(torch.float32) + scaled).to(weight.dtype)
        expected[key] = weight
    return expected


def _differences(pipe, wanted: dict[str, torch.Tensor]) -> list[str]:
    now = snapshot(pipe)
    if now.keys() != wanted.keys():
        return [f"parameters appeared/vanished: {sorted(now.keys() ^ wanted.keys())[:3]}"]
    return [key for key in wanted if not torch.equal(now[key], wanted[key])]  # bit-exact


def _run_one(pipe, path, before) -> str:
    """Load the mutant; returns the outcome ("loaded" / the refusal's class name), or raises AssertionError."""
    try:
        name = pipe.load_shira_weights(str(path))
    except ACCEPTED as error:
        changed = _differences(pipe, before)
        assert not changed, f"refused ({type(error).__name__}: {error}) but changed {changed[:3]}"
        return type(error).__name__
    try:
        adapter = ShiraAdapter.load(path)
        expected = _expected(before, adapter)
        changed = _differences(pipe, expected)
        assert not changed, f"loaded, but these weights are not W0 + alpha*S: {changed[:3]} (alpha {adapter.default_alpha})"
        # the engine refuses writes that would overflow (ShiraLoadError): what it wrote is finite wherever W0 was
        overflowed = [k for k in expected if not torch.equal(torch.isfinite(expected[k]), torch.isfinite(before[k]))]
        assert not overflowed, f"loaded non-finite weights into {overflowed[:3]} (alpha {adapter.default_alpha})"
    finally:
        pipe.unload_shira_weights(name)
    changed = _differences(pipe, before)
    assert not changed, f"unload left these weights changed: {changed[:3]}"
    return "loaded"


@pytest.fixture(scope="module")
def sd():
    return tiny_pipeline("sd")


def test_mutated_adapter_files_load_exactly_or_are_refused_cleanly(sd, tmp_path):
    started = time.perf_counter()
    pipe = sd
    before = snapshot(pipe)
    bases = {}
    for label, adapter in base_adapters(pipe).items():
        path = adapter.save(tmp_path / f"{label}.safetensors")
        assert _run_one(pipe, path, before) == "loaded", f"the valid file {label} must load"  # the checker itself works
        bases[label] = Parts(path.read_bytes())
    rng = random.Random(SEED)
    outcomes, failures = Counter(), []
    path = tmp_path / "mutant.safetensors"
    for index in range(MUTANTS):
        label = rng.choice(sorted(bases))
        mutate = rng.choice(MUTATIONS)
        description, data = mutate(rng, bases[label])
        if rng.random() < 0.1:  # a second mutation on top of the first
            try:
                description2, data = rng.choice(MUTATIONS)(rng, Parts(data))
                description = f"{description} + {description2}"
            except Exception:  # the first mutation left nothing parseable to mutate further: keep it as it is
                pass
        path.write_bytes(data)
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
        try:
            outcomes[_run_one(pipe, path, before)] += 1
        except Exception as error:  # noqa: BLE001 - any other exception is the finding; report it with its mutant
            failures.append(f"seed {SEED} mutant {index} ({label}: {description}): {type(error).__name__}: {error}")
            pipe = tiny_pipeline("sd")  # a fresh pipeline, so that later mutants are judged on clean weights
            if len(failures) >= 5:
                break
        finally:
            faulthandler.cancel_dump_traceback_later()
    elapsed = time.perf_counter() - started
    print(f"\nfuzzed {sum(outcomes.values()) + len(failures)} mutants (seed {SEED}) in {elapsed:.1f} s: {dict(outcomes)}")
    assert not failures, "\n".join(failures)
    assert outcomes["loaded"] > 0 and outcomes["ShiraFormatError"] > 0 and outcomes["ShiraLoadError"] > 0  # all paths exercised


@pytest.mark.parametrize("label", ["random_fp32", "struct_fp16", "edges_fp32"])
def test_truncations_of_a_valid_file_are_always_refused(sd, tmp_path, label):
    # Every prefix of a valid file is incomplete, so it must be refused, never loaded (200 cuts per file).
    adapter = base_adapters(sd)[label]
    data = adapter.save(tmp_path / "a.safetensors").read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 200)):
        with pytest.raises(ShiraFormatError):
            ShiraAdapter.from_bytes(data[:cut], source=f"{label}[:{cut}]")
