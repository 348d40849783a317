"""Adapter format: round trips, compactness, atomic save, and every malformed-file case."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from shira_diffusion import ShiraAdapter, ShiraFormatError, SparseDelta
from shira_diffusion.format import METADATA_KEY, encode_positions


def random_delta(shape, density, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    size = math.prod(shape)
    count = max(1, int(size * density))
    positions = torch.randperm(size, generator=generator)[:count].sort().values
    return SparseDelta(shape, positions, torch.randn(count, generator=generator).to(dtype))


def test_positions_round_trip_including_gaps_beyond_16_bits(tmp_path):
    positions = torch.tensor([0, 1, 65535, 65536, 65536 + 70000, 5_000_000, 5_000_001, 2**31 - 2])
    encoded = encode_positions(positions)
    assert encoded["gaps"].dtype == torch.uint16
    assert encoded["gaps_hi"].numel() == 3  # only the three gaps >= 2**16 need high bits
    delta = SparseDelta((2**16, 2**15), positions, torch.arange(8.0))
    loaded = ShiraAdapter.load(ShiraAdapter({"unet": {"w": delta}}).save(tmp_path / "far.safetensors"))
    assert torch.equal(loaded.deltas["unet"]["w"].positions, positions)


def test_save_load_round_trip(tmp_path):
    adapter = ShiraAdapter(
        {
            "unet": {"a.weight": random_delta((64, 48), 0.05, 0), "conv.weight": random_delta((8, 4, 3, 3), 0.1, 1)},
            "text_encoder": {"q.weight": random_delta((32, 32), 0.02, 2)},
        },
        mask_type="snip",
        default_alpha=0.8,
        base_model="some/model",
        extra={"steps": 10},
    )
    path = adapter.save(tmp_path / "adapter.safetensors")
    loaded = ShiraAdapter.load(path)
    assert loaded.components == ["text_encoder", "unet"]
    assert (loaded.mask_type, loaded.default_alpha, loaded.base_model, loaded.extra) == ("snip", 0.8, "some/model", {"steps": 10})
    for (c1, n1, d1), (c2, n2, d2) in zip(adapter.items(), loaded.items()):
        assert (c1, n1, d1.shape) == (c2, n2, d2.shape)
        assert torch.equal(d1.positions, d2.positions) and torch.equal(d1.deltas, d2.deltas)
    assert loaded.num_parameters == adapter.num_parameters
    summary = loaded.summary()
    assert "unet: 2 tensors" in summary and "text_encoder: 1 tensors" in summary and "snip" in summary


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_cost_at_most_4_bytes_per_parameter(tmp_path, dtype):
    # SD-like layer shapes at 2 % density; the header's fixed cost is amortised as in a real adapter.
    deltas = {f"block{i}.weight": random_delta((1280, 1280), 0.02, i, dtype) for i in range(8)}
    adapter = ShiraAdapter({"unet": deltas})
    path = adapter.save(tmp_path / "a.safetensors")
    assert path.stat().st_size / adapter.num_parameters <= 4.02


def test_from_state_dicts_keeps_exactly_the_changed_positions():
    base = {"w": torch.randn(10, 10), "b": torch.randn(10), "steps": torch.tensor(3)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["w"].view(-1)[[3, 17, 99]] += torch.tensor([1.0, -2.0, 0.5])
    adapter = ShiraAdapter.from_state_dicts(base, tuned, component="unet")
    delta = adapter.deltas["unet"]["w"]
    assert adapter.components == ["unet"] and list(adapter.deltas["unet"]) == ["w"]
    assert delta.positions.tolist() == [3, 17, 99]
    assert torch.allclose(delta.deltas, torch.tensor([1.0, -2.0, 0.5]))
    assert torch.equal(base["w"] + delta.to_dense(), tuned["w"])


def test_from_state_dicts_multi_component():
    base = {"unet": {"w": torch.zeros(4, 4)}, "text_encoder": {"w": torch.zeros(2, 2)}}
    tuned = {"unet": {"w": torch.eye(4)}, "text_encoder": {"w": torch.ones(2, 2)}}
    adapter = ShiraAdapter.from_state_dicts(base, tuned, component=None)
    assert adapter.components == ["text_encoder", "unet"]
    assert adapter.num_parameters == 4 + 4


def test_from_state_dicts_rejects_identical_and_mismatched():
    with pytest.raises(ShiraFormatError, match="identical"):
        ShiraAdapter.from_state_dicts({"w": torch.ones(2)}, {"w": torch.ones(2)})
    with pytest.raises(ShiraFormatError, match=r"unet\.w: base shape \(2,\) differs"):
        ShiraAdapter.from_state_dicts({"w": torch.ones(2)}, {"w": torch.ones(3)})


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    ShiraAdapter({"unet": {"w": random_delta((8, 8), 0.2, 0)}}).save(path)
    before = path.read_bytes()

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("shira_diffusion.format.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ShiraAdapter({"unet": {"w": random_delta((8, 8), 0.5, 1)}}).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def write_raw(path, tensors, shapes, version=1):
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps({"format_version": version, "shapes": shapes})})
    return path


def good_tensors(positions=(1, 5, 9), deltas=(0.5, -1.0, 2.0)):
    encoded = encode_positions(torch.tensor(positions))
    return {"unet.w.deltas": torch.tensor(deltas), **{f"unet.w.{k}": v for k, v in encoded.items()}}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update({"unet.w.deltas": torch.tensor([0.5, float("nan"), 2.0])}), r"unet\.w: non-finite delta nan"),
        (lambda t: t.update({"unet.w.deltas": torch.tensor([1, 2, 3])}), r"unet\.w: deltas must be floating point, found torch\.int64"),
        (lambda t: t.update({"unet.w.gaps": torch.tensor([2.0, 4.0, 4.0])}), r"unet\.w\.gaps: expected uint16, found torch\.float32"),
        (lambda t: t.update({"unet.w.gaps": torch.tensor([2, 0, 4], dtype=torch.int32).to(torch.uint16)}), r"unet\.w: duplicate position 1"),
        (lambda t: t.update({"unet.w.gaps": torch.tensor([2, 4, 200], dtype=torch.int32).to(torch.uint16)}), r"unet\.w: position 205 is out of range for a weight of shape \(10, 10\)"),
        (lambda t: t.update({"unet.w.gaps_hi": torch.tensor([-1], dtype=torch.int32), "unet.w.gaps_hi_index": torch.tensor([0], dtype=torch.int32)}), r"unet\.w\.gaps_hi: negative"),
        (lambda t: t.update({"unet.w.deltas": torch.tensor([0.5, 1.0])}), r"unet\.w: 3 positions but 2 deltas"),
        (lambda t: t.pop("unet.w.gaps"), r"missing tensor 'unet\.w\.gaps'"),
        (lambda t: t.update({"unet.extra": torch.zeros(1)}), r"unexpected tensor 'unet\.extra'"),
    ],
)
def test_malformed_files_raise_errors_naming_the_key(tmp_path, mutate, message):
    tensors = good_tensors()
    mutate(tensors)
    path = write_raw(tmp_path / "bad.safetensors", tensors, {"unet.w": [10, 10]})
    with pytest.raises(ShiraFormatError, match=message):
        ShiraAdapter.load(path)


def test_in_memory_adapter_checks_negative_unsorted_and_float_positions():
    shape = (10, 10)
    with pytest.raises(ShiraFormatError, match="negative position -1"):
        ShiraAdapter({"unet": {"w": SparseDelta(shape, torch.tensor([-1, 3]), torch.ones(2))}}).validate()
    with pytest.raises(ShiraFormatError, match=r"not sorted \(7 comes before 3\)"):
        ShiraAdapter({"unet": {"w": SparseDelta(shape, torch.tensor([7, 3]), torch.ones(2))}}).validate()
    huge = 1 << 62  # steps between these overflow int64: the order must be compared, not subtracted
    with pytest.raises(ShiraFormatError, match=rf"not sorted \({huge} comes before {-huge}\)"):
        ShiraAdapter({"unet": {"w": SparseDelta(shape, torch.tensor([0, huge, -huge]), torch.ones(3))}}).validate()
    with pytest.raises(ShiraFormatError, match="positions must be integers, found torch.float32"):
        ShiraAdapter({"unet": {"w": SparseDelta(shape, torch.tensor([1.0, 3.0]), torch.ones(2))}}).validate()


@pytest.mark.parametrize(
    "metadata, message",
    [
        ([1, 2], "metadata must be a JSON object, found list"),
        ({"default_alpha": [1]}, r"'default_alpha' must be a finite number, found \[1\]"),
        ({"default_alpha": None}, "'default_alpha' must be a finite number, found None"),
        ({"extra": [1, 2]}, r"'extra' must be a JSON object, found \[1, 2\]"),
        ({"mask_type": 3}, "'mask_type' must be a string or null, found 3"),
    ],
)
def test_malformed_metadata_fields_raise_format_errors(tmp_path, metadata, message):
    if isinstance(metadata, dict):
        metadata = {"format_version": 1, "shapes": {"unet.w": [10, 10]}, **metadata}
    path = tmp_path / "bad.safetensors"
    save_file(good_tensors(), str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(ShiraFormatError, match=message):
        ShiraAdapter.load(path)


def test_version_corrupt_truncated_and_non_shira_files(tmp_path):
    with pytest.raises(ShiraFormatError, match="unsupported SHiRA format version 99"):
        ShiraAdapter.load(write_raw(tmp_path / "v.safetensors", good_tensors(), {"unet.w": [10, 10]}, version=99))
    good = write_raw(tmp_path / "good.safetensors", good_tensors(), {"unet.w": [10, 10]})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(ShiraFormatError, match="truncated.safetensors: not a readable safetensors file"):
        ShiraAdapter.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file at all")
    with pytest.raises(ShiraFormatError, match="garbage.safetensors: not a readable safetensors file"):
        ShiraAdapter.load(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ShiraFormatError, match="not a SHiRA adapter file"):
        ShiraAdapter.load(plain)


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "adapter.bin"

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    torch.save({"x": Boom()}, path)
    with pytest.raises(ShiraFormatError, match="refusing to load a pickle file"):
        ShiraAdapter.load(path)


def test_to_dtype_and_dense():
    adapter = ShiraAdapter({"unet": {"w": SparseDelta((2, 3), torch.tensor([1, 5]), torch.tensor([1.5, -2.0]))}})
    half = adapter.to(torch.float16)
    assert half.deltas["unet"]["w"].deltas.dtype == torch.float16
    assert torch.equal(adapter.deltas["unet"]["w"].to_dense(), torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, -2.0]]))


def test_meta_or_non_tensor_state_dict_values_are_refused():
    adapter = ShiraAdapter({"unet": {"x.weight": SparseDelta((4, 4), torch.tensor([1, 5]), torch.tensor([0.5, -2.0]))}})
    tensors, metadata = adapter.state_dict(), adapter.metadata()
    for key, bad, message in (("unet.x.weight.deltas", torch.ones(2, device="meta"), "is on the meta device"),
                              ("unet.x.weight.gaps", [1, 4], "is a list, not a tensor")):
        with pytest.raises(ShiraFormatError, match=f"'{key}' {message}"):
            ShiraAdapter.from_state_dict({**tensors, key: bad}, metadata)
    again = ShiraAdapter.from_state_dict(tensors, metadata)
    delta = again.deltas["unet"]["x.weight"]
    assert delta.positions.tolist() == [1, 5] and delta.deltas.tolist() == [0.5, -2.0] and delta.deltas.device.type == "cpu"
