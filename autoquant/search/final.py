"""The `QuantConfig` a finished search writes: the plan's float layers skipped, its
bit-width fallbacks and each layer's chosen calibration pinned, the deploy target resolved,
so that applying it to the float model reproduces the searched model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from autoquant.config import QuantConfig
from autoquant.plan import FLOAT, QuantPlan

__all__ = ["final_config", "merge_overrides"]


def merge_overrides(
    layers: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """`layers` with `overrides` merged in, one level deep per role."""
    merged = {k: {r: (dict(v) if isinstance(v, Mapping) else v) for r, v in o.items()}
              for k, o in layers.items()}
    for name, override in overrides.items():
        target = merged.setdefault(name, {})
        for role, values in override.items():
            target[role] = {**target.get(role, {}), **values} if isinstance(
                values, Mapping) else values
    return merged


def final_config(
    base: QuantConfig,
    plan: QuantPlan,
    skipped: list[str],
    calibration: Mapping[str, Mapping[str, Any]] | None = None,
    target: str | None = None,
) -> QuantConfig:
    """`base` with the plan's float layers skipped and its bit-width fallbacks written in.

    `calibration` holds per-layer overrides that pin each layer's chosen activation
    calibration (`autoquant.calibration.refine.calibration_overrides`); they are written for the
    layers the plan quantizes. `target` replaces ``auto`` by the target the search resolved
    it to, so the config means the same on another machine. Applying the returned config
    to the float model reproduces the plan.
    """
    quantized = {n: o for n, o in (calibration or {}).items() if plan.get(n, FLOAT) != FLOAT}
    layers = merge_overrides(base.layers, quantized)
    skip = list(dict.fromkeys([*base.skip_layers, *skipped]))
    for name, scheme in plan.items():
        current = base.layer_config(name)
        if scheme == FLOAT:
            if name not in skip:
                skip.append(name)
        elif scheme != current.scheme:
            w_bits, a_bits = (int(b) for b in scheme[1:].split("a"))
            override = layers.setdefault(name, {})
            override["weight"] = {**override.get("weight", {}), "bits": w_bits}
            override["activation"] = {**override.get("activation", {}), "bits": a_bits}
    # replace() carries every other field (fold_bn, bias_correction, smoothing_alpha, ...)
    return dataclasses.replace(base, layers=layers, skip_layers=skip,
                               target=target or base.target)
