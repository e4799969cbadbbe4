"""Quantization plans: which scheme each searchable layer runs in a trial.

A plan is plain data, ``{layer name: scheme}``, so it goes to JSON/YAML unchanged. A scheme
is ``"float"`` or ``"w<bits>a<bits>"`` (weight and activation bit widths, e.g. ``"w8a8"``,
``"w16a16"``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from autoquant.errors import ConfigError

__all__ = ["FLOAT", "QuantPlan", "parse_scheme", "scheme_label", "plan_key", "effective_bits"]

FLOAT = "float"
QuantPlan = dict[str, str]
_SCHEME = re.compile(r"^w(\d+)a(\d+)$")


def parse_scheme(scheme: str) -> tuple[int, int] | None:
    """Return ``(weight_bits, activation_bits)`` for a scheme label, or None for float.

    Example:
        >>> parse_scheme("w8a16"), parse_scheme("float")
        ((8, 16), None)
    """
    if scheme == FLOAT:
        return None
    match = _SCHEME.match(scheme) if isinstance(scheme, str) else None
    if match is None:
        raise ConfigError(
            f"unknown scheme {scheme!r}; expected 'float' or 'w<bits>a<bits>' such as 'w8a8'"
        )
    return int(match.group(1)), int(match.group(2))


def scheme_label(weight_bits: int, activation_bits: int) -> str:
    """The label of a scheme with the given bit widths, e.g. ``"w8a8"``."""
    return f"w{weight_bits}a{activation_bits}"


def plan_key(plan: Mapping[str, str]) -> str:
    """A canonical string for a plan: equal plans give equal keys (the cache key)."""
    return json.dumps(sorted(plan.items()), separators=(",", ":"))


def effective_bits(layers: list[dict[str, Any]], plan: Mapping[str, str]) -> dict[str, float]:
    """Average bit widths of the quantizable layers under `plan` (float counts as 32).

    ``weights`` is weighted by each layer's parameter count, so it is the storage cost per
    weight. ``activations`` is the plain mean over layers of the input-activation bits (the
    per-call input size is not known statically, so every layer counts once). Layers not in
    the plan (skipped) are float.

    Example:
        >>> effective_bits([{"name": "a", "parameters": 3}, {"name": "b", "parameters": 1}],
        ...                {"a": "w8a8", "b": "float"})
        {'weights': 14.0, 'activations': 20.0}
    """
    if not layers:
        return {"weights": 32.0, "activations": 32.0}
    w_total = a_total = 0.0
    params = 0
    for row in layers:
        bits = parse_scheme(plan.get(row["name"], FLOAT))
        w_bits, a_bits = (32, 32) if bits is None else bits
        w_total += w_bits * row["parameters"]
        params += row["parameters"]
        a_total += a_bits
    return {
        "weights": w_total / params if params else 32.0,
        "activations": a_total / len(layers),
    }
