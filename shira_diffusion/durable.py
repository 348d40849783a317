"""Durable, self-cleaning saves: a file is written whole or not at all, and survives a crash once saved.

Invariant: a reader of `path` sees the old file or the new one, never a mix; after a save returns, the data and
the rename are on disk (fsync of the file, then of its folder); a failed save leaves no temp file, and the temp
file of a writer that was killed is removed by the next save to the same path (never one of a live writer).

How: a save writes `.<name>.<host>.<pid>.<random>.tmp` beside the target, flushes it, then renames it over the
target. A killed writer leaves that file behind; the next save to the same target removes the ones whose
writer (same host, pid) is gone. Files of live writers, of other hosts (a shared network folder) or of unknown
shape are kept.

Usage:
    remove_stale_temp_files(path); write_atomically(path, lambda tmp: save_file(tensors, tmp))
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path


def host_tag() -> str:
    """A short, file-name-safe tag of this host: pids only mean something on the host that issued them."""
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{host_tag()}."


def process_alive(pid: int) -> bool:
    """True unless process `pid` of this host is known to have exited (when in doubt: alive, so its file is kept)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows; keep its files
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    return True


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Remove the temp files of earlier saves to `path` whose writer process no longer runs; returns them."""
    prefix, removed = temp_prefix(path), []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed  # cleaning up is a courtesy: the save itself reports real problems with the folder
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        pid, _, token = entry.name[len(prefix):-len(".tmp")].partition(".")
        if not (pid.isdigit() and token and "." not in token) or process_alive(int(pid)):
            continue
        with suppress(OSError):  # another save may have removed it first; one we may not remove is left alone
            os.remove(entry.path)
            removed.append(Path(entry.path))
    return removed


def fsync_directory(directory: Path) -> None:
    """Flush a folder's entries (the rename) to disk, where the OS allows opening a folder (not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """`write(temp path)`, flush it to disk, rename it over `path`, flush the folder; no temp file is left on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{temp_prefix(path)}{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)  # the writer closed its handle: flush through a new one (same file)
        try:
            os.fsync(fd)  # the data must be on disk before the rename makes it the file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        with suppress(OSError):
            os.remove(tmp)  # after a successful rename there is nothing left to remove
    fsync_directory(path.parent)


def save_error(path: Path, error: Exception, what: str = "the file") -> OSError:
    """An OSError naming `path` (PermissionError, ... as the errno says) for a failed save; safetensors reports
    I/O failures as SafetensorError("...: I/O error: No space left on device (os error 28)"), errno in the text."""
    if isinstance(error, OSError):
        code, reason = error.errno, error.strerror or str(error)
    else:
        found = re.search(r"\(os error (\d+)\)|\bcode: (\d+)", str(error))
        code = int(found.group(1) or found.group(2)) if found else errno.EIO
        reason = f"{os.strerror(code)} ({error})"
    message = f"{path}: could not save {what}: {reason}"
    return OSError(code, message) if code else OSError(message)  # OSError(errno, ...) picks the subclass


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk (before a rename publishes them)."""
    for root, _, files in os.walk(folder):
        for name in files:
            descriptor = os.open(os.path.join(root, name), os.O_RDWR)  # writable: Windows syncs only those
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_directory(Path(root))
