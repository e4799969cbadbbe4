"""`SearchResult`: what a search returns, always, whether the goal was met or not."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from autoquant.config import QuantConfig
from autoquant.io.atomic import atomic_torch_save, atomic_write_text
from autoquant.plan import FLOAT, QuantPlan
from autoquant.search.strategy import TrialRecord
from autoquant.sensitivity.ranking import LayerSensitivity

__all__ = ["SearchResult", "final_config"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "quant_config.yaml"
STATE_FILE = "model_state.pt"
REPORT_FILE = "report.json"


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
    from autoquant.calibration.refine import merge_overrides

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


@dataclass
class SearchResult:
    """The outcome of `autoquant.auto_quantize`.

    Attributes:
        status: ``"met"`` (the chosen plan is within the loss budget), ``"not_met"`` (the
            strategy finished and no plan met it) or ``"budget_exhausted"`` (the evaluation
            budget ran out first; the plan is the best found so far).
        met: True when the chosen plan's loss is within the budget.
        reason: one sentence on why the status is what it is.
        float_metric: the float model's metric.
        full_quant_metric: the metric with every searchable layer quantized (None if not
            evaluated).
        quant_metric: the chosen model's metric.
        loss: the chosen model's loss against the float metric.
        plan: ``{layer: scheme}`` of the chosen model (``"float"`` or e.g. ``"w8a8"``).
        quantized_layers: layers quantized in the chosen model (at any bit width).
        fallback_layers: searchable layers that fell back (to float or higher bits).
        skipped_layers: layers never searched: in ``skip_layers`` or never executed by
            calibration (both stay float).
        num_evaluations: evaluator calls made, the float baseline included.
        history: every evaluation, in order.
        sensitivity: the ranking, most sensitive first.
        model: the fake-quant model (a copy; the user's model is untouched).
        config: the final `QuantConfig` (applying it to the float model reproduces `plan`).
        timings: seconds spent: total, calibration, sensitivity, search, evaluator.
        layers: per-layer rows (name, type, parameters) of every quantizable layer.
        settings: the search settings (strategy, sensitivity, max_loss, loss_type, budget);
            `export_onnx` adds a ``deployment`` entry with the export's measured figures.
        checks: trust checks (`autoquant.search.trust`): ``holdout`` (float and final metric on the
            evaluator's held-out data), ``audit`` (per-layer measured drops and Spearman's
            rho against the proxy ranking) and ``monotonicity`` (pass/fail violations
            among the prefix plans evaluated); a key is absent when its check did not run.
        determinism: the evaluator determinism check (``check_determinism=True``): the two
            float metrics, their difference and whether they agree; None if not checked.
        deploy_checks: the chosen plans scored in onnxruntime (``verify_deploy=True``), in
            order, as `autoquant.search.deploy_check.DeployCheck`; the last one is the
            returned plan's.
        example_inputs: the inputs the search checked the model with (used by `export_onnx`).
        check_inputs: a few calibration batches, for the parity check of `export_onnx`.
    """

    status: str
    met: bool
    reason: str
    float_metric: float
    full_quant_metric: float | None
    quant_metric: float | None
    loss: float | None
    plan: QuantPlan
    quantized_layers: list[str]
    fallback_layers: list[str]
    skipped_layers: list[str]
    num_evaluations: int
    history: list[TrialRecord]
    sensitivity: list[LayerSensitivity]
    model: nn.Module
    config: QuantConfig
    timings: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    determinism: dict[str, Any] | None = None
    deploy_checks: list[Any] = field(default_factory=list)
    example_inputs: Any = field(default=None, repr=False, compare=False)
    check_inputs: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def deployed_metric(self) -> float | None:
        """The returned plan's metric measured in onnxruntime (None: not verified)."""
        check = self._deploy_check()
        return None if check is None else check.metric

    @property
    def deployed_loss(self) -> float | None:
        """The returned plan's loss measured in onnxruntime (None: not verified)."""
        check = self._deploy_check()
        return None if check is None else check.loss

    @property
    def met_on_deploy(self) -> bool | None:
        """Whether the returned plan meets the budget in onnxruntime (None: not verified)."""
        check = self._deploy_check()
        return None if check is None else check.passed

    def _deploy_check(self) -> Any:
        best = next((r for r in self.history if r.plan == self.plan), None)
        for check in reversed(self.deploy_checks):
            if best is not None and check.trial == best.index:
                return check
        return None

    @property
    def effective_bits(self) -> dict[str, float]:
        """Average weight bits (parameter-weighted) and activation bits (per layer) of the
        quantizable layers, float counting as 32 (see `autoquant.report.build.effective_bits`)."""
        from autoquant.report.build import effective_bits

        return effective_bits(self.layers, self.plan)

    def summary(self) -> str:
        """A few lines a person reads in ten seconds."""
        n = len(self.quantized_layers) + len(self.fallback_layers) + len(self.skipped_layers)
        lines = [
            f"status: {self.status} ({self.reason})",
            f"float metric: {self.float_metric:.6g}   "
            f"all-quantized: {_fmt(self.full_quant_metric)}   final: {_fmt(self.quant_metric)}",
            f"loss: {_fmt(self.loss)} (budget {self.settings.get('max_loss')} "
            f"{self.settings.get('loss_type', '')})",
            f"layers quantized: {len(self.quantized_layers)}/{n}; fell back: "
            f"{', '.join(self.fallback_layers) or 'none'}",
            f"effective bits: weights {self.effective_bits['weights']:.2f}, activations "
            f"{self.effective_bits['activations']:.2f}",
            f"evaluations: {self.num_evaluations}   time: {self.timings.get('total', 0):.1f}s "
            f"({self.timings.get('evaluator', 0):.1f}s in the evaluator)",
        ]
        if self.met_on_deploy is not None:
            lines.append(f"deployed (onnxruntime): metric {self.deployed_metric:.6g}, loss "
                         f"{self.deployed_loss:.6g} ({'pass' if self.met_on_deploy else 'FAIL'}"
                         f"; {len(self.deploy_checks)} plan(s) checked)")
        holdout = self.checks.get("holdout")
        if holdout:
            lines.append(f"held-out: float {holdout['float_metric']:.6g}, final "
                         f"{holdout['metric']:.6g}, loss {holdout['loss']:.6g} "
                         f"({'pass' if holdout['passed'] else 'FAIL'})")
        audit = self.checks.get("audit")
        if audit:
            lines.append(f"ranking audit: {len(audit['layers'])} layer(s), Spearman rho "
                         f"{_fmt(audit['spearman_rho'])}")
        if self.checks.get("monotonicity"):
            lines.append(f"monotonicity violations: {len(self.checks['monotonicity'])}")
        return "\n".join(lines)

    def to_report(self) -> dict[str, Any]:
        """The JSON report (see `autoquant.report.build`)."""
        from autoquant.report.build import build_report

        return build_report(self)

    def export_onnx(self, path: str | Path, example_inputs: Any = None,
                    opset: int | None = None, measure: bool = True, **options: Any) -> Path:
        """Export the chosen model as an ONNX QDQ graph (see `autoquant.export.export_onnx`;
        `options` are its keyword options: names, dynamic axes, ``strict``, ``target``).

        The parity check runs on the example inputs and the calibration batches. The
        figures (integer-kernel count, parity, and with `measure` the file size and the
        onnxruntime latency, both as ratios to the float export) go into
        ``settings["deployment"]`` and so into the report. The result itself is otherwise
        unchanged, also when export fails.

        Example:
            >>> result.export_onnx("model_qdq.onnx", dynamic_axes={"x": {0: "batch"}})
        """
        from autoquant.export.onnx_export import export_measured

        inputs = self.example_inputs if example_inputs is None else example_inputs
        options.setdefault("check_inputs", self.check_inputs)
        out, figures = export_measured(self.model, path, inputs, opset, measure, **options)
        self.settings["deployment"] = figures
        return out

    def save(self, directory: str | Path) -> Path:
        """Write the final config, the fake-quant state dict and ``report.json``.

        Every file is written atomically. Reload the model with `autoquant.load_quantized`.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save(out / CONFIG_FILE)
        atomic_torch_save(out / STATE_FILE, self.model.state_dict())
        atomic_write_text(out / REPORT_FILE, json.dumps(self.to_report(), indent=2) + "\n")
        logger.info("saved %s, %s and %s to %s", CONFIG_FILE, STATE_FILE, REPORT_FILE, out)
        return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"
