"""The run journal: every finished evaluation, durable on disk as soon as it ends.

``journal.jsonl`` in the output directory holds one JSON object per line:

- ``{"type": "header", "version": 1, "fingerprint": {...}, ...}`` first;
- ``{"type": "ranking", "ranking": [LayerSensitivity dicts]}`` once the sensitivity pass ends;
- ``{"type": "trial", "record": TrialRecord dict}`` per evaluation, appended when it ends.

Each line is written with one ``write``, then flushed and fsync'd, so a run killed at any
point (even ``kill -9`` mid-write) loses at most the line being written. On resume a torn
last line is dropped with a warning; everything before it is reused. The fingerprint (hashes
of the model weights, the quant config and the search settings) must match, so records of
a different run are never mixed in.

What is promised, exactly: an evaluation is *finished* once its line is fsync'd. A kill
after ``evaluate()`` returned but before that (a window of one write and one fsync) loses
that evaluation like the one in progress, and ``--resume`` runs it again: at most one
evaluation per worker is repeated (docs/guarantees.md).

Every line read back is checked (`autoquant.jobs.entries`): types, finite numbers, scheme
labels. A journal edited into a lie is an error naming the line, never a silently changed
plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoquant.errors import ConfigError
from autoquant.io.atomic import atomic_write_text, output_error
from autoquant.io.names import JOURNAL_FILE
from autoquant.io.reading import read_bytes_file
from autoquant.jobs.entries import check_header, check_ranking, check_trial
from autoquant.search.strategy import TrialRecord
from autoquant.sensitivity.ranking import LayerSensitivity

__all__ = [
    "Journal",
    "JournalMismatchError",
    "JOURNAL_FILE",
    "JOURNAL_VERSION",
    "fingerprint",
    "read_journal",
]

logger = logging.getLogger(__name__)

JOURNAL_VERSION = 1


class JournalMismatchError(ConfigError):
    """The journal on disk belongs to a different model, quant config or search settings."""


def _hash_json(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_state_dict(model: Any) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `model`'s state dict.

    Stable across processes for every entry a state dict can hold: strided tensors by their
    bytes, sparse and other layouts through their dense form, quantized tensors through
    their integer values and quantization parameters, and non-tensor entries (a module's
    ``get_extra_state()``, e.g. a dict) through a canonical encoding (`_feed`) instead of
    their ``repr``, which can hold memory addresses or set orders that change every run.
    """
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(f"{name}=".encode())
        _feed(digest, value)
        digest.update(b";")
    return digest.hexdigest()


def _feed_tensor(digest: Any, tensor: Any) -> None:
    import torch

    t = tensor.detach().to("cpu")
    if t.is_quantized:
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            digest.update(f"q:{t.q_scale()!r}:{t.q_zero_point()};".encode())
        else:
            digest.update(f"q:{t.q_per_channel_axis()};".encode())
            _feed_tensor(digest, t.q_per_channel_scales())
            _feed_tensor(digest, t.q_per_channel_zero_points())
        t = t.int_repr()
    elif t.layout != torch.strided:
        digest.update(f"{t.layout}:".encode())
        t = t.to_dense()
    t = t.contiguous()
    digest.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _feed(digest: Any, value: Any, depth: int = 0) -> None:
    """Feed `value` to `digest` in a canonical form: mappings by sorted key, sets sorted,
    tensors by their bytes, other objects by type and their ``repr`` less addresses."""
    import torch

    if isinstance(value, torch.Tensor):
        digest.update(b"T")
        _feed_tensor(digest, value)
    elif depth > 32:  # a self-referencing extra state: stop, the prefix is already hashed
        digest.update(b"...")
    elif isinstance(value, Mapping):
        items = sorted(((_canonical(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        digest.update(f"{{{len(items)}".encode())
        for key, item in items:
            digest.update(key.encode() + b":")
            _feed(digest, item, depth + 1)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}".encode())
        for item in value:
            _feed(digest, item, depth + 1)
        digest.update(b"]")
    elif isinstance(value, (set, frozenset)):
        digest.update(f"<{sorted(_canonical(v) for v in value)}>".encode())
    else:
        digest.update(_canonical(value).encode())


def _canonical(value: Any) -> str:
    """A text for a scalar, a key or a set member that is the same in every process."""
    if isinstance(value, (str, int, float, bool, type(None), bytes)):
        return f"{type(value).__name__}:{value!r}"
    text = _ADDRESS.sub("", repr(value))
    return f"{type(value).__module__}.{type(value).__qualname__}:{text}"


def fingerprint(model: Any, config: Mapping[str, Any], settings: Mapping[str, Any]
                ) -> dict[str, str]:
    """The parts that must match for journal records to be reused.

    Args:
        model: the float model (its weights are hashed).
        config: the quant config as a mapping (`QuantConfig.to_dict`).
        settings: everything else that changes a record: the evaluator and its arguments,
            the strategy and its options, the sensitivity metric, max_loss, loss_type.
            Leave out the evaluation budget: records stay valid when it grows.
    """
    return {
        "model": hash_state_dict(model),
        "quant": _hash_json(config),
        "search": _hash_json(settings),
    }


@dataclass
class JournalContents:
    """What a journal file holds."""

    header: dict[str, Any] | None = None
    ranking: list[LayerSensitivity] | None = None
    records: list[TrialRecord] = field(default_factory=list)
    good_bytes: int = 0
    torn: bool = False


def read_journal(path: str | Path) -> JournalContents:
    """Parse a journal, tolerating a torn last line (it is reported, not raised).

    Raises:
        ConfigError: the file cannot be read (or is a folder), a line other than the last
            is not valid JSON, the first line is not a header, or an entry fails its check
            (`autoquant.jobs.entries`); the message names the line.
    """
    path = Path(path)
    data = read_bytes_file(path, "journal")
    out = JournalContents()
    offset = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        if last and raw == b"":
            break
        try:
            if last:  # no trailing newline: the write of this line never finished
                raise ValueError("no newline")
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as err:
            if last or all(rest.strip() == b"" for rest in lines[number:]):
                out.torn = True
                logger.warning("%s: line %d is torn (the run was killed while writing it); "
                               "ignoring it", path, number)
                break
            raise ConfigError(f"{path}: line {number} is corrupt ({err}); only the last line "
                              "may be torn. Delete the journal to start over.") from err
        kind = obj.get("type")
        if number == 1 and kind != "header":
            raise ConfigError(f"{path}: the first line is not a journal header; is this an "
                              "autoquant journal?")
        try:
            _read_entry(out, kind, obj)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ConfigError(f"{path}: line {number} is not a valid {kind} entry "
                              f"({type(err).__name__}: {err}); the journal was edited or "
                              "corrupted. Delete it (or pass --overwrite) to start over.") from err
        offset += len(raw) + 1
        out.good_bytes = offset
    return out


def _read_entry(out: JournalContents, kind: Any, obj: dict[str, Any]) -> None:
    """Check one parsed line (`autoquant.jobs.entries`) and add it to `out`."""
    if kind == "header":
        if out.header is not None:
            raise ValueError("a second header (only the first line is one)")
        check_header(obj, JOURNAL_VERSION)
        out.header = obj
    elif kind == "ranking":
        check_ranking(obj["ranking"])
        out.ranking = [LayerSensitivity(**row) for row in obj["ranking"]]
    elif kind == "trial":
        check_trial(obj["record"])
        out.records.append(TrialRecord.from_dict(obj["record"]))
    else:
        raise ValueError(f"unknown entry type {kind!r} (expected header, ranking or trial)")


class Journal:
    """An append-only, fsync'd JSONL journal of one run.

    Use `Journal.open`; then `append_ranking` and `append_record` (an ``on_record`` hook).

    Attributes:
        path: the journal file.
        records: trial records already on disk when opened (reuse them on resume).
        ranking: the stored sensitivity ranking, or None.
    """

    def __init__(self, path: Path, records: list[TrialRecord],
                 ranking: list[LayerSensitivity] | None) -> None:
        self.path = path
        self.records = records
        self.ranking = ranking

    @classmethod
    def open(cls, directory: str | Path, parts: Mapping[str, str], *, resume: bool,
             overwrite: bool = False, meta: Mapping[str, Any] | None = None) -> Journal:
        """Open the journal of `directory` for a new run or a resumed one.

        Args:
            directory: the run's output directory.
            parts: the `fingerprint` of this run.
            resume: reuse the records of an existing journal (after checking `parts`).
            overwrite: start over even if a journal exists (ignored with `resume`).
            meta: extra header fields (e.g. the job file).

        Raises:
            ConfigError: a journal exists and neither `resume` nor `overwrite` is set.
            JournalMismatchError: resuming a journal whose fingerprint differs.
        """
        path = Path(directory) / JOURNAL_FILE
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path} is a folder (or another non-file), not a journal; "
                              "remove or rename it, or choose another --output-dir")
        if path.exists() and resume:
            contents = read_journal(path)
            if contents.header is not None:
                _check_fingerprint(path, contents.header.get("fingerprint", {}), parts)
                if contents.torn:
                    with open(path, "r+b") as handle:  # drop the torn tail before appending
                        handle.truncate(contents.good_bytes)
                        handle.flush()
                        os.fsync(handle.fileno())
                logger.info("resuming from %s: %d evaluation(s)%s reused", path,
                            len(contents.records),
                            " and the sensitivity ranking" if contents.ranking else "")
                return cls(path, contents.records, contents.ranking)
        elif path.exists() and not overwrite:
            raise ConfigError(
                f"{path} already exists from an earlier run; pass --resume to continue it, "
                "--overwrite to start over, or choose another --output-dir"
            )
        elif resume:
            logger.info("no journal in %s: starting a new run", directory)
        header = {"type": "header", "version": JOURNAL_VERSION, "fingerprint": dict(parts),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  **dict(meta or {})}
        atomic_write_text(path, json.dumps(header, sort_keys=True) + "\n")
        return cls(path, [], None)

    def _append(self, obj: Mapping[str, Any]) -> None:
        line = (json.dumps(obj, sort_keys=True) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as err:
            raise output_error(self.path, err) from err
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:  # unbuffered: a failure cannot be retried later by a flush
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as err:
                _truncate_quietly(fd, size)  # never leave a partial line behind
                raise output_error(self.path, err) from err
        finally:
            os.close(fd)

    def append_record(self, record: TrialRecord) -> None:
        """Append one finished evaluation (durable when this returns)."""
        self._append({"type": "trial", "record": record.to_dict()})

    def append_ranking(self, ranking: Sequence[LayerSensitivity]) -> None:
        """Append the sensitivity ranking (durable when this returns)."""
        self.ranking = list(ranking)
        self._append({"type": "ranking", "ranking": [r.to_dict() for r in ranking]})


def _truncate_quietly(fd: int, size: int) -> None:
    """Cut a failed append back to `size` bytes (if even that fails, resume drops the torn
    last line anyway)."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        logger.warning("could not cut the failed journal append back; --resume will drop "
                       "the torn last line")


def _check_fingerprint(path: Path, stored: Mapping[str, str], parts: Mapping[str, str]) -> None:
    what = {"model": "the model weights", "quant": "the quant config",
            "search": "the search settings (evaluator, strategy, sensitivity, max_loss, "
                      "loss_type)"}
    changed = [what.get(k, k) for k in parts if stored.get(k) != parts[k]]
    if changed:
        raise JournalMismatchError(
            f"{path} was written by a different run: {', '.join(changed)} changed since. "
            "Resuming would mix results of two different searches. Restore the original "
            "settings, or start over with --overwrite (or another --output-dir)."
        )
