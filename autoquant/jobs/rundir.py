"""The output directory of ``autoquant run``: refuse one that holds another run's files, and
hold an exclusive lock on it while a run writes there."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from autoquant.errors import ConfigError
from autoquant.io.names import RUN_ARTIFACTS

__all__ = ["check_output_dir", "lock_output_dir"]


def check_output_dir(directory: Path, journal: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory holding another run's results but no journal.

    Without a journal the files cannot be attributed to this job, so writing the new run
    there would silently replace them. ``--overwrite`` allows it explicitly.
    """
    if overwrite or journal.exists() or not directory.is_dir():
        return
    found = [name for name in RUN_ARTIFACTS if (directory / name).exists()]
    if found:
        action = "resume" if resume else "write into"
        raise ConfigError(
            f"{directory} already holds results ({', '.join(found)}) but no journal, so they "
            f"cannot be from this job; refusing to {action} it and overwrite them. Choose "
            "another --output-dir, or pass --overwrite to replace them."
        )


@contextlib.contextmanager
def lock_output_dir(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (created if missing) for a run.

    Two runs writing into one output directory would interleave their journals; the second
    one gets a ConfigError instead. The lock is ``flock`` on the directory itself (no lock
    file is written), released when the block ends or the process dies, even by
    ``kill -9``. Where ``fcntl`` does not exist (Windows) the block runs unlocked.

    Raises:
        ConfigError: another process holds the lock.
        OutputError: the directory cannot be created.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    from autoquant.io.atomic import output_error

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except OSError as err:
        raise output_error(directory, err) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ConfigError(
                f"another autoquant run is writing into {directory} right now; wait for it "
                "to finish, or choose another --output-dir (two runs would mix their "
                "journals)"
            ) from err
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
