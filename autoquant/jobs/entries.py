"""Checking the entries of a journal read back from disk, before a resume believes them.

A journal line is reused as if the evaluation had just run, so a tampered or corrupted one
would silently change the plan: ``"passed": "false"`` is a truthy string, a NaN metric
compares false with everything. Every entry is checked for the types `TrialRecord` and
`LayerSensitivity` declare, finite numbers and scheme labels autoquant writes; a bad one is
a `ValueError` whose message names the field, which `autoquant.jobs.journal.read_journal`
turns into a `ConfigError` naming the file and the line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from autoquant.errors import ConfigError
from autoquant.plan import parse_scheme

__all__ = ["check_header", "check_trial", "check_ranking", "MAX_SCHEME_BITS"]

MAX_SCHEME_BITS = 16  # QuantizerConfig.bits is 2..16 (fallback rungs included)


def _shown(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.40}"


def _need(ok: bool, field: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {_shown(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any, field: str) -> None:
    _need(_is_real(value) and math.isfinite(value), field, "a finite number", value)


def check_header(obj: Mapping[str, Any], version: int) -> None:
    """A header line: this journal version and a fingerprint of strings."""
    _need(obj.get("version") == version and _is_int(obj.get("version")), "version",
          f"{version} (the journal format this autoquant reads)", obj.get("version"))
    parts = obj.get("fingerprint")
    _need(isinstance(parts, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in parts.items()),
          "fingerprint", "a mapping of hashes", parts)


def _check_scheme(scheme: Any, field: str) -> None:
    _need(isinstance(scheme, str), field, "a scheme label such as 'w8a8' or 'float'", scheme)
    try:
        bits = parse_scheme(scheme)
    except ConfigError as err:
        raise ValueError(f"{field}: {err}") from err
    if bits is not None and not all(2 <= b <= MAX_SCHEME_BITS for b in bits):
        raise ValueError(f"{field}: scheme {scheme!r} has a bit width outside 2..."
                         f"{MAX_SCHEME_BITS}, which autoquant never writes")


def check_trial(record: Any) -> None:
    """A trial record: the `TrialRecord` fields with their types, finite numbers, known
    scheme labels, fallback layers that are in the plan."""
    _need(isinstance(record, Mapping), "record", "a mapping", record)
    _need(_is_int(record.get("index")) and record.get("index", -1) >= 0, "index",
          "an integer >= 0", record.get("index"))
    _need(isinstance(record.get("label"), str), "label", "a string", record.get("label"))
    plan = record.get("plan")
    _need(isinstance(plan, Mapping) and all(isinstance(k, str) for k in plan), "plan",
          "a mapping of layer names to schemes", plan)
    for name, scheme in plan.items():
        _check_scheme(scheme, f"plan[{name!r}]")
    fallback = record.get("fallback_layers")
    _need(isinstance(fallback, list) and all(isinstance(n, str) and n in plan
                                             for n in fallback),
          "fallback_layers", "a list of layer names of the plan", fallback)
    _finite(record.get("metric"), "metric")
    _finite(record.get("loss"), "loss")
    _need(isinstance(record.get("passed"), bool), "passed", "true or false (a JSON boolean)",
          record.get("passed"))
    _finite(record.get("seconds"), "seconds")
    _need(record["seconds"] >= 0, "seconds", "a number >= 0", record["seconds"])


def check_ranking(rows: Any) -> None:
    """A ranking line's rows: `LayerSensitivity` fields with their types."""
    _need(isinstance(rows, list), "ranking", "a list of layer rows", rows)
    for i, row in enumerate(rows):
        _need(isinstance(row, Mapping), f"ranking[{i}]", "a mapping", row)
        _need(isinstance(row.get("name"), str), f"ranking[{i}].name", "a string",
              row.get("name"))
        _need(_is_real(row.get("score")), f"ranking[{i}].score", "a number", row.get("score"))
        for key in ("rank", "calls"):
            _need(_is_int(row.get(key)) and row.get(key, -1) >= 0, f"ranking[{i}].{key}",
                  "an integer >= 0", row.get(key))
        aliases = row.get("aliases", [])
        _need(isinstance(aliases, list) and all(isinstance(a, str) for a in aliases),
              f"ranking[{i}].aliases", "a list of layer names", aliases)
