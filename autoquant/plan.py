"""Quantization plans: which scheme each searchable layer runs in a trial.

A plan is plain data, ``{layer name: scheme}``, so it goes to JSON/YAML unchanged. A scheme
is ``"float"`` or ``"w<bits>a<bits>"`` (weight and activation bit widths, e.g. ``"w8a8"``,
``"w16a16"``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from autoquant.errors import ConfigError

__all__ = ["FLOAT", "QuantPlan", "parse_scheme", "scheme_label", "plan_key"]

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
