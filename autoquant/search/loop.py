"""The search loop: the core asks a strategy for plans and evaluates them.

Caching (a plan is never evaluated twice), the evaluation budget, validation of what the
evaluator returns and the trial history live here, in one place, for every strategy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from autoquant.errors import EvaluatorError
from autoquant.evaluation.adapter import EvaluatorAdapter
from autoquant.evaluation.guard import determinism_record, same_score
from autoquant.plan import FLOAT, QuantPlan, plan_key
from autoquant.quant.qmodel import QuantModel
from autoquant.search.strategy import SearchContext, SearchStrategy, TrialRecord

__all__ = ["TrialRunner", "SearchOutcome", "run_search", "SearchStatus", "trial_label"]

logger = logging.getLogger(__name__)

SearchStatus = Literal["met", "float_only", "not_met", "budget_exhausted"]


class BudgetExhausted(Exception):
    """Raised inside the loop when the next evaluation would exceed the budget."""


@dataclass
class TrialRunner:
    """Evaluates plans on a `QuantModel` with a cache, a budget and a history.

    Attributes:
        on_record: called with every new record as soon as it exists (e.g. a journal).
        preloaded: records from an earlier run, served without evaluating (resume).
    """

    qmodel: QuantModel
    evaluator: EvaluatorAdapter
    max_evaluations: int | None = None
    on_record: Callable[[TrialRecord], None] | None = None
    preloaded: Mapping[str, TrialRecord] = field(default_factory=dict)
    history: list[TrialRecord] = field(default_factory=list)
    evaluator_seconds: float = 0.0
    float_metric: float | None = None
    pool: Any = None  # an autoquant.search.parallel.TrialExecutor: trials run on workers
    deadline: float | None = None
    check_determinism: bool = False
    determinism: dict[str, Any] | None = None
    stopped_by: str | None = None
    _cache: dict[str, TrialRecord] = field(default_factory=dict)
    _ranking: list[str] = field(default_factory=list)
    _prefetched: dict[str, tuple[Any, float]] = field(default_factory=dict)

    extra_evaluations: int = 0  # evaluations outside the trial history (deploy checks)
    resume_check: dict[str, Any] | None = None

    @property
    def num_evaluations(self) -> int:
        """Evaluations made (or reused from a resumed run) so far."""
        return len(self.history) + self.extra_evaluations

    def budget_left(self) -> bool:
        """True while one more evaluation fits the evaluation and time budgets."""
        if self.max_evaluations is not None and self.num_evaluations >= self.max_evaluations:
            self.stopped_by = "evaluations"
            return False
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped_by = "time"
            return False
        return True

    def reject(self, record: TrialRecord, note: str) -> TrialRecord:
        """Mark `record`'s plan as failed from now on (e.g. it missed the budget once
        deployed): the cache and the history hold a failed copy, labelled with `note`."""
        failed = dataclasses.replace(record, passed=False, label=f"{record.label} ({note})")
        self._cache[plan_key(record.plan)] = failed
        self.history = [failed if r is record else r for r in self.history]
        return failed

    def fallback_layers(self, plan: Mapping[str, str]) -> list[str]:
        """Layers of `plan` not at their quantized scheme, most sensitive first."""
        order = self._ranking or list(plan)
        quant = {n: self.qmodel.layers[n].config.scheme for n in plan}
        return [n for n in order if n in plan and plan[n] != quant[n]]

    def prefetch(self, plans: list[QuantPlan]) -> None:
        """Evaluate the new plans among `plans` at once on the workers (if any).

        Only the plans `evaluate` would run, in order and within the budget, are sent (and
        none starts after the deadline); their raw outcomes wait until `evaluate` turns them
        into records in the asked order, so indices, history and the strategy's view are the
        same whichever worker finishes first. If one fails, the others that finished are
        recorded (and journaled) before the error propagates, so a resume repeats none.
        """
        if self.pool is None:
            return
        todo: dict[str, QuantPlan] = {}
        for plan in plans:
            key = plan_key(plan)
            if key not in self._cache and key not in self.preloaded:
                todo.setdefault(key, plan)
        keys = list(todo)
        if self.max_evaluations is not None:
            keys = keys[:max(0, self.max_evaluations - self.num_evaluations)]
        if len(keys) < 2:
            return
        base = self.num_evaluations
        labels = [trial_label(todo[k], self.fallback_layers(todo[k])) for k in keys]
        jobs = [(todo[k], f"in trial {base + n} ({labels[n]})") for n, k in enumerate(keys)]

        def done(n: int, value: Any, seconds: float) -> None:
            self._prefetched[keys[n]] = (value, seconds)

        try:
            self.pool.evaluate(jobs, done, self.deadline)
        except BaseException:
            for n, key in enumerate(keys):
                if key in self._prefetched and key not in self._cache:
                    self._keep(self._run(todo[key], labels[n], base + n), key, fresh=True)
            raise

    def evaluate(self, plan: QuantPlan, label: str) -> TrialRecord:
        """The record of `plan`: from the cache, else evaluated (BudgetExhausted if none left)."""
        key = plan_key(plan)
        if key in self._cache:
            return self._cache[key]
        reused = self.preloaded.get(key)
        if reused is None and key not in self._prefetched and self.max_evaluations is not None and \
                self.num_evaluations >= self.max_evaluations:
            self.stopped_by = "evaluations"
            raise BudgetExhausted
        if reused is None and key not in self._prefetched and self.deadline is not None and \
                self.num_evaluations >= 1 and time.monotonic() >= self.deadline:
            # the float baseline always runs; a prefetched result started before the deadline
            self.stopped_by = "time"
            raise BudgetExhausted
        if reused is not None:
            record = reused
            if self.float_metric is None:  # the baseline: later trials are judged against it
                self.float_metric = record.metric
            logger.info("trial %d (%s): reused from the journal", record.index, label)
        else:
            record = self._run(plan, label)
        self._keep(record, key, fresh=reused is None)
        return record

    def _keep(self, record: TrialRecord, key: str, fresh: bool) -> None:
        self._cache[key] = record
        self.history.append(record)
        if fresh and self.on_record is not None:
            self.on_record(record)

    def measure(self, plan: QuantPlan, where: str) -> tuple[float, float]:
        """Evaluate `plan` once, uncached and unrecorded: ``(metric, seconds)``.

        Uses the workers' result when the plan was prefetched, else sends it to the workers
        alone; without workers it evaluates in this process through the adapter (its
        ``eval_timeout`` guard). The value is checked the same way on every path.
        """
        done = self._prefetched.pop(plan_key(plan), None)
        if done is None and self.pool is not None:
            box: dict[str, tuple[Any, float]] = {}
            self.pool.evaluate([(plan, where)], lambda _n, v, s: box.update(out=(v, s)))
            done = box["out"]
        if done is not None:
            value, seconds = done
            metric = self.evaluator.check(value, where)
        else:
            self.qmodel.apply_plan(plan)
            metric, seconds = self.evaluator.measure(self.qmodel.model, where)
        self.evaluator_seconds += seconds
        return metric, seconds

    def recheck_baseline(self, record: TrialRecord) -> None:
        """On resume, evaluate the float model again and compare with the journal's score.

        The live call re-establishes any state the evaluator takes from the first model it
        sees; a different score means the reused records would be judged against another
        reference, so the resume is refused (EvaluatorError) instead of changing the answer.
        The call is outside the trial budget, so a resumed run makes the same decisions.
        """
        metric, seconds = self.measure(record.plan, "in the resume check (the float model)")
        same = same_score(record.metric, metric)
        self.resume_check = {"checked": True, "same": same, "journal": record.metric,
                             "now": metric, "extra_evaluations": 1, "seconds": seconds}
        if not same:
            raise EvaluatorError(
                f"cannot resume: the float model scored {record.metric!r} in the journal and "
                f"{metric!r} now, so the journal's trials were judged against another "
                "reference; make the evaluator reproducible across runs (seed it, fix its "
                "data, do not keep state between runs) or start a fresh run without --resume"
            )

    def _run(self, plan: QuantPlan, label: str, index: int | None = None) -> TrialRecord:
        index = self.num_evaluations if index is None else index
        metric, seconds = self.measure(plan, f"in trial {index} ({label})")
        if self.float_metric is None:
            self.float_metric = metric
        passed, loss = self.evaluator.decide(self.float_metric, metric)
        record = TrialRecord(
            index=index, label=label, plan=dict(plan),
            fallback_layers=self.fallback_layers(plan), metric=metric, loss=loss,
            passed=passed, seconds=seconds,
        )
        logger.info(
            "trial %d (%s): metric %.6g, loss %.6g -> %s (%.2fs)",
            index, label, metric, loss, "pass" if passed else "fail", seconds,
        )
        return record


@dataclass
class SearchOutcome:
    """What the loop found: the status, the chosen record and the evaluation counts."""

    status: SearchStatus
    best: TrialRecord | None
    float_record: TrialRecord
    full_quant: TrialRecord | None
    reason: str
    closest: TrialRecord | None = None  # the lowest-loss failing plan, when none passed


def _compression_key(record: TrialRecord, quant: Mapping[str, str]) -> tuple:
    """Larger is better: more layers quantized, then fewer float layers, then lower loss."""
    at_quant = sum(record.plan[n] == quant[n] for n in record.plan)
    non_float = sum(s != FLOAT for s in record.plan.values())
    return (at_quant, non_float, -record.loss)


def trial_label(plan: QuantPlan, fallback: list[str]) -> str:
    """``all quantized``, or ``fallback k [id]`` with a short id of the plan, so two plans
    with as many fallbacks (a float layer, or one at a 16-bit rung) are told apart."""
    if not fallback:
        return "all quantized"
    digest = hashlib.sha1(plan_key(plan).encode()).hexdigest()[:6]
    return f"fallback {len(fallback)} [{digest}]"


def run_search(
    runner: TrialRunner,
    strategy: SearchStrategy,
    context: SearchContext,
    float_plan: QuantPlan,
    progress: Callable[..., None] | None = None,
) -> SearchOutcome:
    """Evaluate the float baseline, then drive `strategy` until it stops or the budget ends.

    `progress`, if given, is called as ``progress("search", "start", total=...)`` once and
    ``progress("search", "trial", record=..., reused=...)`` after every evaluation.
    """
    runner._ranking = list(context.ranking)
    strategy.setup(context)
    estimate = strategy.estimate()
    if progress is not None:
        total = None if estimate is None else 1 + estimate
        if runner.max_evaluations is not None:
            total = runner.max_evaluations if total is None else min(total,
                                                                     runner.max_evaluations)
        progress("search", "start", total=total)

    def evaluate(plan: QuantPlan, label: str) -> TrialRecord:
        before = len(runner.history)
        record = runner.evaluate(plan, label)
        if progress is not None and len(runner.history) > before:
            progress("search", "trial", record=record,
                     reused=plan_key(plan) in runner.preloaded)
        return record

    bound = f"at most {1 + estimate}" if estimate is not None else "an unknown number of"
    budget = f" (budget {runner.max_evaluations})" if runner.max_evaluations else ""
    logger.info(
        "search with %r over %d layers: %s evaluations including the float baseline%s",
        strategy.name or type(strategy).__name__, len(context.ranking), bound, budget,
    )
    float_record = evaluate(float_plan, "float")
    if plan_key(float_plan) in runner.preloaded and runner.resume_check is None:
        runner.recheck_baseline(float_record)
    if runner.check_determinism:  # one extra evaluation, outside the trial budget
        metric, seconds = runner.measure(float_plan, "in the determinism check (float again)")
        runner.determinism = determinism_record(float_record.metric, metric, seconds)
    status: SearchStatus | None = None
    visited: list[TrialRecord] = []  # records the strategy asked for (the baseline too, if so)
    while status is None:
        plans = strategy.ask()
        if not plans:
            break
        runner.prefetch(plans)
        for plan in plans:
            label = trial_label(plan, runner.fallback_layers(plan))
            try:
                record = evaluate(plan, label)
            except BudgetExhausted:
                status = "budget_exhausted"
                break
            visited.append(record)
            strategy.tell(plan, record)
    strategy.finish()
    return _outcome(runner, visited, status, context.quant_schemes, float_record)


def _outcome(runner: TrialRunner, visited: list[TrialRecord], status: SearchStatus | None,
             quant: Mapping[str, str], float_record: TrialRecord) -> SearchOutcome:
    """The status, the chosen record and the reason, from the records the strategy saw.

    The chosen record always passes: a passing quantized plan (the most compressed), else
    the float baseline (status ``float_only``, or ``budget_exhausted`` when the budget cut
    the search short), else none (``not_met``: even the float model fails the criterion).
    The lowest-loss failing quantized plan is reported as `closest`, never saved.
    """
    quantized = [r for r in visited if any(s != FLOAT for s in r.plan.values())]
    full = next((r for r in visited if not runner.fallback_layers(r.plan)), None)
    passing = [r for r in quantized if r.passed]
    failing = [r for r in quantized if not r.passed]
    closest = min(failing, key=lambda r: r.loss) if failing and not passing else None
    if passing:
        best: TrialRecord | None = max(passing, key=lambda r: _compression_key(r, quant))
        status = status or "met"
    elif float_record.passed:
        best = float_record
        status = status or "float_only"
    else:
        best = None
        status = status or "not_met"
    return SearchOutcome(status, best, float_record, full, _reason(runner, status), closest)


def _reason(runner: TrialRunner, status: SearchStatus) -> str:
    if status == "met":
        return "the loss is within the budget"
    if status == "float_only":
        reason = ("only the all-float plan met the loss budget: no layer could stay quantized "
                  "under this threshold (the result is the float model)")
        logger.warning(reason)
        return reason
    if status == "not_met":
        return ("no evaluated plan met the loss budget, not even the float model judged "
                "against itself (check the evaluator's metric_eval)")
    if runner.stopped_by == "time":
        return ("the wall-time budget (max_seconds) ran out before the strategy finished; the "
                "result is the best passing plan found so far")
    return (f"the evaluation budget ({runner.max_evaluations}) ran out before the strategy "
            "finished; the result is the best passing plan found so far")
