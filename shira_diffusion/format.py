"""SHiRA adapter format: sparse deltas (positions + values) per weight tensor, in one safetensors file.

An adapter holds, for every weight tensor it changes, the sorted unique flat positions it changes and
the delta there, S = W_tuned - W_base, so that W = W_base + alpha * S. Storing deltas (not absolute
values) is what makes alpha and multi-adapter fusion well defined.

On disk (format version 1), tensor `<component>.<parameter name>` (e.g. `unet.mid_block.attentions.0.
transformer_blocks.0.attn1.to_q.weight`) is stored as:

- `<key>.deltas`   the values, in the adapter's dtype (fp32, fp16 or bf16);
- `<key>.gaps`     uint16 gaps between consecutive positions (the first gap counts from -1), so positions
                   cost 2 bytes each instead of 8 (int64) or 4 (int32): 4 bytes per parameter in fp16/bf16;
- `<key>.gaps_hi_index` / `<key>.gaps_hi`  (int32, usually empty) the few gaps that do not fit in 16 bits:
                   the index of the gap and its bits above the low 16.

The header carries JSON metadata under `shira_metadata`: format version, per-tensor shape, mask type,
density, default alpha, base model id, free-form extras.

Files are untrusted input: a load reads the file once (header and tensors from the same bytes), bounds the
JSON nesting (MAX_JSON_DEPTH), shapes (MAX_DIMS, MAX_ENTRIES) and the default strength (float32's range),
and reports every problem as ShiraFormatError naming the file and key. Saves are atomic and durable.

Usage:
    adapter = ShiraAdapter.load("style.safetensors"); print(adapter.summary())
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .durable import remove_stale_temp_files, save_error, write_atomically
from .kernels import NONFINITE, OUT_OF_RANGE, ZERO_GAP, decode

FORMAT_VERSION = 1
METADATA_KEY = "shira_metadata"
SHIRA_WEIGHT_NAME = "shira_weights.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_GAP_BITS = 16
_GAP_MASK = (1 << _GAP_BITS) - 1
_SUFFIXES = ("deltas", "gaps", "gaps_hi_index", "gaps_hi")
# Bounds on what a file may claim, checked before anything is allocated or decoded from it.
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on its JSON header
MAX_JSON_DEPTH = 64  # the metadata is 3 levels deep; user extras get plenty of room, a "[[[[..." bomb none
MAX_DIMS = 16  # no diffusion weight has more than 5
MAX_ENTRIES = 2**48  # per weight; keeps every position and running gap sum far inside int64
MAX_ALPHA = float(torch.finfo(torch.float32).max)  # writes accumulate in fp32


class ShiraFormatError(ValueError):
    """An adapter file or object is malformed. The message names the file/key and what was expected."""


def _short(value: Any, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: a file's bad field can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _checked_shape(where: str, shape: Any) -> tuple[int, ...]:
    """`shape` as a tuple of ints after the bounds checks: at most MAX_DIMS dimensions, each >= 1, and at most
    MAX_ENTRIES entries in all (so that positions and their decoding stay inside int64)."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
        raise ShiraFormatError(f"{where}: expected a list of positive integers, found {_short(shape)}")
    if len(shape) > MAX_DIMS:
        raise ShiraFormatError(f"{where}: expected at most {MAX_DIMS} dimensions, found {len(shape)}")
    if any(s < 1 for s in shape):
        raise ShiraFormatError(f"{where}: dimensions must be >= 1, found {_short(shape)}")
    if any(s > MAX_ENTRIES for s in shape) or math.prod(shape) > MAX_ENTRIES:  # the first test keeps the product small
        raise ShiraFormatError(f"{where}: {_short(shape)} has more than {MAX_ENTRIES} (2**48) entries; no weight is that large")
    return tuple(int(s) for s in shape)


def _checked_alpha(where: str, value: Any) -> float:
    """A default strength: a real number (not a bool), finite and within float32's range, as writes are fp32."""
    # `not abs(x) <= max` also refuses NaN and inf, and compares huge ints exactly (float(10**400) would overflow)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not abs(value) <= MAX_ALPHA:
        raise ShiraFormatError(
            f"{where} must be a finite number, found {_short(value)} (expected |x| <= {MAX_ALPHA:.6g}, "
            "float32's largest value: writes accumulate in fp32)"
        )
    return float(value)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPENERS, _CLOSERS = np.frombuffer(b"[{", dtype=np.uint8), np.frombuffer(b"]}", dtype=np.uint8)


def _json_depth(text: str) -> int:
    """How deeply `text`'s arrays/objects nest, without parsing it: brackets outside strings, counted in chunks."""
    codes = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), dtype=np.uint8)
    depth = deepest = 0
    for start in range(0, codes.size, 1 << 20):  # chunks: bounded memory for a 100 MB header
        chunk = codes[start:start + (1 << 20)]
        steps = np.isin(chunk, _OPENERS).astype(np.int64) - np.isin(chunk, _CLOSERS)
        levels = depth + np.cumsum(steps)
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):  # a repeated key: two readers of the file could each pick another value
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {repeated!r} appears more than once in one object")
    return result


def _parse_json(text: str, where: str) -> Any:
    """json.loads with the nesting bounded (deep nesting exhausts the parser's recursion) and repeated keys refused."""
    # fewer brackets than the limit cannot nest deeper than it: the usual case skips the count
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and (depth := _json_depth(text)) > MAX_JSON_DEPTH:
        raise ShiraFormatError(f"{where}: JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH} allowed)")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:  # a second line of defence: the count above should have caught it
        raise ShiraFormatError(f"{where}: JSON nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, repeated keys, integers of more than 4300 digits
        raise ShiraFormatError(f"{where}: not valid JSON: {error}") from None


def _header_metadata(data: bytes, source: str) -> dict[str, str]:
    """The `__metadata__` table of a safetensors file's header, read from the file's bytes (8-byte little-endian
    header length, then that many bytes of JSON), with every length checked against the bytes there are."""
    unreadable = f"{source}: not a readable safetensors file (corrupt or truncated?)"
    if len(data) < 8:
        raise ShiraFormatError(f"{unreadable}: {len(data)} bytes, shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, MAX_HEADER_BYTES):
        raise ShiraFormatError(f"{unreadable}: header of {size} bytes claimed, {len(data) - 8} bytes follow "
                               f"(at most {MAX_HEADER_BYTES} allowed)")
    try:
        text = data[8:8 + size].decode("utf-8")
    except UnicodeDecodeError as error:
        raise ShiraFormatError(f"{unreadable}: header is not UTF-8: {error}") from None
    header = _parse_json(text, f"{unreadable}: header")
    if not isinstance(header, dict):
        raise ShiraFormatError(f"{unreadable}: header is a JSON {type(header).__name__}, expected an object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ShiraFormatError(f"{unreadable}: header '__metadata__' must map strings to strings, found {_short(metadata)}")
    return metadata


def _decode_tensors(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file's bytes (one parse of the whole file: much faster than a get_tensor per key)."""
    try:
        return load_safetensors(data)
    # SafetensorError from the parser; the others from safetensors' Python side on entries the parser let through
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError, OverflowError, AssertionError) as error:
        raise ShiraFormatError(f"{source}: not a readable safetensors file (corrupt or truncated?): {error}") from None


def checked_weight_name(weight_name: str) -> str:
    """`weight_name` if it is a plain file name ending in .safetensors, else ShiraFormatError: a name with a
    folder part ('../x.safetensors', '/etc/x.safetensors', 'a\\\\b.safetensors', 'C:x.safetensors') would write
    outside the save folder.

    Usage: path = directory / checked_weight_name(weight_name)
    """
    if not isinstance(weight_name, str):
        raise ShiraFormatError(f"weight_name must be a string, found {type(weight_name).__name__}")
    problem = None
    if not weight_name.strip():
        problem = "it is empty"
    elif any(c in weight_name for c in "/\\"):
        problem = "it contains a path separator"
    elif ":" in weight_name or "\0" in weight_name:
        problem = "it contains ':' or a NUL character (a drive or stream name on Windows)"
    elif weight_name in (".", ".."):
        problem = "it names a folder"
    elif not weight_name.endswith(".safetensors") or weight_name == ".safetensors":
        problem = "it does not end in .safetensors"
    if problem:
        raise ShiraFormatError(f"weight_name {weight_name!r}: expected a plain file name ending in .safetensors "
                               f"(e.g. {SHIRA_WEIGHT_NAME!r}), but {problem}")
    return weight_name


@dataclass
class SparseDelta:
    """The change to one weight tensor: `weight.view(-1)[positions] += alpha * deltas`.

    `positions` are int64 flat indices into a tensor of `shape`, sorted and unique; `deltas` are floats.
    Usage: SparseDelta(shape=(320, 320), positions=torch.tensor([0, 5]), deltas=torch.tensor([.1, -.2]))
    """

    shape: tuple[int, ...]
    positions: torch.Tensor
    deltas: torch.Tensor

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def numel(self) -> int:
        """Number of stored parameters."""
        return int(self.positions.numel())

    @property
    def density(self) -> float:
        """Fraction of the weight's entries that this delta changes."""
        return self.numel / max(1, math.prod(self.shape))

    def check_structure(self, key: str) -> None:
        """The cheap checks: a bounded shape, integer positions, float deltas, both 1-D and of equal length."""
        _checked_shape(f"{key}: shape", self.shape)
        if not isinstance(self.positions, torch.Tensor) or not isinstance(self.deltas, torch.Tensor):
            raise ShiraFormatError(f"{key}: positions and deltas must be tensors, found "
                                   f"{type(self.positions).__name__} and {type(self.deltas).__name__}")
        if self.positions.dtype.is_floating_point or self.positions.dtype == torch.bool or self.positions.is_complex():
            raise ShiraFormatError(f"{key}: positions must be integers, found {self.positions.dtype}")
        if self.deltas.dtype not in FLOAT_DTYPES:
            raise ShiraFormatError(f"{key}: deltas must be floating point, found {self.deltas.dtype}")
        if self.positions.dim() != 1 or self.deltas.dim() != 1:
            raise ShiraFormatError(
                f"{key}: positions and deltas must be 1-D, found shapes {tuple(self.positions.shape)} "
                f"and {tuple(self.deltas.shape)}"
            )
        if self.positions.numel() != self.deltas.numel():
            raise ShiraFormatError(
                f"{key}: {self.positions.numel()} positions but {self.deltas.numel()} deltas"
            )

    def validate(self, key: str) -> None:
        """Raise ShiraFormatError naming `key` unless positions/deltas are well formed."""
        self.check_structure(key)
        if self.positions.numel() == 0:
            return
        positions = self.positions.to(torch.int64)
        if not bool(torch.all(positions[1:] > positions[:-1])):  # only now find which problem it is
            at = int(torch.nonzero(positions[1:] <= positions[:-1])[0])  # compared, not subtracted: no overflow
            if int(positions[at]) == int(positions[at + 1]):
                raise ShiraFormatError(f"{key}: duplicate position {int(positions[at])}")
            raise ShiraFormatError(
                f"{key}: positions are not sorted ({int(positions[at])} comes before {int(positions[at + 1])})"
            )
        low, high = int(positions[0]), int(positions[-1])  # sorted, so these are min and max
        if low < 0:
            raise ShiraFormatError(f"{key}: negative position {low}")
        if high >= math.prod(self.shape):
            raise _out_of_range(key, high, self.shape)
        # NaN/inf propagate through a sum: one cheap fp32 reduction; only a non-finite sum (which may also
        # be an overflow of large finite values) pays for the element-wise search.
        if not bool(torch.isfinite(self.deltas.sum(dtype=torch.float32))):
            bad = torch.nonzero(~torch.isfinite(self.deltas))
            if bad.numel():
                raise _nonfinite(key, self.deltas, int(bad[0]))


    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The delta as a dense tensor of `shape` (zeros elsewhere)."""
        dense = torch.zeros(math.prod(self.shape), dtype=dtype)
        dense[self.positions.to(torch.int64)] = self.deltas.to(dtype)
        return dense.view(self.shape)


def _out_of_range(key: str, position: int, shape: tuple[int, ...]) -> ShiraFormatError:
    return ShiraFormatError(f"{key}: position {position} is out of range for a weight of shape {shape} ({math.prod(shape)} entries)")


def _nonfinite(key: str, deltas: torch.Tensor, index: int) -> ShiraFormatError:
    return ShiraFormatError(f"{key}: non-finite delta {float(deltas[index])} (entry {index})")


def _checked_fields(metadata: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The optional metadata fields, type-checked (the header is JSON anyone can write)."""
    fields = {"mask_type": metadata.get("mask_type"), "base_model": metadata.get("base_model")}
    for name, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise ShiraFormatError(f"{source}: metadata {name!r} must be a string or null, found {_short(value)}")
    alpha = _checked_alpha(f"{source}: metadata 'default_alpha'", metadata.get("default_alpha", 1.0))
    extra = metadata.get("extra")
    extra = {} if extra is None else extra
    if not isinstance(extra, Mapping) or not all(isinstance(key, str) for key in extra):
        raise ShiraFormatError(f"{source}: metadata 'extra' must be a JSON object, found {_short(extra)} (expected string keys)")
    return {**fields, "default_alpha": alpha, "extra": dict(extra)}


def encode_positions(positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sorted unique int positions -> uint16 gaps (+ int32 high bits of the rare gaps >= 2**16)."""
    positions = positions.to(torch.int64)
    gaps = torch.diff(positions, prepend=torch.tensor([-1], dtype=torch.int64))
    hi_index = torch.nonzero(gaps > _GAP_MASK).flatten()
    return {
        "gaps": (gaps & _GAP_MASK).to(torch.int32).to(torch.uint16),
        "gaps_hi_index": hi_index.to(torch.int32),
        "gaps_hi": (gaps[hi_index] >> _GAP_BITS).to(torch.int32),
    }


def _checked_gaps(tensors: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`<key>.gaps` and its high bits after the checks the decoder relies on (dtypes, shapes, index order);
    errors name `where` (the file and key)."""
    gaps, gaps_hi_index, gaps_hi = tensors[f"{key}.gaps"], tensors[f"{key}.gaps_hi_index"], tensors[f"{key}.gaps_hi"]
    if gaps.dtype != torch.uint16 or gaps.dim() != 1:
        raise ShiraFormatError(f"{where}.gaps: expected uint16, found {gaps.dtype} of shape {tuple(gaps.shape)}")
    for name, tensor in (("gaps_hi_index", gaps_hi_index), ("gaps_hi", gaps_hi)):
        if tensor.dtype != torch.int32 or tensor.dim() != 1:
            raise ShiraFormatError(f"{where}.{name}: expected a 1-D int32 tensor, found {tensor.dtype} {tuple(tensor.shape)}")
    if gaps_hi_index.shape != gaps_hi.shape:
        raise ShiraFormatError(f"{where}: gaps_hi_index and gaps_hi differ in length")
    index, high = gaps_hi_index.to(torch.int64), gaps_hi.to(torch.int64)
    if index.numel():
        if int(index[0]) < 0 or int(index[-1]) >= gaps.numel() or not bool(torch.all(index[1:] > index[:-1])):
            raise ShiraFormatError(f"{where}.gaps_hi_index: expected increasing indices in 0..{gaps.numel() - 1}")
        if int(high.min()) < 0:
            raise ShiraFormatError(f"{where}.gaps_hi: negative high bits")
    return gaps, index, high


@dataclass
class ShiraAdapter:
    """A SHiRA adapter: `{component: {parameter name: SparseDelta}}` plus metadata.

    Usage:
        adapter = ShiraAdapter.from_state_dicts(base_unet_sd, tuned_unet_sd, component="unet")
        adapter.save("style.safetensors"); pipe.load_shira_weights("style.safetensors", alpha=0.8)
    """

    deltas: dict[str, dict[str, SparseDelta]]
    mask_type: str | None = None
    default_alpha: float = 1.0
    base_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The metadata fields are cheap to check, so a bad one fails where it is set, not at save or load time.
        if self.extra is None:
            self.extra = {}
        self.default_alpha = _checked_fields(self._fields(), "adapter")["default_alpha"]

    def _fields(self) -> dict[str, Any]:
        return {"mask_type": self.mask_type, "default_alpha": self.default_alpha, "base_model": self.base_model, "extra": self.extra}

    # ---- introspection -------------------------------------------------------------------------
    @property
    def components(self) -> list[str]:
        return sorted(self.deltas)

    def items(self) -> Iterable[tuple[str, str, SparseDelta]]:
        """(component, parameter name, delta) for every tensor, in sorted order."""
        for component in sorted(self.deltas):
            for name in sorted(self.deltas[component]):
                yield component, name, self.deltas[component][name]

    @property
    def num_parameters(self) -> int:
        return sum(delta.numel for _, _, delta in self.items())

    @property
    def num_targeted(self) -> int:
        """Entries of all targeted weight tensors (denominator of `density`)."""
        return sum(math.prod(delta.shape) for _, _, delta in self.items())

    @property
    def density(self) -> float:
        return self.num_parameters / max(1, self.num_targeted)

    def summary(self) -> str:
        """A readable table: components, tensors, parameters, density."""
        lines = [
            f"SHiRA adapter: {self.num_parameters:,} parameters in {sum(1 for _ in self.items())} tensors, "
            f"density {self.density:.4%} of targeted weights"
            + (f", mask {self.mask_type}" if self.mask_type else "")
            + (f", base {self.base_model}" if self.base_model else "")
        ]
        for component in self.components:
            tensors = self.deltas[component]
            params = sum(d.numel for d in tensors.values())
            total = sum(math.prod(d.shape) for d in tensors.values())
            lines.append(f"  {component}: {len(tensors)} tensors, {params:,} parameters, density {params / max(1, total):.4%}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def validate(self) -> None:
        """Check the metadata fields (default_alpha finite and within float32's range, JSON-writable extras) and
        every tensor (a bounded shape, positions sorted, unique, in range; finite float deltas).

        Usage: adapter.validate()  # raises ShiraFormatError naming the field or tensor
        """
        _checked_fields(self._fields(), "adapter")
        try:
            extra = json.dumps({"extra": self.extra})  # as save() will write it
        except (TypeError, ValueError, RecursionError) as error:
            raise ShiraFormatError(f"adapter: 'extra' cannot be written as JSON: {error}") from None
        if extra.count("[") + extra.count("{") > MAX_JSON_DEPTH and _json_depth(extra) > MAX_JSON_DEPTH:
            raise ShiraFormatError(f"adapter: 'extra' nests more than {MAX_JSON_DEPTH} levels deep; it could not be loaded back")
        if not isinstance(self.deltas, Mapping) or not self.deltas:
            raise ShiraFormatError("adapter has no tensors")
        for component, tensors in self.deltas.items():
            # "<component>.<name>" is split at the first dot when read back
            if not isinstance(component, str) or not component or "." in component:
                raise ShiraFormatError(f"adapter: component {component!r} must be a non-empty name without '.'")
            if not isinstance(tensors, Mapping) or not all(isinstance(n, str) and n and isinstance(d, SparseDelta) for n, d in tensors.items()):
                raise ShiraFormatError(f"adapter: component {component!r} must map parameter names to SparseDelta")
        for component, name, delta in self.items():
            delta.validate(f"{component}.{name}")

    def to(self, dtype: torch.dtype) -> "ShiraAdapter":
        """A copy with deltas cast to `dtype` (e.g. torch.float16 for a 4-bytes-per-parameter file)."""
        return ShiraAdapter(
            {c: {n: SparseDelta(d.shape, d.positions, d.deltas.to(dtype)) for n, d in t.items()} for c, t in self.deltas.items()},
            self.mask_type,
            self.default_alpha,
            self.base_model,
            dict(self.extra),
        )

    # ---- serialisation -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "mask_type": self.mask_type,
            "density": self.density,
            "default_alpha": self.default_alpha,
            "base_model": self.base_model,
            "shapes": {f"{c}.{n}": list(d.shape) for c, n, d in self.items()},
            "extra": self.extra,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of the on-disk format (keys `<component>.<param>.<deltas|gaps|...>`)."""
        tensors: dict[str, torch.Tensor] = {}
        for component, name, delta in self.items():
            key = f"{component}.{name}"
            tensors[f"{key}.deltas"] = delta.deltas.detach().cpu().contiguous()
            for suffix, tensor in encode_positions(delta.positions.cpu()).items():
                tensors[f"{key}.{suffix}"] = tensor.contiguous()
        return tensors

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file atomically and durably: a temp file in the same folder, flushed to disk,
        renamed over `path`, then the folder flushed. Readers see the old file or the new one, never a mix.

        Temp files that earlier saves to `path` left behind when killed are removed first. A failed write
        (read-only folder, full disk) raises OSError naming `path` and leaves no temp file.
        Usage: adapter.save("out/style.safetensors")
        """
        self.validate()
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ShiraFormatError(f"{path}: SHiRA adapters are saved as .safetensors files")
        tensors, metadata = self.state_dict(), {"format": "pt", METADATA_KEY: json.dumps(self.metadata())}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(path)
            write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        except (OSError, SafetensorError) as error:
            raise save_error(path, error, "the SHiRA adapter") from None
        return path

    @classmethod
    def from_state_dict(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], source: str = "state dict"
    ) -> "ShiraAdapter":
        """Build from the on-disk tensors and header metadata; validates everything."""
        if not isinstance(metadata, Mapping):
            raise ShiraFormatError(f"{source}: metadata must be a JSON object, found {type(metadata).__name__}")
        version = metadata.get("format_version")
        if isinstance(version, bool) or version != FORMAT_VERSION:  # (True == 1 in Python)
            raise ShiraFormatError(f"{source}: unsupported SHiRA format version {_short(version)} (expected {FORMAT_VERSION})")
        shapes = metadata.get("shapes")
        if not isinstance(shapes, Mapping):
            raise ShiraFormatError(f"{source}: metadata has no 'shapes' table (expected an object, found {_short(shapes)})")
        for keys, what in ((shapes, "metadata 'shapes' key"), (tensors, "tensor name")):
            odd = next((key for key in keys if not isinstance(key, str)), None)
            if odd is not None:
                raise ShiraFormatError(f"{source}: {what} {_short(odd)} is not a string")
        expected = {f"{key}.{suffix}" for key in shapes for suffix in _SUFFIXES}
        unknown = sorted(set(tensors) - expected)
        if unknown:
            raise ShiraFormatError(f"{source}: unexpected tensor {unknown[0]!r} (not listed in the metadata shapes)")
        not_tensors = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if not_tensors:
            raise ShiraFormatError(f"{source}: {not_tensors[0]!r} is a {type(tensors[not_tensors[0]]).__name__}, not a tensor")
        on_meta = [k for k, v in tensors.items() if v.device.type == "meta"]
        if on_meta:
            raise ShiraFormatError(f"{source}: tensor {on_meta[0]!r} is on the meta device (it holds no values)")
        # Adapters live on the CPU (the engine copies each entry to its weight's device); the checks run there too.
        tensors = {k: v.cpu() for k, v in tensors.items()}
        checked, jobs = [], []
        for key, shape in shapes.items():
            missing = [f"{key}.{s}" for s in _SUFFIXES if f"{key}.{s}" not in tensors]
            if missing:
                raise ShiraFormatError(f"{source}: missing tensor {missing[0]!r}")
            component, _, name = key.partition(".")
            if not component or not name:
                raise ShiraFormatError(f"{source}: key {key!r} has no component prefix (expected e.g. 'unet.<param>')")
            shape = _checked_shape(f"{source}: shape of {key!r}", shape)
            gaps, gaps_hi_index, gaps_hi = _checked_gaps(tensors, key, f"{source}: {key}")
            SparseDelta(shape, gaps, tensors[f"{key}.deltas"]).check_structure(f"{source}: {key}")
            checked.append((key, shape))
            jobs.append((gaps, gaps_hi_index, gaps_hi, tensors[f"{key}.deltas"], math.prod(shape)))
        # One pass per tensor decodes the positions and checks order, range and finiteness on the way.
        positions, problems = decode(jobs)
        deltas: dict[str, dict[str, SparseDelta]] = {}
        for (key, shape), job, decoded, (problem, index) in zip(checked, jobs, positions, problems):
            if problem == ZERO_GAP:
                where = "negative position -1 (the first gap is 0)" if index == 0 else f"duplicate position {int(decoded[index - 1])}"
                raise ShiraFormatError(f"{source}: {key}: {where}")
            if problem == OUT_OF_RANGE:
                raise _out_of_range(f"{source}: {key}", index, shape)
            if problem == NONFINITE:
                raise _nonfinite(f"{source}: {key}", job[3], index)
            component, _, name = key.partition(".")
            deltas.setdefault(component, {})[name] = SparseDelta(shape, decoded, job[3])
        if not deltas:
            raise ShiraFormatError(f"{source}: adapter has no tensors")
        return cls(deltas, **_checked_fields(metadata, source))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ShiraAdapter":
        """Read a SHiRA safetensors file. Pickle files are refused; they are never unpickled.

        The file is opened and read once; header and tensors both come from those bytes, so a file replaced
        while it is read (another process saving) gives one version or the other, never a mix.
        Usage: adapter = ShiraAdapter.load("style.safetensors")
        """
        path = Path(path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ShiraFormatError(
                f"{path}: refusing to load a pickle file ({path.suffix}); pickles can run arbitrary code. "
                "Convert it to .safetensors first."
            )
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such adapter file")
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:  # removed since the check above
            raise FileNotFoundError(f"{path}: no such adapter file") from None
        except OSError as error:
            raise ShiraFormatError(f"{path}: not a readable safetensors file: {error}") from None
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "bytes") -> "ShiraAdapter":
        """Parse the bytes of a SHiRA safetensors file (`source` names it in errors); validates everything.

        Usage: adapter = ShiraAdapter.from_bytes(blob, source="upload.safetensors")
        """
        header = _header_metadata(data, source)
        if METADATA_KEY not in header:
            raise ShiraFormatError(f"{source}: no '{METADATA_KEY}' in the safetensors header; not a SHiRA adapter file")
        tensors = _decode_tensors(data, source)
        metadata = _parse_json(header[METADATA_KEY], f"{source}: metadata '{METADATA_KEY}'")
        return cls.from_state_dict(tensors, metadata, source=source)

    def model_card(self, weight_name: str = SHIRA_WEIGHT_NAME, *, load_from: str | None = None, license: str | None = None,
                   local: bool = False) -> str:
        """The Hub model card (README.md text, built by `cards.adapter_card`) for this adapter saved as `weight_name`.

        `load_from` is where the usage block loads it from: the Hub repo id, or a folder (`local=True`; default: the
        folder the card is in, "."); `license`
        defaults to the base model's (read offline) or "other" (see `cards`).
        Usage: Path("README.md").write_text(adapter.model_card(load_from="me/bluefire", license="openrail"))
        """
        from .cards import adapter_card

        mask = f", {self.mask_type} mask" if self.mask_type else ""
        tensors = sum(1 for _ in self.items())
        summary = (f"A Sparse High Rank Adapter (SHiRA): {self.num_parameters:,} changed weights in {tensors} "
                   f"tensor{'s' if tensors != 1 else ''} of {', '.join(self.components)} ({self.density:.2%} of the weights it targets{mask}), default "
                   f"strength {self.default_alpha:g}. The file is this package's SHiRA format: it loads with "
                   "[shira-diffusion](https://pypi.org/project/shira-diffusion/)'s `load_shira_weights`.")
        prompt = self.extra.get("instance_prompt")
        card = adapter_card("shira", weight_name=weight_name, load_from=load_from or ".", base_model=self.base_model,
                            title="SHiRA adapter", summary=summary, license=license,
                            instance_prompt=prompt if isinstance(prompt, str) else None, local=local or load_from is None)
        return str(card)

    def save_pretrained(self, directory: str | os.PathLike, weight_name: str = SHIRA_WEIGHT_NAME, *,
                        repo_id: str | None = None, license: str | None = None) -> Path:
        """The adapter file plus a README.md model card in `directory`; `weight_name` must be a plain file name
        (see `checked_weight_name`), so nothing is written outside `directory`. The card's usage block loads the
        adapter from `repo_id` when given (where it will be uploaded), else from `directory`.

        Usage: adapter.save_pretrained("out/bluefire", license="creativeml-openrail-m")
        """
        directory = Path(directory)
        weight_name = checked_weight_name(weight_name)
        # Built before anything is written: a card that cannot be made leaves no half-saved folder.
        card = self.model_card(weight_name, load_from=repo_id or str(directory.resolve()), license=license, local=repo_id is None)
        self.save(directory / weight_name)
        try:
            write_atomically(directory / "README.md", lambda temp: Path(temp).write_text(card, encoding="utf-8"))
        except OSError as error:
            raise save_error(directory / "README.md", error, "the model card") from None
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        weight_name: str = SHIRA_WEIGHT_NAME,
        commit_message: str = "Upload SHiRA adapter",
        private: bool | None = None,
        token: str | None = None,
        license: str | None = None,
    ) -> str:
        """Upload the adapter file and its model card to a Hub model repo (created if missing); the card's usage
        block names the repo.

        Usage: adapter.push_to_hub("me/bluefire-shira")
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or repo_id  # "name" alone becomes "<user>/name" on the Hub
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, weight_name, repo_id=repo_id, license=license)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        return str(info)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_state_dicts(
        cls,
        base: Mapping[str, Any],
        tuned: Mapping[str, Any],
        component: str | None = "unet",
        *,
        mask_type: str | None = None,
        base_model: str | None = None,
    ) -> "ShiraAdapter":
        """Keep exactly the positions where `tuned` differs from `base` (deltas in fp32).

        With `component=None`, `base` and `tuned` map component name -> state dict.
        Usage: ShiraAdapter.from_state_dicts(unet0.state_dict(), unet1.state_dict(), component="unet")
        """
        if component is not None:
            base, tuned = {component: base}, {component: tuned}
        deltas: dict[str, dict[str, SparseDelta]] = {}
        for comp, tuned_sd in tuned.items():
            if comp not in base:
                raise ShiraFormatError(f"component {comp!r} is in the tuned state dicts but not in the base")
            base_sd = base[comp]
            storages = set()  # a state_dict() lists a tied weight under each of its names: keep the first
            for name, tuned_w in tuned_sd.items():
                if not torch.is_tensor(tuned_w) or not tuned_w.is_floating_point():
                    continue
                storage = (tuned_w.untyped_storage().data_ptr(), tuned_w.storage_offset(), tuple(tuned_w.shape), tuned_w.device)
                if storage in storages:
                    continue
                storages.add(storage)
                if name not in base_sd:
                    raise ShiraFormatError(f"{comp}.{name}: in the tuned state dict but not in the base")
                base_w = base_sd[name]
                if base_w.shape != tuned_w.shape:
                    raise ShiraFormatError(
                        f"{comp}.{name}: base shape {tuple(base_w.shape)} differs from tuned {tuple(tuned_w.shape)}"
                    )
                flat_base = base_w.detach().reshape(-1).cpu()
                flat_tuned = tuned_w.detach().reshape(-1).cpu()
                positions = torch.nonzero(flat_tuned != flat_base).flatten()
                if positions.numel() == 0:
                    continue
                values = flat_tuned[positions].to(torch.float32) - flat_base[positions].to(torch.float32)
                deltas.setdefault(comp, {})[name] = SparseDelta(tuple(tuned_w.shape), positions, values)
        if not deltas:
            raise ShiraFormatError("tuned and base state dicts are identical: nothing to store")
        return cls(deltas, mask_type=mask_type, base_model=base_model)

    @classmethod
    def from_peft(
        cls,
        path_or_dir: str | os.PathLike,
        component: str = "unet",
        *,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> "ShiraAdapter":
        """Read a PEFT SHiRA adapter (`adapter_config.json` + `adapter_model.safetensors`) into `component`.

        PEFT files do not store weight shapes. `shapes` (parameter name -> shape, e.g. from the target
        model's state dict) supplies them; without it they are inferred from PEFT's budget r*(m+n).
        Usage: ShiraAdapter.from_peft("peft_dir", component="unet", shapes={k: v.shape for k, v in unet.state_dict().items()})
        """
        return _read_peft_shira(Path(path_or_dir), component, shapes)

    def to_peft(self, directory: str | os.PathLike, component: str | None = None) -> Path:
        """Write one component in PEFT's SHiRA layout (loadable with `PeftModel.from_pretrained`)."""
        return _write_peft_shira(self, Path(directory), component)


# ---- PEFT's SHiRA layout ---------------------------------------------------------------------------
# PEFT stores, per nn.Linear, `base_model.model.<module>.shira_weight` (values, [K]) and
# `...shira_indices` (int32 [2, K]: rows, columns; float32 when written on Windows), with
# K = r * (out + in). It stores no shapes.
_PEFT_PREFIX = "base_model.model."


def _peft_files(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        return path / PEFT_CONFIG_NAME, path / PEFT_WEIGHT_NAME
    return path.parent / PEFT_CONFIG_NAME, path


def is_peft_shira_dir(path: Path) -> bool:
    """True when `path` is a folder (or weights file) with a PEFT adapter_config.json of type SHIRA."""
    config_path, _ = _peft_files(path)
    if not config_path.is_file():
        return False
    try:
        return json.loads(config_path.read_text()).get("peft_type") == "SHIRA"
    except (OSError, json.JSONDecodeError):
        return False


def _infer_peft_shape(key: str, rows: torch.Tensor, cols: torch.Tensor, r: Any) -> tuple[int, int]:
    # PEFT keeps exactly r*(m+n) entries. When the largest row and column index are m-1 and n-1,
    # that budget pins the shape down; otherwise the caller must give the shapes.
    count = rows.numel()
    low = (int(rows.max()) + 1, int(cols.max()) + 1)
    if isinstance(r, int) and r > 0 and count % r == 0 and sum(low) == count // r:
        return low
    raise ShiraFormatError(
        f"{key}: PEFT files do not store weight shapes and this one cannot be inferred from r={r!r}; "
        "pass shapes= (or load it with pipe.load_shira_weights, which reads them from the model)"
    )


def _read_peft_shira(path: Path, component: str, shapes: Mapping[str, tuple[int, ...]] | None) -> ShiraAdapter:
    config_path, weights_path = _peft_files(path)
    if weights_path.suffix.lower() in PICKLE_SUFFIXES:
        raise ShiraFormatError(f"{weights_path}: refusing to load a pickle file; only adapter_model.safetensors is read")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no PEFT adapter config")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: no PEFT adapter weights (adapter_model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ShiraFormatError(f"{config_path}: not valid JSON: {error}") from None
    if config.get("peft_type") != "SHIRA":
        raise ShiraFormatError(f"{config_path}: peft_type is {config.get('peft_type')!r}, expected 'SHIRA'")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ShiraFormatError(f"{weights_path}: not a readable safetensors file: {error}") from None
    deltas: dict[str, SparseDelta] = {}
    for key in sorted(tensors):
        if not key.endswith(".shira_weight"):
            if not key.endswith(".shira_indices"):
                raise ShiraFormatError(f"{weights_path}: unexpected key {key!r} (expected ...shira_weight / ...shira_indices)")
            continue
        module = key[: -len(".shira_weight")].removeprefix(_PEFT_PREFIX)
        index_key = key[: -len("shira_weight")] + "shira_indices"
        if index_key not in tensors:
            raise ShiraFormatError(f"{weights_path}: {key!r} has no matching {index_key!r}")
        values, indices = tensors[key], tensors[index_key]
        if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] != values.numel():
            raise ShiraFormatError(
                f"{weights_path}: {index_key!r} has shape {tuple(indices.shape)}, expected (2, {values.numel()})"
            )
        if indices.is_floating_point():  # PEFT writes float32 indices on Windows
            if not bool((indices == indices.round()).all()):
                raise ShiraFormatError(f"{weights_path}: {index_key!r} holds non-integer indices")
        indices = indices.to(torch.int64)
        if int(indices.min()) < 0:
            raise ShiraFormatError(f"{weights_path}: {index_key!r} holds negative indices")
        name = f"{module}.weight"
        if shapes is not None:
            if name not in shapes:
                raise ShiraFormatError(f"{weights_path}: {component} has no weight {name!r}")
            shape = tuple(shapes[name])
        else:
            shape = _infer_peft_shape(f"{weights_path}: {name}", indices[0], indices[1], config.get("r"))
        if len(shape) != 2 or int(indices[0].max()) >= shape[0] or int(indices[1].max()) >= shape[1]:
            raise ShiraFormatError(f"{weights_path}: indices of {name!r} do not fit its shape {shape}")
        flat = indices[0] * shape[1] + indices[1]
        order = torch.argsort(flat)
        deltas[name] = SparseDelta(shape, flat[order], values.reshape(-1)[order])
    if not deltas:
        raise ShiraFormatError(f"{weights_path}: no ...shira_weight tensors found")
    adapter = ShiraAdapter(
        {component: deltas},
        mask_type=str(config.get("mask_type") or "random"),
        base_model=config.get("base_model_name_or_path"),
        extra={"peft_r": config.get("r")},
    )
    adapter.validate()
    return adapter


def _write_peft_shira(adapter: ShiraAdapter, directory: Path, component: str | None) -> Path:
    from peft import ShiraConfig  # PEFT writes its own config so the file matches what it expects

    if component is None:
        if len(adapter.components) != 1:
            raise ShiraFormatError(
                f"a PEFT adapter holds one model; this adapter spans {adapter.components}: pass component="
            )
        component = adapter.components[0]
    if component not in adapter.deltas:
        raise ShiraFormatError(f"adapter has no component {component!r} (has {adapter.components})")
    budgets: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, delta in sorted(adapter.deltas[component].items()):
        if len(delta.shape) != 2 or not name.endswith(".weight"):
            raise ShiraFormatError(f"{component}.{name}: PEFT SHiRA supports nn.Linear weights only (shape {delta.shape})")
        rows, cols = delta.shape
        if delta.numel % (rows + cols):
            raise ShiraFormatError(
                f"{component}.{name}: {delta.numel} parameters is not r*(out+in) = r*{rows + cols} for any whole r; "
                "PEFT cannot represent this budget"
            )
        budgets.add(delta.numel // (rows + cols))
        module = name[: -len(".weight")]
        positions = delta.positions.to(torch.int64)
        tensors[f"{_PEFT_PREFIX}{module}.shira_weight"] = delta.deltas.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{module}.shira_indices"] = torch.stack([positions // cols, positions % cols]).to(torch.int32)
    if len(budgets) != 1:
        raise ShiraFormatError(f"PEFT needs one r for all layers; this adapter's layers imply r in {sorted(budgets)}")
    directory.mkdir(parents=True, exist_ok=True)
    config = ShiraConfig(
        r=budgets.pop(),
        mask_type="custom",
        target_modules=sorted(name[: -len(".weight")] for name in adapter.deltas[component]),
        inference_mode=True,
        base_model_name_or_path=adapter.base_model,
    )
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / PEFT_WEIGHT_NAME), metadata={"format": "pt"})
    return directory
