"""The public entry points: `auto_quantize` (the search), `quantize` (plain PTQ) and
`sensitivity_analysis` (the ranking alone).

Each takes the user's evaluator (or the functional form: ``evaluate=fn`` and
``calibration_data=...``) and hands it to one `EvaluatorAdapter`; the stages below only
see the adapter (`autoquant.evaluation`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from autoquant.calibration.refine import calibrate_model, calibration_overrides, calibration_rows
from autoquant.config import QuantConfig
from autoquant.errors import ConfigError
from autoquant.evaluation.adapter import EvaluatorAdapter, calibration_of
from autoquant.evaluation.functional import FunctionEvaluator
from autoquant.plan import FLOAT
from autoquant.quant.qmodel import QuantModel
from autoquant.quant.saved import load_quantized
from autoquant.result import SearchResult
from autoquant.search.final import final_config
from autoquant.search.session import StageResult, run_stage
from autoquant.search.strategy import TrialRecord
from autoquant.search.trust import holdout_check
from autoquant.sensitivity.output import rank_layers
from autoquant.sensitivity.ranking import LayerSensitivity, SensitivityMetric
from autoquant.settings import SearchSettings

__all__ = ["auto_quantize", "quantize", "sensitivity_analysis", "load_quantized",
           "resolve_config", "make_evaluator"]

logger = logging.getLogger(__name__)

ConfigLike = QuantConfig | Mapping[str, Any] | str | Path | None


def resolve_config(config: ConfigLike) -> QuantConfig:
    """A `QuantConfig` from a config, a mapping, a YAML/JSON path, or None (int8)."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return QuantConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        return QuantConfig.load(config)
    raise ConfigError(
        f"config must be a QuantConfig, a mapping or a file path, got {type(config).__name__}"
    )


def make_evaluator(evaluator: Any = None, evaluate: Callable[[nn.Module], float] | None = None,
                   calibration_data: Iterable[Any] | None = None,
                   higher_is_better: bool = True) -> Any:
    """The user's evaluator, or a `FunctionEvaluator` built from the functional form."""
    if evaluator is not None and (evaluate is not None or calibration_data is not None):
        raise ConfigError("pass either an evaluator or evaluate=fn with calibration_data=..., "
                          "not both")
    if evaluator is not None:
        return evaluator
    if evaluate is None:
        raise ConfigError("auto_quantize needs an evaluator (an autoquant.Evaluator) or "
                          "evaluate=fn (model -> metric) with calibration_data=batches")
    return FunctionEvaluator(evaluate, calibration_data, higher_is_better)


def auto_quantize(
    model: nn.Module,
    evaluator: Any = None,
    example_inputs: Any = None,
    settings: SearchSettings | Mapping[str, Any] | None = None,
    *,
    config: ConfigLike = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    calibration_data: Iterable[Any] | None = None,
    higher_is_better: bool = True,
    dump_dir: str | Path | None = None,
    on_record: Callable[[TrialRecord], None] | None = None,
    preloaded: Sequence[TrialRecord] = (),
    ranking: Sequence[LayerSensitivity] | None = None,
    progress: Any = None,
    **overrides: Any,
) -> SearchResult:
    """Find the most-quantized version of `model` whose metric loss is within the budget.

    Calibrates once, ranks layers by sensitivity, evaluates the float model, then lets the
    strategy choose which layers fall back, evaluating each candidate. The user's model is
    never modified.

    Args:
        model: the trained float model (any `nn.Module`).
        evaluator: an `autoquant.Evaluator` (or any object with ``calibration(model)`` and
            ``evaluate(model) -> float``); or leave it None and pass `evaluate` and
            `calibration_data` (the functional form).
        example_inputs: a tuple of positional inputs (or a dict of keyword inputs) used to
            check that the model runs before anything expensive happens, and to export.
        settings: the `SearchSettings` (or its mapping: a job file's ``search:`` section).
        config: a `QuantConfig`, a mapping, or a YAML/JSON file path; default int8 W8A8.
        evaluate: ``evaluate(model) -> float``, the metric (functional form).
        calibration_data: a DataLoader or list of batches to calibrate on (functional
            form; see `autoquant.evaluation.functional.calibration_inputs`).
        higher_is_better: the direction of `evaluate`'s metric (functional form).
        dump_dir: write every layer's input activations here during the sensitivity pass.
        on_record: called with each new `TrialRecord` as soon as it exists (a journal).
        preloaded: records of an earlier identical run, reused instead of evaluated.
        ranking: a sensitivity ranking from an earlier identical run (skips that pass).
        progress: called as ``progress(stage, event, **info)`` at stage boundaries (for
            progress bars and journals).
        **overrides: `SearchSettings` fields, e.g. ``max_loss=0.01``, ``strategy="ladder"``.

    Returns:
        A `SearchResult`; it always comes back, with ``status`` saying whether the budget
        was met.

    Example:
        >>> result = auto_quantize(model, MyEvaluator(), (x,), max_loss=0.01)
        >>> result = auto_quantize(model, evaluate=accuracy, calibration_data=loader,
        ...                        max_loss=0.01)
    """
    total_start = time.perf_counter()
    settings = _settings(settings, overrides)
    user = make_evaluator(evaluator, evaluate, calibration_data, higher_is_better)
    adapter = EvaluatorAdapter(
        user, settings.criterion(bool(getattr(user, "higher_is_better", True))),
        settings.eval_timeout)
    cfg = resolve_config(config)
    qmodel = QuantModel(model, cfg, example_inputs)
    notify = progress if progress is not None else (lambda *args, **kwargs: None)
    timings = {}
    start = time.perf_counter()
    notify("calibration", "start", model=qmodel.model)
    calibrate_model(qmodel, adapter.calibrate)
    notify("calibration", "end")
    timings["calibration"] = time.perf_counter() - start
    start = time.perf_counter()
    reused = ranking is not None
    if ranking is None:
        notify("sensitivity", "start", model=qmodel.model)
        ranking = rank_layers(qmodel, adapter.calibrate, settings.sensitivity, dump_dir,
                              settings.sensitivity_scope, adapter,
                              settings.sensitivity_fraction)
    notify("sensitivity", "end", ranking=list(ranking), reused=reused)
    timings["sensitivity"] = time.perf_counter() - start
    rows = qmodel.layer_rows()
    stage = run_stage(qmodel, adapter, ranking, settings, example_inputs,
                      {r["name"]: r["parameters"] for r in rows}, on_record=on_record,
                      preloaded=preloaded, progress=progress)
    timings.update(search=stage.seconds, evaluator=stage.runner.evaluator_seconds)
    result = _result(qmodel, adapter, cfg, settings, stage, list(ranking), rows, timings,
                     example_inputs)
    result.timings["total"] = time.perf_counter() - total_start
    logger.info("search finished: %s", result.summary().replace("\n", "; "))
    return result


def _settings(settings: SearchSettings | Mapping[str, Any] | None,
              overrides: Mapping[str, Any]) -> SearchSettings:
    if settings is None or isinstance(settings, Mapping):
        return SearchSettings.from_dict({**dict(settings or {}), **overrides})
    if not isinstance(settings, SearchSettings):
        raise ConfigError(f"settings must be a SearchSettings or a mapping, got "
                          f"{type(settings).__name__}")
    return settings.replace(**overrides) if overrides else settings


def _result(qmodel: QuantModel, adapter: EvaluatorAdapter, cfg: QuantConfig,
            settings: SearchSettings, stage: StageResult, ranking: list[LayerSensitivity],
            rows: list[dict[str, Any]], timings: dict[str, float],
            example_inputs: Any) -> SearchResult:
    """The held-out re-check, then the final model and the `SearchResult`."""
    outcome, runner, context = stage.outcome, stage.runner, stage.context
    best = outcome.best
    plan = dict(best.plan) if best is not None else qmodel.float_plan()
    checks = dict(stage.checks)
    start = time.perf_counter()
    checked = holdout_check(qmodel, adapter, plan, qmodel.float_plan(), settings.holdout)
    if checked is not None:
        checks["holdout"] = {**checked, "seconds": time.perf_counter() - start}
    rows = calibration_rows(qmodel, rows)
    chosen = calibration_overrides(qmodel)
    qmodel.finalize(plan)
    return SearchResult(
        status=outcome.status,
        met=bool(best is not None and best.passed and any(s != FLOAT for s in plan.values())),
        reason=outcome.reason, float_metric=outcome.float_record.metric,
        full_quant_metric=None if outcome.full_quant is None else outcome.full_quant.metric,
        quant_metric=None if best is None else best.metric,
        loss=None if best is None else best.loss, plan=plan,
        quantized_layers=[n for n in qmodel.searchable if plan.get(n, FLOAT) != FLOAT],
        fallback_layers=[n for n in context.ranking
                         if plan.get(n) != context.quant_schemes[n]],
        skipped_layers=qmodel.skipped + qmodel.never_executed,
        num_evaluations=runner.num_evaluations, history=list(runner.history),
        sensitivity=ranking, model=qmodel.model,
        config=final_config(cfg, plan, qmodel.never_executed, chosen, qmodel.target),
        timings=timings, layers=rows, settings=settings,
        higher_is_better=adapter.criterion.higher_is_better, target=qmodel.target,
        folded_bn=[list(p) for p in qmodel.folded], checks=checks,
        determinism=runner.determinism, deploy_checks=stage.deploy_checks,
        closest=outcome.closest,
        example_inputs=example_inputs, check_inputs=list(qmodel.calibration_inputs),
    )


def quantize(model: nn.Module, evaluator: Any = None, config: ConfigLike = None,
             example_inputs: Any = None, *, calibration_data: Iterable[Any] | None = None
             ) -> nn.Module:
    """Plain PTQ: calibrate (``evaluator.calibration``, or `calibration_data`) and return
    the fake-quant copy. Layers in ``config.skip_layers`` (and layers calibration never
    ran) stay float.

    Example:
        >>> qmodel = quantize(model, calibration_data=calib_loader)
    """
    qmodel = QuantModel(model, resolve_config(config), example_inputs)
    calibrate_model(qmodel, _calibrate(evaluator, calibration_data))
    return qmodel.finalize(qmodel.quant_plan())


def sensitivity_analysis(
    model: nn.Module, evaluator: Any = None, example_inputs: Any = None, *,
    config: ConfigLike = None, sensitivity: str | type[SensitivityMetric] = "cosine",
    dump_dir: str | Path | None = None, calibration_data: Iterable[Any] | None = None,
    sensitivity_scope: str = "auto", sensitivity_fraction: float = 0.25,
) -> list[LayerSensitivity]:
    """Calibrate and rank layers by sensitivity (most sensitive first); no evaluation.

    `sensitivity_scope` is ``"auto"`` (``"subset"`` where the evaluator has
    ``evaluate_subset`` not marked ``default_ranking = False``, ``"output"`` where it has
    ``sensitivity_output``, ``"gradient"``
    where the model has gradients, each only without `dump_dir`, else ``"layer"``),
    ``"layer"`` (each layer's own output),
    ``"gradient"`` (that error carried to the model's output by the gradient), ``"output"`` (the
    model's output, one layer quantized at a time) or ``"subset"`` (the evaluator's
    ``evaluate_subset``, one layer quantized at a time); see
    `autoquant.sensitivity.output`. `sensitivity_fraction`: the share of the calibration
    rows the gradient scope runs first (`SearchSettings.sensitivity_fraction`)."""
    qmodel = QuantModel(model, resolve_config(config), example_inputs)
    calibrate = _calibrate(evaluator, calibration_data)
    calibrate_model(qmodel, calibrate)
    wanted = sensitivity_scope == "subset" or any(
        callable(getattr(evaluator, hook, None))
        for hook in ("evaluate_subset", "sensitivity_output"))
    adapter = EvaluatorAdapter(evaluator) if wanted and evaluator is not None else None
    return rank_layers(qmodel, calibrate, sensitivity, dump_dir, sensitivity_scope, adapter,
                       sensitivity_fraction)


def _calibrate(evaluator: Any, calibration_data: Iterable[Any] | None) -> Any:
    """The calibration callable of an evaluator, or of bare calibration data."""
    if evaluator is None:
        if calibration_data is None:
            raise ConfigError("pass an evaluator (with calibration(model)) or "
                              "calibration_data=batches")
        evaluator = FunctionEvaluator(lambda model: 0.0, calibration_data)
    elif calibration_data is not None:
        raise ConfigError("pass either an evaluator or calibration_data, not both")
    return calibration_of(evaluator)
