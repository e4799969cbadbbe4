"""`SearchResult`: what a search returns, always, whether the goal was met or not.

A value: it holds the outcome and imports none of its consumers. The report, the saved
folder and the ONNX export are functions over it (`autoquant.report`, `autoquant.export`);
`to_report`, `save` and `export_onnx` are thin methods that call them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from autoquant.config import QuantConfig
from autoquant.plan import QuantPlan, effective_bits
from autoquant.search.strategy import TrialRecord
from autoquant.search.trust import significant_text
from autoquant.sensitivity.ranking import LayerSensitivity
from autoquant.settings import SearchSettings

__all__ = ["SearchResult"]

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """The outcome of `autoquant.auto_quantize`.

    Attributes:
        status: ``"met"`` (the chosen plan is within the loss budget), ``"float_only"`` (the
            strategy finished and only the float model met it: nothing stays quantized),
            ``"not_met"`` (not even the float model meets the evaluator's criterion) or
            ``"budget_exhausted"`` (the evaluation budget ran out first; the plan is the
            best passing one found so far, maybe the float model).
        met: True when the chosen plan quantizes something and its loss is within the
            budget (the saved plan always passes: a failing one is only reported as
            `closest`).
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
        settings: the `SearchSettings` the search ran with.
        higher_is_better: the direction of the evaluator's metric.
        target: the deploy target the model was quantized for (`autoquant.quant.target`).
        folded_bn: the ``(conv, batchnorm)`` pairs folded before quantizing.
        deployment: the figures of the last `export_onnx` (parity, integer kernels, size,
            latency), empty before one.
        checks: trust checks (`autoquant.search.trust`): ``holdout`` (float and final metric on the
            evaluator's held-out data), ``audit`` (per-layer measured drops and Spearman's
            rho against the proxy ranking), ``monotonicity`` (pass/fail violations
            among the prefix plans evaluated) and ``idle_fallbacks`` (spans of evaluated
            prefixes whose extra fallbacks did not lower the loss) and
            ``disputed_fallbacks`` (fallen-back layers that each layer's own output error,
            the gradient scope's second opinion, ranks among the least sensitive) and
            ``deploy_error`` (why ``verify_deploy`` could not export or run the chosen
            plan: the answer stands unverified); a key is absent when its check did not
            run.
        determinism: the evaluator determinism check (``check_determinism=True``): the two
            float metrics, their difference and whether they agree; None if not checked.
        closest: when no quantized plan passed, the one with the lowest loss (reported,
            not saved).
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
    settings: SearchSettings = field(default_factory=SearchSettings)
    higher_is_better: bool = True
    target: str = "reference"
    folded_bn: list[list[str]] = field(default_factory=list)
    deployment: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    determinism: dict[str, Any] | None = None
    deploy_checks: list[Any] = field(default_factory=list)
    closest: TrialRecord | None = None
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
        quantizable layers, float counting as 32 (see `autoquant.plan.effective_bits`)."""
        return effective_bits(self.layers, self.plan)

    def summary(self) -> str:
        """A few lines a person reads in ten seconds."""
        lines = [
            f"status: {self.status} ({self.reason})",
            f"float metric: {self.float_metric:.6g}   "
            f"all-quantized: {_fmt(self.full_quant_metric)}   final: {_fmt(self.quant_metric)}",
            f"loss: {_fmt(self.loss)} (budget {self.settings.max_loss} "
            f"{self.settings.loss_type})",
            self._layer_line(),
            f"effective bits: weights {self.effective_bits['weights']:.2f}, activations "
            f"{self.effective_bits['activations']:.2f}",
            self._size_line(),
            f"evaluations: {self.num_evaluations}   time: {self.timings.get('total', 0):.1f}s "
            f"({self.timings.get('evaluator', 0):.1f}s in the evaluator)",
        ]
        if self.checks.get("deploy_error"):
            lines.append("deployed (onnxruntime): not verified, the export failed (why and "
                         "the fix: result.checks['deploy_error'])")
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
                         f"{_fmt(audit['spearman_rho'])}" + significant_text(audit))
        if self.checks.get("monotonicity"):
            lines.append(f"monotonicity violations: {len(self.checks['monotonicity'])}")
        if self.checks.get("idle_fallbacks"):
            lines.append("fallbacks that did not lower the loss: " + "; ".join(
                ", ".join(idle["layers"]) for idle in self.checks["idle_fallbacks"][:3]))
        if self.checks.get("disputed_fallbacks"):
            lines.append("disputed fallbacks: " + ", ".join(
                row["layer"] for row in self.checks["disputed_fallbacks"][:5]))
        return "\n".join(lines)

    def _layer_line(self) -> str:
        """``layers quantized: k/N (the schemes); fell back: ...`` with every layer counted
        once: a layer at a higher-bit rung is quantized *and* fell back from its scheme; the
        float layers the search never switched (skipped or never run) are named too."""
        schemes = [self.plan.get(row["name"], "float") for row in self.layers]
        counts = {s: schemes.count(s) for s in dict.fromkeys(schemes) if s != "float"}
        shown = ", ".join(f"{c} {s.upper()}" for s, c in counts.items())
        quantized = sum(counts.values())
        kept = ", ".join(self.skipped_layers[:5]) + (" ..." if len(self.skipped_layers) > 5
                                                     else "")
        return (f"layers quantized: {quantized}/{len(self.layers)}"
                + (f" ({shown})" if shown else "")
                + f"; fell back: {', '.join(self.fallback_layers) or 'none'}"
                + (f"; not searched (skip_layers, or never ran in calibration): {kept}"
                   if kept else ""))

    def _size_line(self) -> str:
        """Weight bytes as an export stores them (int8/int16, not bit-packed) vs float32."""
        from autoquant.report.build import model_sizes

        sizes = model_sizes(self.layers, self.plan)
        f_b, q_b = sizes["float_weight_bytes"], sizes["quantized_weight_bytes"]
        ratio = f" ({f_b / q_b:.2f}x smaller)" if f_b and q_b else ""
        return (f"weights as stored: {q_b:,} bytes quantized (int8/int16) vs {f_b:,} float32"
                f"{ratio}")

    def to_report(self) -> dict[str, Any]:
        """The JSON report (`autoquant.report.build.build_report`)."""
        from autoquant.report.build import build_report

        return build_report(self)

    def export_onnx(self, path: str | Path, example_inputs: Any = None,
                    opset: int | None = None, measure: bool = True, **options: Any) -> Path:
        """Export the chosen model to ONNX (`autoquant.export.export_onnx`; `options` are its
        keyword options: names, dynamic axes, ``strict``, ``target``).

        The parity check runs on the example inputs and the calibration batches. The
        figures (integer-kernel count, parity, and with `measure` the file size and the
        onnxruntime latency, both as ratios to the float export) go into `deployment` and
        so into the report. The result is otherwise unchanged, also when export fails.

        Example:
            >>> result.export_onnx("model_qdq.onnx", dynamic_axes={"x": {0: "batch"}})
        """
        from autoquant.export.onnx_export import export_measured

        inputs = self.example_inputs if example_inputs is None else example_inputs
        options.setdefault("check_inputs", self.check_inputs)
        out, figures = export_measured(self.model, path, inputs, opset, measure, **options)
        self.deployment = figures
        return out

    def save(self, directory: str | Path) -> Path:
        """Write the final config, the fake-quant state dict and ``report.json``
        (`autoquant.report.saving.save_result`); reload with `autoquant.load_quantized`."""
        from autoquant.report.saving import save_result

        return save_result(self, directory)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"
