"""The public entry points: `auto_quantize`, `quantize`, `sensitivity_analysis`,
`load_quantized`, and the AMCT-style `create_quant_config` /
`accuracy_based_auto_calibration` for users migrating from Huawei AMCT."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from autoquant.calibration.refine import calibrate_model, calibration_overrides, calibration_rows
from autoquant.config import QuantConfig
from autoquant.errors import ConfigError
from autoquant.evaluation.criterion import AccuracyCriterion, LossType
from autoquant.evaluation.guard import check_timeout_setting, load_state_dict_file
from autoquant.plan import FLOAT, plan_key
from autoquant.quant.qmodel import QuantModel
from autoquant.result import CONFIG_FILE, STATE_FILE, SearchResult, final_config
from autoquant.search.deploy_check import DeployCheck, evaluate_deployed, search_until_deployed
from autoquant.search.loop import TrialRunner, make_decision
from autoquant.search.parallel import WorkerPool, check_workers
from autoquant.search.strategy import STRATEGIES, SearchContext, SearchStrategy, TrialRecord
from autoquant.search.trust import (
    check_trust_args,
    holdout_check,
    monotonicity_violations,
    ranking_audit,
)
from autoquant.sensitivity.ranking import LayerSensitivity, SensitivityMetric, compute_sensitivity

__all__ = [
    "auto_quantize",
    "quantize",
    "sensitivity_analysis",
    "load_quantized",
]

logger = logging.getLogger(__name__)


def _resolve_config(config: QuantConfig | Mapping[str, Any] | str | Path | None) -> QuantConfig:
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


def _make_strategy(strategy: str | SearchStrategy | type[SearchStrategy],
                   options: Mapping[str, Any]) -> SearchStrategy:
    if isinstance(strategy, SearchStrategy):
        return strategy
    cls = STRATEGIES.resolve(strategy) if isinstance(strategy, str) else strategy
    if not (isinstance(cls, type) and issubclass(cls, SearchStrategy)):
        raise ConfigError(f"strategy must be a name or a SearchStrategy, got {strategy!r}")
    try:
        return cls(**options)
    except TypeError as err:
        raise ConfigError(f"bad strategy_options for {cls.__name__}: {err}") from err


def _strategy_template(search: SearchStrategy, verify_deploy: bool) -> SearchStrategy | None:
    """An unused copy of `search` for later rounds of the deploy check (None when off)."""
    if not verify_deploy:
        return None
    try:
        return copy.deepcopy(search)
    except Exception as err:
        raise ConfigError(
            f"verify_deploy needs a fresh strategy per round, but the {type(search).__name__} "
            f"instance cannot be copied ({type(err).__name__}: {err}); pass the strategy's "
            "name or class with strategy_options instead"
        ) from err


def _check_budget(max_evaluations: int | None) -> None:
    if max_evaluations is None:
        return
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or \
            max_evaluations < 2:
        raise ConfigError(
            f"max_evaluations must be an int >= 2 (the float baseline and at least one "
            f"quantized trial) or None for no limit, got {max_evaluations!r}"
        )


def auto_quantize(
    model: nn.Module,
    evaluator: Any,
    example_inputs: Any = None,
    *,
    max_loss: float = 0.01,
    loss_type: LossType = "absolute",
    strategy: str | SearchStrategy | type[SearchStrategy] = "binary",
    sensitivity: str | type[SensitivityMetric] = "cosine",
    config: QuantConfig | Mapping[str, Any] | str | Path | None = None,
    max_evaluations: int | None = None,
    strategy_options: Mapping[str, Any] | None = None,
    dump_dir: str | Path | None = None,
    on_record: Any = None,
    preloaded: Sequence[TrialRecord] = (),
    ranking: Sequence[LayerSensitivity] | None = None,
    progress: Any = None,
    workers: int = 1,
    holdout: bool | None = None,
    audit: int = 0,
    eval_timeout: float | None = None,
    max_seconds: float | None = None,
    check_determinism: bool = False,
    verify_deploy: bool = False,
    deploy_options: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Find the most-quantized version of `model` whose metric loss is within `max_loss`.

    Calibrates once (``evaluator.calibration``), ranks layers by sensitivity, evaluates the
    float model, then lets `strategy` choose which layers fall back, evaluating each
    candidate with ``evaluator.evaluate``. The user's model is never modified.

    Args:
        model: the trained float model (any `nn.Module`).
        evaluator: an `autoquant.Evaluator` (or any object with ``calibration(model)``
            and ``evaluate(model) -> float``; ``metric_eval`` and ``higher_is_better``
            are optional).
        example_inputs: a tuple of positional inputs (or a dict of keyword inputs) used to
            check that the model runs before anything expensive happens.
        max_loss: the accepted loss: metric units (``absolute``) or a fraction of the float
            metric (``relative``).
        loss_type: ``"absolute"`` or ``"relative"``.
        strategy: a registered strategy name (``"binary"``), a class or an instance.
        sensitivity: a registered sensitivity metric name (``"cosine"``) or class.
        config: a `QuantConfig`, a mapping, or a YAML/JSON file path; default int8 W8A8.
        max_evaluations: a budget on evaluator calls, the float baseline included.
        strategy_options: keyword options for the strategy's constructor.
        dump_dir: write every layer's input activations here during the sensitivity pass.
        on_record: called with each new `TrialRecord` as soon as it exists (a journal).
        preloaded: records of an earlier identical run, reused instead of evaluated.
        ranking: a sensitivity ranking from an earlier identical run (skips that pass).
        progress: called as ``progress(stage, event, **info)`` at stage boundaries (for
            progress bars and journals): ``("calibration", "start", model=...)``,
            ``("calibration", "end")``, ``("sensitivity", "start", model=...)``,
            ``("sensitivity", "end", ranking=..., reused=bool)``, ``("search", "start",
            total=int | None)`` and ``("search", "trial", record=..., reused=bool)``.
        workers: evaluate the independent plans of each strategy step in this many
            spawned processes (see `autoquant.search.parallel`); 1 evaluates in this process.
        holdout: re-check the final plan with ``evaluator.evaluate_holdout`` (None: if the
            evaluator has it; True: required; False: never). See `autoquant.search.trust`.
        audit: evaluate the `audit` worst-ranked layers alone quantized after the search
            and report Spearman's rho of the ranking against the measured losses
            (these evaluations count in ``num_evaluations``).
        eval_timeout: seconds one ``evaluate`` call may take; a longer one stops the search
            with `EvaluatorTimeoutError` (finished evaluations are kept; the slow call is
            abandoned in a background thread, Python cannot kill it). None: no limit, and
            ``evaluate`` runs in the calling thread.
        max_seconds: wall-time budget of the whole call: no new evaluation starts after it
            (the status is then ``budget_exhausted``); the float baseline always runs.
        check_determinism: evaluate the float model a second time, right after the
            baseline, and compare: a difference is warned about and recorded in
            ``result.determinism`` and the report. Costs one extra evaluation, which is not
            a trial (not in ``history``, ``num_evaluations`` or ``max_evaluations``).
        verify_deploy: export the chosen plan to ONNX and score it with
            ``evaluator.evaluate`` in onnxruntime (default session options, one evaluation,
            counted); if the deployed model misses the budget, the search goes on with the
            next plan the strategy proposes (see `autoquant.search.deploy_check`). The
            result records ``deployed_metric``, ``deployed_loss`` and ``met_on_deploy``.
        deploy_options: `autoquant.export.export_onnx` keyword options for that export
            (``input_names``, ``dynamic_axes``, ``opset``, ...).

    Returns:
        A `SearchResult`; it always comes back, with ``status`` saying whether the budget
        was met.

    Example:
        >>> result = auto_quantize(model, MyEvaluator(), (x,), max_loss=0.01)
        >>> result.status, result.fallback_layers
    """
    total_start = time.perf_counter()
    criterion = AccuracyCriterion(
        max_loss, loss_type, bool(getattr(evaluator, "higher_is_better", True))
    )
    _check_budget(max_evaluations)
    check_workers(workers)
    check_trust_args(holdout, audit)
    eval_timeout = check_timeout_setting(eval_timeout, "eval_timeout")
    max_seconds = check_timeout_setting(max_seconds, "max_seconds")
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    cfg = _resolve_config(config)
    search = _make_strategy(strategy, dict(strategy_options or {}))
    qmodel = QuantModel(model, cfg, example_inputs)

    notify = progress if progress is not None else (lambda *args, **kwargs: None)
    start = time.perf_counter()
    notify("calibration", "start", model=qmodel.model)
    calibrate_model(qmodel, evaluator)
    notify("calibration", "end")
    t_calib = time.perf_counter() - start

    start = time.perf_counter()
    reused = ranking is not None
    if ranking is None:
        notify("sensitivity", "start", model=qmodel.model)
        ranking = compute_sensitivity(qmodel, evaluator, sensitivity, dump_dir)
    notify("sensitivity", "end", ranking=list(ranking), reused=reused)
    t_sens = time.perf_counter() - start

    names = qmodel.searchable
    rows = qmodel.layer_rows()
    context = SearchContext(
        ranking=tuple(r.name for r in ranking if r.name in set(names)),
        scores={r.name: r.score for r in ranking},
        quant_schemes={n: qmodel.layers[n].config.scheme for n in names},
        fallback_schemes={n: qmodel.layers[n].config.fallback_scheme for n in names},
        max_evaluations=None if max_evaluations is None else max_evaluations - 1,
        options=dict(strategy_options or {}),
        workers=workers,
        params={r["name"]: r["parameters"] for r in rows},
    )
    decide = make_decision(evaluator, criterion.check)
    pool = WorkerPool(qmodel, evaluator, workers) if workers > 1 else None
    runner = TrialRunner(
        qmodel, evaluator, decide,
        max_evaluations=max_evaluations, on_record=on_record,
        preloaded={plan_key(r.plan): r for r in preloaded}, pool=pool,
        eval_timeout=eval_timeout, deadline=deadline, check_determinism=bool(check_determinism),
    )
    start = time.perf_counter()
    checks: dict[str, Any] = {}
    if not isinstance(verify_deploy, bool):
        raise ConfigError(f"verify_deploy must be True or False, got {verify_deploy!r}")
    rounds = [search]  # the first round uses the strategy as given; a deploy check that
    template = _strategy_template(search, verify_deploy)  # fails starts a fresh one

    def new_strategy() -> SearchStrategy:
        if rounds:
            return rounds.pop()
        return copy.deepcopy(template)

    def deploy(record: TrialRecord) -> DeployCheck | None:
        if not verify_deploy:
            return None
        assert runner.float_metric is not None  # the baseline ran first
        return evaluate_deployed(qmodel, record.plan, record.index, evaluator, example_inputs,
                                 decide, runner.float_metric, eval_timeout, deploy_options)

    try:
        outcome, deployed = search_until_deployed(
            runner, new_strategy, context, qmodel.float_plan(), deploy, progress)
        checks["monotonicity"] = monotonicity_violations(runner.history, context)
        if audit:
            checks["audit"] = ranking_audit(runner, context, audit)
    finally:
        if pool is not None:
            pool.close()
    t_search = time.perf_counter() - start

    best = outcome.best
    plan = dict(best.plan) if best is not None else qmodel.float_plan()
    skipped = qmodel.skipped + qmodel.never_executed
    quantized = [n for n in names if plan.get(n, FLOAT) != FLOAT]
    start = time.perf_counter()
    checked = holdout_check(qmodel, evaluator, plan, qmodel.float_plan(),
                            decide, holdout)
    if checked is not None:
        checks["holdout"] = {**checked, "seconds": time.perf_counter() - start}
    rows = calibration_rows(qmodel, rows)
    chosen = calibration_overrides(qmodel)
    qmodel.finalize(plan)
    fallback = [n for n in context.ranking if plan.get(n) != context.quant_schemes[n]]
    result = SearchResult(
        status=outcome.status,
        met=bool(best is not None and best.passed),
        reason=outcome.reason,
        float_metric=outcome.float_record.metric,
        full_quant_metric=None if outcome.full_quant is None else outcome.full_quant.metric,
        quant_metric=None if best is None else best.metric,
        loss=None if best is None else best.loss,
        plan=plan,
        quantized_layers=quantized,
        fallback_layers=fallback,
        skipped_layers=skipped,
        num_evaluations=runner.num_evaluations,
        history=list(runner.history),
        sensitivity=list(ranking),
        model=qmodel.model,
        config=final_config(cfg, plan, qmodel.never_executed, chosen, qmodel.target),
        timings={
            "total": time.perf_counter() - total_start,
            "calibration": t_calib,
            "sensitivity": t_sens,
            "search": t_search,
            "evaluator": runner.evaluator_seconds,
        },
        layers=rows,
        settings={
            "strategy": search.name or type(search).__name__,
            "sensitivity": sensitivity if isinstance(sensitivity, str) else sensitivity.__name__,
            "max_loss": max_loss,
            "loss_type": loss_type,
            "higher_is_better": criterion.higher_is_better,
            "max_evaluations": max_evaluations,
            "folded_bn": [list(p) for p in qmodel.folded],
            "workers": workers,
            "eval_timeout": eval_timeout,
            "max_seconds": max_seconds,
            "target": qmodel.target,
        },
        checks=checks,
        determinism=runner.determinism,
        deploy_checks=deployed,
        example_inputs=example_inputs,
        check_inputs=list(qmodel.calibration_inputs),
    )
    logger.info("search finished: %s", result.summary().replace("\n", "; "))
    return result


def quantize(
    model: nn.Module,
    evaluator: Any,
    config: QuantConfig | Mapping[str, Any] | str | Path | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Plain PTQ: calibrate with ``evaluator.calibration`` and return the fake-quant copy.

    Layers in ``config.skip_layers`` (and layers calibration never ran) stay float.
    """
    qmodel = QuantModel(model, _resolve_config(config), example_inputs)
    calibrate_model(qmodel, evaluator)
    return qmodel.finalize(qmodel.quant_plan())


def sensitivity_analysis(
    model: nn.Module,
    evaluator: Any,
    example_inputs: Any = None,
    *,
    config: QuantConfig | Mapping[str, Any] | str | Path | None = None,
    sensitivity: str | type[SensitivityMetric] = "cosine",
    dump_dir: str | Path | None = None,
) -> list[LayerSensitivity]:
    """Calibrate and rank layers by sensitivity (most sensitive first); no evaluation."""
    qmodel = QuantModel(model, _resolve_config(config), example_inputs)
    calibrate_model(qmodel, evaluator)
    return compute_sensitivity(qmodel, evaluator, sensitivity, dump_dir)


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the fake-quant model saved by `SearchResult.save` on a copy of `model`.

    Uses the saved config and qparams; no calibration data is needed.
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, STATE_FILE):
        if not (directory / name).is_file():
            raise ConfigError(
                f"{directory} has no {name}; pass the folder written by SearchResult.save()"
            )
    cfg = QuantConfig.load(directory / CONFIG_FILE)
    qmodel = QuantModel(model, cfg)
    state = load_state_dict_file(directory / STATE_FILE, "the saved quantized model")
    try:
        qmodel.model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(
            f"{directory / STATE_FILE} does not fit this model with the saved config: {err}. "
            "Pass the same float model architecture the search was run on."
        ) from err
    qmodel.apply_plan(qmodel.quant_plan())
    return qmodel.model
