"""Sensitivity where the metric is: each layer quantized alone, scored at the model's output
(``scope="output"``) or by the user's own metric on a cheap subset (``scope="subset"``).

The layer-local pass (`autoquant.sensitivity.ranking`) scores the error a layer adds to its
own output. The rest of the model may amplify that error or absorb it (a branch scaled down
before a residual add, a layer whose error a later normalization removes), and the ranking
then misleads the search. ``scope="output"`` measures where the metric is: the float
model's outputs on the calibration batches are recorded once; then, for each searchable
layer, the plan with only that layer quantized (what a single-layer trial evaluates) runs
the calibration batches, and the metric compares the model's output with the float one,
call by call. An evaluator with ``sensitivity_output(output) -> Tensor`` (what its metric
reads of the output: decoded labels, a pitch, box coordinates) has that compared instead,
and ``"auto"`` then ranks in this scope: a metric that reads a decision of the output
(an argmax) is not predicted by how far the raw output moves, nor by its gradient.

Cost: N + 1 calibration passes for N layers, and no evaluation. Memory: the float outputs
of one pass, on their device, whatever N. The calibration must feed the same batches in
the same order on every pass (no shuffling); a change is a `ConfigError`.

``scope="subset"`` asks the evaluator itself, as NNCF ranks on a validation subset: its
``evaluate_subset(model)`` scores the float model and each single-layer plan (N + 1 cheap
calls, not counted as evaluations), and a layer's score is minus its loss there (the
evaluator's ``metric_eval`` or the search criterion decides the loss). ``"auto"`` ranks in
this scope first where the evaluator has ``evaluate_subset`` (unless the method is marked
``default_ranking = False``, a proxy rather than the metric): only the metric itself, on
its own labels, sees a layer whose error changes what it scores (an argmax bin, a frame
across a tolerance), or one that helps it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoquant.batches import first_tensor
from autoquant.errors import ConfigError
from autoquant.quant.layers import QuantState
from autoquant.quant.qmodel import Calibrate, QuantModel
from autoquant.quant.wrapping import all_finite
from autoquant.sensitivity.ranking import (
    NONFINITE_SCORE,
    LayerSensitivity,
    SensitivityMetric,
    compute_sensitivity,
    metric_name,
    ranked,
    resolve_metric,
)

__all__ = ["SCOPES", "rank_layers", "compute_output_sensitivity", "compute_subset_sensitivity"]

SCOPES = ("auto", "layer", "gradient", "output", "subset")

logger = logging.getLogger(__name__)


def rank_layers(qmodel: QuantModel, calibrate: Calibrate,
                metric: str | type[SensitivityMetric] = "cosine",
                dump_dir: str | Path | None = None, scope: str = "layer",
                evaluator: Any = None, fraction: float = 1.0) -> list[LayerSensitivity]:
    """The sensitivity ranking of `qmodel`, most sensitive first, in `scope`: ``"auto"``
    (``"subset"`` where `evaluator` ranks by its ``evaluate_subset``
    (`EvaluatorAdapter.ranks_by_subset`), else ``"output"`` where it has
    ``sensitivity_output``, else ``"gradient"`` where it applies, else ``"layer"``; the
    default), ``"layer"``
    (each layer's own output, one pass), ``"gradient"`` (its error carried to the model's
    output by the gradient, one pass with a backward; `autoquant.sensitivity.gradient`),
    ``"output"`` (the model's output, N + 1 passes) or ``"subset"`` (`evaluator`'s
    ``evaluate_subset``, an `EvaluatorAdapter`; N + 1 calls). `fraction` is the share of
    the calibration rows the gradient scope runs first (`autoquant.sensitivity.sampling`).

    Raises:
        ConfigError: an unknown scope or metric, `dump_dir` outside the layer scope, the
            subset scope without an evaluator that has ``evaluate_subset``, or the gradient
            scope with one that has ``sensitivity_output``.
    """
    view = evaluator.output_view if evaluator is not None and evaluator.has_output_view \
        else None
    if scope == "auto" and evaluator is not None and evaluator.ranks_by_subset and \
            dump_dir is None:
        logger.info("ranking by %s.evaluate_subset, one layer quantized at a time (the subset "
                    "scope: N + 1 cheap calls)", evaluator.name)
        return compute_subset_sensitivity(qmodel, evaluator)
    if scope == "auto" and view is not None and dump_dir is None:
        logger.info("ranking at the model's output through %s.sensitivity_output (the output "
                    "scope: one calibration pass per layer)", evaluator.name)
        return compute_output_sensitivity(qmodel, calibrate, metric, view)
    if scope == "auto":
        return _auto(qmodel, calibrate, metric, dump_dir, fraction)
    if scope == "layer":
        return compute_sensitivity(qmodel, calibrate, metric, dump_dir)
    if scope not in SCOPES:
        raise ConfigError(f"sensitivity_scope must be one of {list(SCOPES)}, got {scope!r:.40}")
    if dump_dir is not None:
        raise ConfigError("dump_dir writes the inputs the layer-scope pass sees; use it with "
                          "sensitivity_scope='layer' (or 'auto', the default, which ranks "
                          "by the layer scope when dump_dir is set)")
    if scope == "output":
        return compute_output_sensitivity(qmodel, calibrate, metric, view)
    if scope == "gradient" and view is not None:
        raise ConfigError(f"sensitivity_scope='gradient' cannot carry errors through "
                          f"{evaluator.name}.sensitivity_output (what a metric reads, such as "
                          "an argmax, has no useful gradient); use sensitivity_scope='output' "
                          "or 'auto', which compare it with one layer quantized at a time")
    if scope == "gradient":
        from autoquant.sensitivity.gradient import compute_gradient_sensitivity

        return compute_gradient_sensitivity(qmodel, calibrate, metric, fraction)
    if evaluator is None or not evaluator.has_subset:
        name = type(getattr(evaluator, "evaluator", evaluator)).__name__
        raise ConfigError(f"sensitivity_scope='subset' ranks layers with the evaluator's "
                          f"evaluate_subset(model) -> float, which {name} does not define; "
                          "add it (the metric on a small, cheap part of the evaluation data) "
                          "or use sensitivity_scope='layer' or 'output'")
    return compute_subset_sensitivity(qmodel, evaluator)


def _auto(qmodel: QuantModel, calibrate: Calibrate, metric: str | type[SensitivityMetric],
          dump_dir: str | Path | None, fraction: float) -> list[LayerSensitivity]:
    """The gradient scope, or the layer scope where it cannot apply: a `dump_dir` (the
    layer pass writes the inputs), a metric it cannot estimate, a model without gradients,
    or a forward graph that does not fit in memory (the layer pass keeps none)."""
    from autoquant.sensitivity.gradient import (
        GRADIENT_METRICS,
        NoGradient,
        compute_gradient_sensitivity,
    )

    if dump_dir is None and metric_name(resolve_metric(metric)) in GRADIENT_METRICS:
        try:
            return compute_gradient_sensitivity(qmodel, calibrate, metric, fraction)
        except Exception as err:
            if not isinstance(err, NoGradient) and not _out_of_memory(err):
                raise
            logger.warning("ranking by each layer's own output instead of the model's: %s",
                           err)
    return compute_sensitivity(qmodel, calibrate, metric, dump_dir)


def _out_of_memory(err: BaseException | None) -> bool:
    """Whether `err` or an error it was raised from is a device or host out-of-memory."""
    seen = 0
    while err is not None and seen < 16:
        if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _count_calls(qmodel: QuantModel, names: list[str], counts: dict[str, int]) -> list[Any]:
    """Forward pre-hooks counting each layer's calls into `counts` (remove them after)."""
    return [qmodel.layers[n].register_forward_pre_hook(
        lambda *_, n=n: counts.__setitem__(n, counts[n] + 1)) for n in names]


def compute_subset_sensitivity(qmodel: QuantModel, evaluator: Any) -> list[LayerSensitivity]:
    """Score every searchable layer by minus its loss on the evaluator's
    ``evaluate_subset`` with only that layer quantized; worst first.

    Args:
        evaluator: an `autoquant.evaluation.adapter.EvaluatorAdapter` whose evaluator has
            ``evaluate_subset``.
    """
    start = time.perf_counter()
    names, quant = qmodel.searchable, qmodel.quant_plan()
    counts = dict.fromkeys(names, 0)
    qmodel.apply_plan(qmodel.float_plan())
    hooks = _count_calls(qmodel, names, counts)
    try:
        base = evaluator.measure_subset(qmodel.model, "(subset ranking: the float model)")
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for name in names:
        qmodel.apply_plan({name: quant[name]})
        metric = evaluator.measure_subset(qmodel.model, f"(subset ranking of {name})")
        rows.append((-evaluator.decide(base, metric)[1], name, counts[name]))
    qmodel.apply_plan(quant)
    return ranked(qmodel, rows, f"evaluate_subset, {len(names) + 1} calls", start, "subset")


def _mark(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """A cheap fingerprint of one forward call's inputs: each tensor's shape and sum."""
    return tuple((tuple(v.shape), float(torch.nan_to_num(v.detach().double()).sum()))
                 for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


@dataclass
class _Pass:
    """What one calibration pass saw at the model's output (hooks must not raise: the
    adapter would report the error as the user's calibration failing)."""

    reference: list[torch.Tensor] | None = None  # None: this is the float pass
    metric: SensitivityMetric | None = None
    view: Callable[[Any], torch.Tensor] | None = None  # the evaluator's sensitivity_output
    outputs: list[torch.Tensor] = field(default_factory=list)
    marks: list[tuple] = field(default_factory=list)
    calls: int = 0
    nonfinite: bool = False
    error: Exception | None = None

    def __call__(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        k, self.calls = self.calls, self.calls + 1
        try:
            y = (first_tensor(output) if self.view is None else self.view(output)).detach()
            if self.reference is None:
                self.outputs.append(y)
                self.marks.append(_mark(args, kwargs))
            elif k < len(self.reference) and y.shape == self.reference[k].shape:
                if not all_finite(y):
                    self.nonfinite = True
                elif self.metric is not None:
                    self.metric.update(self.reference[k], y)
                self.marks.append(_mark(args, kwargs))
        except Exception as err:  # raised after the pass
            self.error = self.error or err


def _run(qmodel: QuantModel, calibrate: Calibrate, plan: dict[str, str], record: _Pass,
         where: str) -> _Pass:
    qmodel.apply_plan(plan)
    hook = qmodel.model.register_forward_hook(record, with_kwargs=True)
    qmodel.calibration_pass(calibrate, QuantState.QUANTIZE, where, [hook])
    if record.error is not None:
        raise record.error
    return record


def compute_output_sensitivity(qmodel: QuantModel, calibrate: Calibrate,
                               metric: str | type[SensitivityMetric] = "cosine",
                               view: Callable[[Any], torch.Tensor] | None = None
                               ) -> list[LayerSensitivity]:
    """Score every searchable layer by how far quantizing it alone moves the model's output
    (or `view` of it: the evaluator's ``sensitivity_output``) from float on the calibration
    batches (see the module docstring); worst first.

    Raises:
        ConfigError: the calibration fed other batches (or another number of them) than on
            the float pass.
        ModelError: the model's output holds no tensor.
    """
    metric_cls = resolve_metric(metric)
    start = time.perf_counter()
    names, quant = qmodel.searchable, qmodel.quant_plan()
    counts = dict.fromkeys(names, 0)
    hooks = _count_calls(qmodel, names, counts)
    try:
        base = _run(qmodel, calibrate, qmodel.float_plan(), _Pass(view=view),
                    "(output sensitivity: the float reference)")
    finally:
        for hook in hooks:
            hook.remove()
    if not base.outputs:
        raise ConfigError("output-level sensitivity needs the calibration to call the model; "
                          "it made no call")
    rows = []
    for name in names:
        seen = _run(qmodel, calibrate, {name: quant[name]},
                    _Pass(reference=base.outputs, metric=metric_cls(), view=view),
                    f"(output sensitivity of {name})")
        if seen.marks != base.marks:
            raise ConfigError(
                f"output-level sensitivity needs the calibration to feed the same batches in "
                f"the same order on every pass, but the pass for layer {name!r} saw other "
                f"inputs than the float pass ({seen.calls} model call(s), {base.calls} "
                "before); stop shuffling the calibration data (or use "
                "sensitivity_scope='layer')")
        score = NONFINITE_SCORE if seen.nonfinite else seen.metric.score()
        rows.append((score, name, counts[name]))
    qmodel.apply_plan(quant)
    seen = "model output" if view is None else "sensitivity_output of the model output"
    return ranked(qmodel, rows, f"{metric_name(metric_cls)}, {seen}, {len(names) + 1} passes",
                  start, "output")
