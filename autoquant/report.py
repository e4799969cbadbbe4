"""The search report as plain data (``report.json``), versioned.

Schema (version 1): ``schema_version``, ``environment`` (python, torch, platform, device),
``settings``, ``status``/``met``/``reason``, ``metrics`` (float, full_quant, final, loss),
``counts`` (layers, quantized, fallback, skipped, evaluations), ``timings`` (seconds),
``sizes`` (float and quantized weight bytes), ``effective_bits`` (weights and activations,
see `effective_bits`), ``checks`` (held-out check, ranking audit, monotonicity),
``layers`` (one row per quantizable layer: name, type, parameters, score, rank,
precision), ``trials`` (every evaluation),
``plan`` and ``config``.
"""

from __future__ import annotations

import platform
import sys
from typing import TYPE_CHECKING, Any

import torch

from autoquant.plan import FLOAT, parse_scheme

if TYPE_CHECKING:
    from autoquant.result import SearchResult

__all__ = ["REPORT_SCHEMA_VERSION", "build_report", "model_sizes", "effective_bits"]

REPORT_SCHEMA_VERSION = 1


def model_sizes(layers: list[dict[str, Any]], plan: dict[str, str]) -> dict[str, int]:
    """Weight bytes of the quantizable layers: float32 vs as quantized by `plan`."""
    float_bytes = sum(row["parameters"] * 4 for row in layers)
    quant_bytes = 0
    for row in layers:
        bits = parse_scheme(plan.get(row["name"], FLOAT))
        quant_bytes += row["parameters"] * 4 if bits is None else -(-row["parameters"] * bits[0]
                                                                     // 8)
    return {"float_weight_bytes": float_bytes, "quantized_weight_bytes": quant_bytes}


def effective_bits(layers: list[dict[str, Any]], plan: dict[str, str]) -> dict[str, float]:
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


def build_report(result: SearchResult) -> dict[str, Any]:
    """The report of `result` as JSON-ready data."""
    scores = {row.name: row for row in result.sensitivity}
    skipped = set(result.skipped_layers)
    layers = []
    for row in result.layers:
        name = row["name"]
        sens = scores.get(name)
        layers.append({
            **row,
            "score": None if sens is None else sens.score,
            "rank": None if sens is None else sens.rank,
            "precision": FLOAT if name in skipped else result.plan.get(name, FLOAT),
            "skipped": name in skipped,
        })
    device = next((str(p.device) for p in result.model.parameters()), "cpu")
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "device": device,
        },
        "settings": dict(result.settings),
        "status": result.status,
        "met": result.met,
        "reason": result.reason,
        "metrics": {
            "float": result.float_metric,
            "full_quant": result.full_quant_metric,
            "final": result.quant_metric,
            "loss": result.loss,
        },
        "counts": {
            "layers": len(result.layers),
            "quantized": len(result.quantized_layers),
            "fallback": len(result.fallback_layers),
            "skipped": len(result.skipped_layers),
            "evaluations": result.num_evaluations,
        },
        "timings": dict(result.timings),
        "sizes": model_sizes(result.layers, result.plan),
        "effective_bits": effective_bits(result.layers, result.plan),
        "checks": dict(result.checks),
        "layers": layers,
        "trials": [r.to_dict() for r in result.history],
        "plan": dict(result.plan),
        "config": result.config.to_dict(),
    }
