"""Adapter files under stress: torn reads, JSON bombs, huge shapes, strength bounds, unsafe names, and saves that
are killed, refused or run out of space."""

import builtins
import io
import json
import os
import pathlib
import re
import signal
import subprocess

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from shira_diffusion import ShiraAdapter, ShiraFormatError, SparseDelta
from shira_diffusion import format as shira_format
from shira_diffusion import durable
from shira_diffusion.cli import main as cli_main
from shira_diffusion.format import MAX_ALPHA, METADATA_KEY, checked_weight_name, encode_positions

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def small_adapter(value=1.0, version="A", alpha=0.5):
    """Same keys, shapes and positions whatever `value`: two versions differ only in values and metadata."""
    positions = torch.tensor([1, 5, 9, 40])
    return ShiraAdapter({"unet": {"w": SparseDelta((10, 10), positions, torch.full((4,), value))}},
                        default_alpha=alpha, extra={"version": version})


def good_tensors():
    encoded = encode_positions(torch.tensor([1, 5, 9]))
    return {"unet.w.deltas": torch.tensor([0.5, -1.0, 2.0]), **{f"unet.w.{k}": v for k, v in encoded.items()}}


def write_metadata(path, text):
    """A file with valid tensors and `text` (any string) as the SHiRA metadata."""
    save_file(good_tensors(), str(path), metadata={METADATA_KEY: text})
    return path


def with_fields(**fields):
    return json.dumps({"format_version": 1, "shapes": {"unet.w": [10, 10]}, **fields})


# ---- 1. one read: header and tensors of the same version ---------------------------------------------------------
def test_a_file_replaced_during_load_never_mixes_versions(tmp_path, monkeypatch):
    path, staged = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    small_adapter(1.0, "A", 0.5).save(path)
    small_adapter(-3.0, "B", 0.25).save(staged)
    swapped = []

    def swap_after_open(original):
        # Whatever opens the file first (safetensors' safe_open, open, Path.open, Path.read_bytes), another
        # process's atomic save lands right after it: later opens see version B.
        def wrapper(first, *args, **kwargs):
            result = original(first, *args, **kwargs)
            if not swapped and isinstance(first, (str, os.PathLike)) and os.fspath(first) == str(path):
                os.replace(staged, path)
                swapped.append(True)
            return result
        return wrapper

    for owner, name in ((shira_format, "safe_open"), (builtins, "open"), (io, "open"),
                        (pathlib.Path, "open"), (pathlib.Path, "read_bytes")):
        monkeypatch.setattr(owner, name, swap_after_open(getattr(owner, name)), raising=False)
    loaded = ShiraAdapter.load(path)
    monkeypatch.undo()
    assert swapped, "the file was never replaced: the test did not exercise the race"
    delta = loaded.deltas["unet"]["w"].deltas
    # the version that was opened, whole: its values with its own metadata
    assert (loaded.extra["version"], loaded.default_alpha, delta.tolist()) == ("A", 0.5, [1.0] * 4)
    assert ShiraAdapter.load(path).extra["version"] == "B"  # and the replacement did happen


def test_from_bytes_reads_header_and_tensors_from_the_same_bytes(tmp_path):
    path = small_adapter(2.0, "A").save(tmp_path / "a.safetensors")
    loaded = ShiraAdapter.from_bytes(path.read_bytes(), source="blob")
    assert loaded.extra == {"version": "A"} and loaded.deltas["unet"]["w"].deltas.tolist() == [2.0] * 4
    with pytest.raises(ShiraFormatError, match="blob: not a readable safetensors file"):
        ShiraAdapter.from_bytes(path.read_bytes()[:5], source="blob")


# ---- 2. JSON bombs, huge shapes, every malformed field -------------------------------------------------------------
def test_deeply_nested_metadata_is_a_format_error_in_load_and_inspect(tmp_path, capsys):
    path = write_metadata(tmp_path / "bomb.safetensors", "[" * 100_000)
    with pytest.raises(ShiraFormatError, match=r"bomb\.safetensors: metadata 'shira_metadata': JSON nested 100000 levels deep"):
        ShiraAdapter.load(path)
    assert cli_main(["inspect", str(path)]) == 2
    assert "bomb.safetensors" in capsys.readouterr().err
    deep_extra = write_metadata(tmp_path / "extra.safetensors", with_fields(extra={"x": json.loads("[" * 500 + "]" * 500)}))
    with pytest.raises(ShiraFormatError, match="JSON nested 502 levels deep"):
        ShiraAdapter.load(deep_extra)


def test_deeply_nested_safetensors_header_is_refused_before_parsing(tmp_path):
    header = ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    path = tmp_path / "header.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ShiraFormatError, match=r"header\.safetensors: not a readable safetensors file.*nested 100001 levels"):
        ShiraAdapter.load(path)


def test_brackets_inside_json_strings_do_not_count_as_nesting(tmp_path):
    text = with_fields(extra={"note": "[" * 1000 + '\\"{{{' + "]" * 3})
    loaded = ShiraAdapter.load(write_metadata(tmp_path / "a.safetensors", text))
    assert loaded.extra["note"].startswith("[[[")


@pytest.mark.parametrize(
    "shape, message",
    [
        ([2**32, 2**32, 2**32], r"has more than 281474976710656 \(2\*\*48\) entries"),
        ([2**70, 1], "has more than"),
        ([2**40, 2**40], "has more than"),
        ([0, 10], r"dimensions must be >= 1, found \[0, 10\]"),
        ([-10, -10], "dimensions must be >= 1"),
        ([True, 10], r"expected a list of positive integers, found \[True, 10\]"),
        ([10.0, 10], "expected a list of positive integers"),
        (["10", 10], "expected a list of positive integers"),
        ("10x10", "expected a list of positive integers"),
        ({"rows": 10}, "expected a list of positive integers"),
        (None, "expected a list of positive integers, found None"),
        ([1] * 17, "expected at most 16 dimensions, found 17"),
    ],
)
def test_bad_shapes_are_format_errors_naming_file_and_key(tmp_path, shape, message):
    path = write_metadata(tmp_path / "shape.safetensors", json.dumps({"format_version": 1, "shapes": {"unet.w": shape}}))
    with pytest.raises(ShiraFormatError, match=rf"shape\.safetensors: shape of 'unet\.w': .*{message}"):
        ShiraAdapter.load(path)


@pytest.mark.parametrize(
    "text, message",
    [
        (with_fields(default_alpha=1e39), r"'default_alpha' must be a finite number, found 1e\+39 \(expected \|x\| <= 3\.40282e\+38"),
        (with_fields(default_alpha=-1e39), "'default_alpha' must be a finite number, found -1e"),
        (with_fields(default_alpha=10**400), "'default_alpha' must be a finite number, found 1000000000"),
        (with_fields(default_alpha=float("inf")), "'default_alpha' must be a finite number, found inf"),
        (with_fields(default_alpha=float("nan")), "'default_alpha' must be a finite number, found nan"),
        (with_fields(default_alpha=True), "'default_alpha' must be a finite number, found True"),
        (with_fields(default_alpha="0.5"), "'default_alpha' must be a finite number, found '0.5'"),
        (with_fields(default_alpha={"unet": 1}), "'default_alpha' must be a finite number"),
        (with_fields(mask_type=["random"]), "'mask_type' must be a string or null"),
        (with_fields(base_model={"id": 1}), "'base_model' must be a string or null"),
        (with_fields(extra="notes"), "'extra' must be a JSON object, found 'notes'"),
        (with_fields(extra=0), "'extra' must be a JSON object, found 0"),
        (with_fields(extra=[]), r"'extra' must be a JSON object, found \[\]"),
        (json.dumps({"format_version": True, "shapes": {"unet.w": [10, 10]}}), "unsupported SHiRA format version True"),
        (json.dumps({"format_version": "1", "shapes": {"unet.w": [10, 10]}}), "unsupported SHiRA format version '1'"),
        (json.dumps({"format_version": 1, "shapes": [["unet.w", [10, 10]]]}), "metadata has no 'shapes' table"),
        (json.dumps({"format_version": 1, "shapes": "unet.w"}), "metadata has no 'shapes' table"),
        (json.dumps({"format_version": 1}), "metadata has no 'shapes' table"),
        ('"just a string"', "metadata must be a JSON object, found str"),
        ("null", "metadata must be a JSON object, found NoneType"),
        ("3", "metadata must be a JSON object, found int"),
        ('{"format_version": 1, "format_version": 1, "shapes": {"unet.w": [10, 10]}}', "key 'format_version' appears more than once"),
        ('{"format_version": 1, "shapes": {"unet.w": [10, 10]}, "default_alpha": 1' + "0" * 5000 + "}", "not valid JSON"),
        ('{"format_version": 1, "shapes": {"unet.w": [10, 10]', "not valid JSON"),
    ],
)
def test_every_malformed_metadata_field_is_a_format_error(tmp_path, text, message):
    path = write_metadata(tmp_path / "meta.safetensors", text)
    with pytest.raises(ShiraFormatError, match=message) as raised:
        ShiraAdapter.load(path)
    assert "meta.safetensors" in str(raised.value)


def test_non_string_keys_in_python_metadata_are_format_errors():
    tensors = {f"1.{k[len('unet.w.'):]}": v for k, v in good_tensors().items()}
    with pytest.raises(ShiraFormatError, match="metadata 'shapes' key 1 is not a string"):
        ShiraAdapter.from_state_dict(tensors, {"format_version": 1, "shapes": {1: [10, 10]}})
    with pytest.raises(ShiraFormatError, match="tensor name 7 is not a string"):
        ShiraAdapter.from_state_dict({**good_tensors(), 7: torch.zeros(1)}, {"format_version": 1, "shapes": {"unet.w": [10, 10]}})
    with pytest.raises(ShiraFormatError, match="'extra' must be a JSON object"):
        ShiraAdapter.from_state_dict(good_tensors(), {"format_version": 1, "shapes": {"unet.w": [10, 10]}, "extra": {3: "x"}})


def test_a_key_without_a_component_or_a_name_is_a_format_error():
    tensors = {f".w.{k[len('unet.w.'):]}": v for k, v in good_tensors().items()}
    with pytest.raises(ShiraFormatError, match=r"key '\.w' has no component prefix"):
        ShiraAdapter.from_state_dict(tensors, {"format_version": 1, "shapes": {".w": [10, 10]}}, source="sd")


# ---- 3. strength bounds -------------------------------------------------------------------------------------
def test_default_alpha_must_fit_float32_in_python_built_adapters(tmp_path):
    delta = SparseDelta((4, 4), torch.tensor([1, 5]), torch.tensor([0.5, -2.0]))
    for bad in (1e39, -1e39, float("inf"), float("nan"), True, "1.0", None):
        with pytest.raises(ShiraFormatError, match="'default_alpha' must be a finite number"):
            ShiraAdapter({"unet": {"w": delta}}, default_alpha=bad)
    adapter = ShiraAdapter({"unet": {"w": delta}}, default_alpha=FLOAT32_MAX)  # the largest float32 is fine
    assert ShiraAdapter.load(adapter.save(tmp_path / "max.safetensors")).default_alpha == FLOAT32_MAX == MAX_ALPHA
    adapter.default_alpha = 1e39  # set after construction: validate() (and so save()) still refuse it
    with pytest.raises(ShiraFormatError, match="'default_alpha' must be a finite number, found 1e\\+39"):
        adapter.validate()
    with pytest.raises(ShiraFormatError, match="'default_alpha'"):
        adapter.save(tmp_path / "big.safetensors")
    assert not (tmp_path / "big.safetensors").exists()


def test_validate_checks_extra_and_names_so_a_saved_file_loads_back(tmp_path):
    delta = SparseDelta((4, 4), torch.tensor([1, 5]), torch.tensor([0.5, -2.0]))
    with pytest.raises(ShiraFormatError, match="'extra' cannot be written as JSON"):
        ShiraAdapter({"unet": {"w": delta}}, extra={"when": object()}).validate()
    with pytest.raises(ShiraFormatError, match="'extra' nests more than 64 levels"):
        ShiraAdapter({"unet": {"w": delta}}, extra={"x": json.loads("[" * 80 + "]" * 80)}).save(tmp_path / "deep.safetensors")
    with pytest.raises(ShiraFormatError, match="component 'unet.x' must be a non-empty name without '.'"):
        ShiraAdapter({"unet.x": {"w": delta}}).validate()
    with pytest.raises(ShiraFormatError, match=r"unet\.w: shape: \(1099511627776, 1099511627776\) has more than"):
        ShiraAdapter({"unet": {"w": SparseDelta((2**40, 2**40), torch.tensor([1]), torch.ones(1))}}).validate()
    assert not list(tmp_path.iterdir())


# ---- 4. saves: inside their folder, durable, self-cleaning, clear errors ----------------------------------------------
@pytest.mark.parametrize("name", ["../escape.safetensors", "/tmp/abs.safetensors", "sub/x.safetensors", "sub\\x.safetensors",
                                  ".", "..", "", "   ", "x.bin", "x.safetensors.bak", "C:x.safetensors", ".safetensors", 5, None])
def test_unsafe_weight_names_are_refused(tmp_path, name):
    with pytest.raises(ShiraFormatError, match="weight_name"):
        checked_weight_name(name)
    with pytest.raises(ShiraFormatError, match="weight_name"):
        small_adapter().save_pretrained(tmp_path / "out", weight_name=name)
    assert not list(tmp_path.iterdir())  # nothing written, not even the folder


def test_plain_weight_names_are_kept(tmp_path):
    assert checked_weight_name("my style v2.safetensors") == "my style v2.safetensors"
    small_adapter().save_pretrained(tmp_path / "out", weight_name="style.safetensors")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "style.safetensors"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc")
def test_save_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.fspath(source)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    small_adapter().save(tmp_path / "a.safetensors")
    monkeypatch.undo()
    (_, synced), (_, renamed), (_, folder) = events
    assert synced == os.path.realpath(renamed) and pathlib.Path(renamed).name.startswith(".a.safetensors.")  # flushed first
    assert folder == str(tmp_path.resolve())  # then the folder holding the new name


def _temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a real process to kill (POSIX fork)")
def test_a_save_killed_mid_write_leaves_a_temp_file_that_the_next_save_removes(tmp_path):
    path = tmp_path / "a.safetensors"
    adapter = small_adapter()
    pid = os.fork()
    if pid == 0:  # the child: a real process killed (SIGKILL, no cleanup) while writing
        try:
            def killed_while_writing(tensors, filename, metadata=None):
                with open(filename, "wb") as handle:
                    handle.write(b"\0" * 4096)
                    handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            shira_format.save_file = killed_while_writing
            adapter.save(path)
        finally:
            os._exit(1)  # never reached after the kill; never return into pytest either
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = _temp_files(tmp_path)
    assert len(left) == 1 and f".{pid}." in left[0] and not path.exists()
    small_adapter(2.0).save(path)
    assert _temp_files(tmp_path) == []  # the dead writer's file is gone
    assert ShiraAdapter.load(path).deltas["unet"]["w"].deltas.tolist() == [2.0] * 4


@pytest.mark.skipif(os.name == "nt", reason="on Windows no temp file is judged stale (pids are not probed there)")
def test_temp_files_of_live_writers_other_hosts_and_other_targets_are_kept(tmp_path):
    path = tmp_path / "a.safetensors"
    dead = subprocess.Popen(["true"])
    dead.wait()  # exited and reaped: its pid no longer runs
    live = subprocess.Popen(["sleep", "60"])
    try:
        prefix = durable.temp_prefix(path)
        names = {
            "dead": f"{prefix}{dead.pid}.x1y2.tmp",
            "live": f"{prefix}{live.pid}.x1y2.tmp",
            "self": f"{prefix}{os.getpid()}.x1y2.tmp",  # a concurrent save in this process
            "other host": f".a.safetensors.0000beef.{dead.pid}.x1y2.tmp",
            "other target": f"{durable.temp_prefix(tmp_path / 'b.safetensors')}{dead.pid}.x1y2.tmp",
            "unknown shape": ".a.safetensors.k3j4h5.tmp",  # written before pids were in the name: owner unknown
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        small_adapter().save(path)
        assert set(_temp_files(tmp_path)) == set(names.values()) - {names["dead"]}
    finally:
        live.kill()
        live.wait()


def test_concurrent_saves_in_threads_never_remove_each_others_temp_files(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "a.safetensors"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: small_adapter(float(i)).save(path), range(16)))
    assert _temp_files(tmp_path) == [] and ShiraAdapter.load(path).extra == {"version": "A"}


def test_a_full_disk_raises_an_oserror_naming_the_path_and_leaves_no_temp_file(tmp_path):
    resource = pytest.importorskip("resource")  # POSIX file size limits
    path = tmp_path / "a.safetensors"
    small_adapter(1.0).save(path)
    before = path.read_bytes()
    big = ShiraAdapter({"unet": {"w": SparseDelta((100, 100), torch.arange(0, 10_000, 2), torch.randn(5000))}})
    # A real write failure: files may not grow past 4 KiB (EFBIG; SIGXFSZ ignored so the process lives on).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as raised:
            big.save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert not isinstance(raised.value, SafetensorError)
    assert str(path) in str(raised.value) and "File too large" in str(raised.value)
    assert path.read_bytes() == before and _temp_files(tmp_path) == []


def test_no_space_left_reported_by_safetensors_becomes_an_oserror(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"

    def out_of_space(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"\0" * 100)  # a partial write, as a full disk leaves it
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(shira_format, "save_file", out_of_space)
    with pytest.raises(OSError, match=rf"{re.escape(str(path))}: could not save the SHiRA adapter: No space left on device") as raised:
        small_adapter().save(path)
    assert raised.value.errno == 28 and not isinstance(raised.value, SafetensorError)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_raises_permission_error_naming_the_path(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    if getattr(os, "geteuid", lambda: 0)() != 0:  # a real read-only folder (root writes anyway: then the refusal is simulated)
        folder.chmod(0o555)
    else:
        def refuse(*args, dir=None, prefix="", suffix="", **kwargs):
            raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "xyz" + suffix))

        monkeypatch.setattr(shira_format.tempfile, "mkstemp", refuse)
    try:
        expected = rf"{re.escape(str(folder / 'a.safetensors'))}: could not save the SHiRA adapter: Permission denied"
        with pytest.raises(PermissionError, match=expected):
            small_adapter().save(folder / "a.safetensors")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)
