"""Atomic file writes: a reader never sees a half-written artifact.

A write that fails (read-only folder, full disk, a folder in the way, ...) raises
`OutputError` naming the file and the fix; the temporary file is removed and the previous
version of the file, if any, is left exactly as it was.

The file gets the permissions any other tool would give it, ``0o666`` less the process's
umask: ``tempfile.mkstemp`` creates its file ``0o600`` (right for a temporary file, wrong for
a report a colleague should read), so the temporary file is chmod'ed before it is renamed.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from autoquant.errors import OutputError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save",
           "output_error", "ensure_directory", "file_mode"]

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write to another output directory",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: choose another output directory",
    errno.EACCES: "permission denied: make the folder writable or choose another one",
    errno.EPERM: "permission denied: make the folder writable or choose another one",
    errno.EISDIR: "a folder of that name is in the way: remove or rename it, or choose "
                  "another output directory",
    errno.ENOTDIR: "a file is in the way where a folder should be: remove or rename it, or "
                   "choose another output directory",
    errno.EEXIST: "a file is in the way where a folder should be: remove or rename it, or "
                  "choose another output directory",
}
_UMASK_LOCK = threading.Lock()


def output_error(path: str | Path, err: OSError) -> OutputError:
    """An `OutputError` for the failed write of `path`, with the OS reason and the fix."""
    reason = err.strerror or str(err) or type(err).__name__
    hint = _HINTS.get(err.errno or -1, "check that the folder exists and is writable")
    return OutputError(f"cannot write {str(path)!r}: {reason} ({hint}); no existing file "
                       "was changed")


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux reports it
    in /proc); elsewhere set and restored under a lock, so two writers never race."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            match = re.search(r"^Umask:\s*([0-7]+)", handle.read(), flags=re.M)
        if match:
            return int(match.group(1), 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from any tool: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def ensure_directory(path: str | Path, what: str = "the output directory") -> Path:
    """Create the folder `path` (and its parents) if missing.

    Raises:
        OutputError: `path` (or a parent) is a file, or the folder cannot be created; the
            message names it and the fix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write into {str(path)!r}: it is a file, but {what} "
                          "must be a folder; pass a folder path, or remove or rename the "
                          "file; nothing was written")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(path, err) from err
    return path


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write `path` through `write(fileobj)` into a temp file, fsync, then rename over it.

    Raises:
        OutputError: the folder or the file cannot be written; nothing is left behind.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the whole file was written
        raise output_error(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    ensure_directory(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise output_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, file_mode())
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os_error = _os_error_in(err)
        if os_error is not None:
            raise output_error(path, os_error) from err
        raise
    return path


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError `err` is or was raised while handling (torch.save, for one, masks a
    failed write with a RuntimeError from its own cleanup); None if there is none."""
    seen: set[int] = set()
    probe: BaseException | None = err
    while probe is not None and id(probe) not in seen:
        if isinstance(probe, OutputError):
            return None
        if isinstance(probe, OSError):
            return probe
        seen.add(id(probe))
        probe = probe.__cause__ or probe.__context__
    return None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write `data` to `path`."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write `text` (UTF-8) to `path`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """Atomically `torch.save` `obj` to `path`."""
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))
