"""The search report as plain data (``report.json``), versioned.

Schema (version 2, JSON Schema in ``autoquant/report/schema.json``): ``schema_version``,
``environment`` (autoquant, python, torch, numpy, platform, device, cpu_count),
``job`` (the resolved job file, or null outside the CLI), ``run`` (resumed, reused and new
evaluations, journal path; or null), ``settings``, ``status`` (met, float_only, not_met,
budget_exhausted, interrupted) / ``met`` / ``reason``, ``metrics`` (float, full_quant,
final, loss), ``counts`` (layers, quantized, fallback, skipped, evaluations), ``timings``
(seconds: total, calibration, sensitivity, search, evaluator), ``sizes`` (float and
quantized weight bytes), ``layers`` (one row per quantizable layer: name, type,
parameters, score, rank, precision, skipped), ``trials`` (every evaluation), ``plan``,
``fallback_layers``, ``effective_bits`` (weights and activations, see
`effective_bits`), ``checks`` (held-out check, ranking audit, monotonicity) and
``config``.

Version 2 added ``job``, ``run``, ``fallback_layers``,
``environment.autoquant/numpy/cpu_count`` and the ``interrupted`` status (a report rebuilt
from the journal of a run that did not finish).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

import torch

from autoquant.plan import FLOAT, effective_bits, parse_scheme

__all__ = ["REPORT_SCHEMA_VERSION", "build_report", "environment", "model_sizes", "storage_bytes",
           "report_from_journal", "report_schema"]

REPORT_SCHEMA_VERSION = 2


def report_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``report.json``, shipped with the package.

    Example:
        >>> import jsonschema
        >>> jsonschema.validate(json.load(open("out/report.json")), report_schema())
    """
    import json
    from importlib import resources

    text = resources.files("autoquant.report").joinpath("schema.json").read_text("utf-8")
    return json.loads(text)


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and machine facts that make a report reproducible."""
    import numpy

    from autoquant import __version__

    return {
        "autoquant": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": device,
        "cpu_count": os.cpu_count(),
    }


def storage_bytes(bits: int) -> int:
    """Bytes per element of the integer type an export stores a `bits`-bit weight in:
    int8 up to 8 bits, int16 up to 16 (ONNX has no packed 2..7-bit types)."""
    return 1 if bits <= 8 else 2


def model_sizes(layers: list[dict[str, Any]], plan: dict[str, str]) -> dict[str, Any]:
    """Bytes of the quantizable layers' parameters as stored: float32, against the plan's
    quantized weights at their storage width (`storage_bytes`, what the exported file
    holds; not bit-packed) with the rest (biases) float32; and layers per scheme."""
    float_bytes = quant_bytes = 0
    schemes: dict[str, int] = {}
    for row in layers:
        params = row["parameters"] or 0
        scheme = plan.get(row["name"], FLOAT)
        schemes[scheme] = schemes.get(scheme, 0) + 1
        bits = parse_scheme(scheme)
        float_bytes += params * 4
        weights = min(row.get("weight_elements", params), params)
        quant_bytes += params * 4 if bits is None else (
            weights * storage_bytes(bits[0]) + (params - weights) * 4)
    return {"float_weight_bytes": float_bytes, "quantized_weight_bytes": quant_bytes,
            "schemes": dict(sorted(schemes.items()))}


def build_report(result: Any, *, job: Mapping[str, Any] | None = None,
                 run: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report of `result` as JSON-ready data.

    Args:
        result: the `autoquant.result.SearchResult` (typed loosely: the result's module
            calls this one, so importing it here would close a cycle).
        job: the resolved job file (the CLI passes it), or None.
        run: facts about this run (the CLI passes resumed / reused_evaluations /
            new_evaluations / journal), or None.
    """
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
        "environment": environment(device),
        "job": None if job is None else dict(job),
        "run": None if run is None else dict(run),
        "settings": {**result.settings.to_dict(), "higher_is_better": result.higher_is_better,
                     "target": result.target, "folded_bn": result.folded_bn},
        "ranking_scope": sorted({row.scope for row in result.sensitivity}),
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
        "fallback_layers": list(result.fallback_layers),
        "config": result.config.to_dict(),
        "determinism": result.determinism,
        "deployment": {
            "target": result.target,
            "export": dict(result.deployment),
            "deployed_metric": result.deployed_metric,
            "deployed_loss": result.deployed_loss,
            "met_on_deploy": result.met_on_deploy,
            "checks": [c.to_dict() for c in result.deploy_checks],
        },
    }


def report_from_journal(contents: Any, job: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A report (status ``interrupted``) from the journal of a run that did not finish.

    Args:
        contents: a `autoquant.jobs.journal.JournalContents`.
        job: the resolved job file, or None.
    """
    records = list(contents.records)
    ranking = list(contents.ranking or [])
    float_rec = next((r for r in records if r.label == "float"), None)
    quantized = [r for r in records if any(s != FLOAT for s in r.plan.values())]
    full = next((r for r in quantized if not r.fallback_layers), None)
    passing = [r for r in quantized if r.passed]
    best = min(passing, key=lambda r: (len(r.fallback_layers), r.loss)) if passing else None
    plan = dict(best.plan) if best is not None else {}
    layers = [{
        "name": row.name, "type": None, "parameters": None, "score": row.score,
        "rank": row.rank, "precision": plan.get(row.name), "skipped": False,
    } for row in sorted(ranking, key=lambda r: r.rank)]
    search = dict((job or {}).get("search") or {})
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "environment": environment(),
        "job": None if job is None else dict(job),
        "run": {"resumed": False, "reused_evaluations": 0, "new_evaluations": len(records),
                "journal": None},
        "settings": search,
        "status": "interrupted",
        "met": False,
        "reason": (f"the run stopped after {len(records)} evaluation(s) before the search "
                   "finished; resume it with `autoquant run JOB --resume`"),
        "metrics": {
            "float": None if float_rec is None else float_rec.metric,
            "full_quant": None if full is None else full.metric,
            "final": None if best is None else best.metric,
            "loss": None if best is None else best.loss,
        },
        "counts": {
            "layers": len(layers),
            "quantized": sum(1 for s in plan.values() if s != FLOAT),
            "fallback": 0 if best is None else len(best.fallback_layers),
            "skipped": 0,
            "evaluations": len(records),
        },
        "timings": {"evaluator": sum(r.seconds for r in records)},
        "sizes": None,
        "layers": layers,
        "trials": [r.to_dict() for r in records],
        "plan": plan,
        "fallback_layers": [] if best is None else list(best.fallback_layers),
        "config": None,
    }
