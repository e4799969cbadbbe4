"""The search stage of one run: the context a strategy sees, the trial runner with its
budget and workers, the strategy loop with the deploy check, and the checks on the
history (monotonicity, ranking audit). `autoquant.api.auto_quantize` calls `run_stage`."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoquant.errors import ConfigError, ExportError
from autoquant.evaluation.adapter import EvaluatorAdapter
from autoquant.plan import plan_key
from autoquant.quant.qmodel import QuantModel
from autoquant.search.deploy_check import DeployCheck, evaluate_deployed, search_until_deployed
from autoquant.search.loop import SearchOutcome, TrialRunner
from autoquant.search.parallel import open_trial_executor
from autoquant.search.strategy import SearchContext, SearchStrategy, TrialRecord
from autoquant.search.trust import (
    disputed_fallbacks,
    idle_fallbacks,
    monotonicity_violations,
    ranking_audit,
)
from autoquant.sensitivity.ranking import LayerSensitivity
from autoquant.settings import SearchSettings

__all__ = ["StageResult", "build_context", "run_stage"]

logger = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What the search stage found, for `autoquant.result.SearchResult`."""

    outcome: SearchOutcome
    runner: TrialRunner
    context: SearchContext
    checks: dict[str, Any] = field(default_factory=dict)
    deploy_checks: list[DeployCheck] = field(default_factory=list)
    seconds: float = 0.0


def build_context(qmodel: QuantModel, ranking: Sequence[LayerSensitivity],
                  settings: SearchSettings, params: dict[str, int],
                  width: int | None = None) -> SearchContext:
    """The read-only view a strategy gets of the searchable layers (`width`: how many
    trials the workers run at once; ``settings.workers`` by default)."""
    names = qmodel.searchable
    budget = settings.max_evaluations
    return SearchContext(
        ranking=tuple(r.name for r in ranking if r.name in set(names)),
        scores={r.name: r.score for r in ranking},
        quant_schemes={n: qmodel.layers[n].config.scheme for n in names},
        fallback_schemes={n: qmodel.layers[n].config.fallback_scheme for n in names},
        max_evaluations=None if budget is None else budget - 1,
        options=dict(settings.strategy_options),
        workers=settings.workers if width is None else width,
        params=params,
        local_scores={r.name: r.local for r in ranking if r.local is not None},
    )


def _rounds(settings: SearchSettings) -> Callable[[], SearchStrategy]:
    """A strategy per round of the deploy check: the one given, then fresh copies of it."""
    first = settings.make_strategy()
    template = None
    if settings.verify_deploy:
        try:
            template = copy.deepcopy(first)
        except Exception as err:
            raise ConfigError(
                f"verify_deploy needs a fresh strategy per round, but the "
                f"{type(first).__name__} instance cannot be copied ({type(err).__name__}: "
                f"{err}); pass the strategy's name or class with strategy_options instead"
            ) from err
    given = [first]
    return lambda: given.pop() if given else copy.deepcopy(template)


def run_stage(qmodel: QuantModel, evaluator: EvaluatorAdapter,
              ranking: Sequence[LayerSensitivity], settings: SearchSettings,
              example_inputs: Any, params: dict[str, int], *,
              on_record: Callable[[TrialRecord], None] | None = None,
              preloaded: Sequence[TrialRecord] = (), progress: Any = None) -> StageResult:
    """Run the strategy against `evaluator` on the calibrated `qmodel` (see the module
    docstring); the float baseline first, the budget and deadline of `settings`."""
    deadline = None if settings.max_seconds is None else \
        time.monotonic() + settings.max_seconds
    new_strategy = _rounds(settings)
    pool = open_trial_executor(qmodel, evaluator, settings.executor, settings.workers,
                               settings.eval_timeout)
    context = build_context(qmodel, ranking, settings, params,
                            None if pool is None else pool.width)
    runner = TrialRunner(
        qmodel, evaluator, max_evaluations=settings.max_evaluations, on_record=on_record,
        preloaded={plan_key(r.plan): r for r in preloaded}, pool=pool, deadline=deadline,
        check_determinism=settings.check_determinism,
    )

    checks: dict[str, Any] = {}

    def deploy(record: TrialRecord) -> DeployCheck | None:
        if not settings.verify_deploy:
            return None
        assert runner.float_metric is not None  # the baseline ran first
        try:
            return evaluate_deployed(qmodel, record.plan, record.index, evaluator,
                                     example_inputs, runner.float_metric,
                                     settings.deploy_options)
        except ExportError as err:  # the search's answer stands, unverified
            checks["deploy_error"] = str(err)
            logger.warning("verify_deploy: the chosen plan (trial %d) could not be exported "
                           "or run in onnxruntime, so it is not verified: %s", record.index,
                           err)
            return None

    start = time.perf_counter()
    try:
        outcome, deployed = search_until_deployed(
            runner, new_strategy, context, qmodel.float_plan(), deploy, progress)
        checks["monotonicity"] = monotonicity_violations(runner.history, context)
        checks["idle_fallbacks"] = idle_fallbacks(runner.history, context)
        if context.local_scores:
            checks["disputed_fallbacks"] = disputed_fallbacks(
                context, outcome.best.fallback_layers if outcome.best is not None else [])
        if runner.resume_check is not None:
            checks["resume"] = runner.resume_check
        if settings.audit:
            checks["audit"] = ranking_audit(runner, context, settings.audit,
                                            settings.max_loss)
        if pool is not None:
            checks["parallel"] = pool.summary()
    finally:
        if pool is not None:
            pool.close()
    return StageResult(outcome, runner, context, checks, deployed,
                       time.perf_counter() - start)
