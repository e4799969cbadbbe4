"""Reading files a user (or anyone who can write to a run folder) supplied: one reader for
every job file, quant config, report and journal.

A file that is missing, a folder, unreadable, too large, not UTF-8 or (for JSON) nested
past the parser's recursion limit is a `ConfigError` naming the file, the line where it can
be found, and the fix -- never a raw ``UnicodeDecodeError``, ``IsADirectoryError`` or
``RecursionError`` from deep inside the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoquant.errors import ConfigError

__all__ = ["read_bytes_file", "read_text_file", "decode_utf8", "parse_json"]

def read_bytes_file(path: str | Path, what: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file `path` (`what` names it in errors, e.g. "job file").

    Raises:
        ConfigError: the file is missing, a folder, unreadable, or larger than `max_bytes`.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise ConfigError(f"{what} {str(path)!r} is a folder (or another non-file); "
                              f"expected a regular file. Remove or rename it, or pass the "
                              "path of the file")
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise ConfigError(f"{what} {str(path)!r} is {size} bytes, more than the "
                              f"{max_bytes} a {what} may have; is this the right file?")
        return path.read_bytes()
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(f"cannot read {what} {str(path)!r}: {reason}; check the path and "
                          "its permissions") from err


def decode_utf8(data: bytes, source: str | Path, what: str) -> str:
    """`data` decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        ConfigError: naming the line and the first byte that is not UTF-8, and the fix.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{source}: line {line}: byte 0x{data[err.start]:02x} is not UTF-8; a {what} "
            "must be UTF-8 text (this looks like Latin-1 or another legacy encoding). "
            "Re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > NEW`"
        ) from err


def read_text_file(path: str | Path, what: str, *, max_bytes: int | None = None) -> str:
    """The UTF-8 text of the regular file `path`.

    Example:
        >>> text = read_text_file("job.yaml", "job file", max_bytes=1 << 20)

    Raises:
        ConfigError: as `read_bytes_file` and `decode_utf8`.
    """
    return decode_utf8(read_bytes_file(path, what, max_bytes=max_bytes), path, what)


def parse_json(text: str | bytes, source: str | Path, what: str) -> Any:
    """`json.loads(text)` with every failure a `ConfigError`.

    Nesting past the interpreter's recursion limit (a few hundred thousand ``[``) is one of
    them: the C parser stops it with a ``RecursionError``, turned into the same error.

    Raises:
        ConfigError: the text is not valid JSON (or not UTF-8); the message names `source`.
    """
    if isinstance(text, bytes):
        text = decode_utf8(text, source, what)
    try:
        return json.loads(text)
    except RecursionError as err:
        raise ConfigError(f"{source}: {what} is nested absurdly deep (autoquant never "
                          "writes that, so the file was edited or corrupted); restore it "
                          "or delete it") from err
    except ValueError as err:
        raise ConfigError(f"{source}: {what} is not valid JSON ({err}); restore it or "
                          "delete it") from err
