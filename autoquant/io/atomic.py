"""Atomic file writes: a reader never sees a half-written artifact.

A write that fails (read-only folder, full disk, ...) raises `OutputError` naming the file
and the fix; the temporary file is removed and the previous version of the file, if any, is
left exactly as it was.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from autoquant.errors import OutputError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save",
           "output_error"]

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write to another output directory",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: choose another output directory",
    errno.EACCES: "permission denied: make the folder writable or choose another one",
    errno.EPERM: "permission denied: make the folder writable or choose another one",
}


def output_error(path: str | Path, err: OSError) -> OutputError:
    """An `OutputError` for the failed write of `path`, with the OS reason and the fix."""
    reason = err.strerror or str(err) or type(err).__name__
    hint = _HINTS.get(err.errno or -1, "check that the folder exists and is writable")
    return OutputError(f"cannot write {str(path)!r}: {reason} ({hint}); no existing file "
                       "was changed")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write `path` through `write(fileobj)` into a temp file, fsync, then rename over it.

    Raises:
        OutputError: the folder or the file cannot be written; nothing is left behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise output_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as handle:
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
