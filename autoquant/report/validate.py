"""Checking a ``report.json`` read from disk against the shipped schema, without jsonschema.

``autoquant report`` renders whatever ``report.json`` says into HTML and plots, and that
file may have been edited by hand, truncated, or written by someone else. `check_report`
validates it against ``autoquant/report/schema.json`` first, so a bad field is one
`ConfigError` naming the field (``trials[0].index: expected an integer, got str
'<script>'``) instead of a traceback, or hostile text reaching a renderer that expects a
number. Only the JSON Schema keywords the shipped schema uses are implemented (``type``,
``required``, ``properties``, ``additionalProperties``, ``items``, ``enum``, ``const``,
``minimum``), with jsonschema's meaning (a bool is not a number; 1.0 is an integer).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autoquant.errors import ConfigError

__all__ = ["check_report", "read_report", "schema_problem", "MAX_REPORT_BYTES"]

MAX_REPORT_BYTES = 512 << 20  # tens of thousands of trials of a 1,000-layer model

_TYPES = {"object": "an object", "array": "an array", "string": "a string",
          "integer": "an integer", "number": "a number", "boolean": "a boolean",
          "null": "null"}


def _is(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, Mapping)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return kind == "number" or isinstance(value, int) or value.is_integer()


def _shown(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.60}"


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def schema_problem(value: Any, schema: Mapping[str, Any], path: str = "") -> str | None:
    """The first way `value` breaks `schema`, as ``"field: problem"``; None if it fits."""
    where = path or "<top level>"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_is(value, k) for k in kinds):
            expected = " or ".join(_TYPES.get(k, k) for k in kinds)
            return f"{where}: expected {expected}, got {_shown(value)}"
    if "const" in schema and value != schema["const"]:
        return f"{where}: expected {schema['const']!r}, got {_shown(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: expected one of {schema['enum']}, got {_shown(value)}"
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        return f"{where}: expected at least {schema['minimum']}, got {value!r}"
    if isinstance(value, Mapping):
        return _object_problem(value, schema, path)
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            problem = schema_problem(item, schema["items"], _join(path, i))
            if problem:
                return problem
    return None


def _object_problem(value: Mapping[str, Any], schema: Mapping[str, Any], path: str
                    ) -> str | None:
    for key in schema.get("required", ()):
        if key not in value:
            return f"{_join(path, key)}: missing (a required field)"
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        sub = properties.get(key, extra)
        if sub is False:
            return f"{_join(path, key)}: not a field of this object"
        if isinstance(sub, Mapping):
            problem = schema_problem(item, sub, _join(path, key))
            if problem:
                return problem
    return None


def check_report(report: Any, source: str | Path) -> None:
    """Raise unless `report` is a valid report (``autoquant/report/schema.json``).

    Example:
        >>> check_report(json.loads(Path("out/report.json").read_text()), "out/report.json")

    Raises:
        ConfigError: naming `source`, the first bad field and the fix.
    """
    from autoquant.report.build import report_schema

    if not isinstance(report, Mapping):
        problem: str | None = f"expected a JSON object, got {_shown(report)}"
    else:
        problem = schema_problem(report, report_schema())
    if problem:
        raise ConfigError(f"{source} is not an autoquant report: {problem}. It was edited, "
                          "truncated or written by another tool; rerun `autoquant run`, or "
                          "delete it to rebuild it from the journal")


def read_report(path: str | Path) -> dict[str, Any]:
    """Read and check the ``report.json`` at `path`.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 JSON, or is not a valid report.
    """
    from autoquant.io.reading import parse_json, read_text_file

    text = read_text_file(path, "report", max_bytes=MAX_REPORT_BYTES)
    report = parse_json(text, path, "report")
    check_report(report, path)
    return report
