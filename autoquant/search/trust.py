"""Trust checks on a finished search: held-out re-check, ranking audit, monotonicity.

- **Held-out check**: if the evaluator offers ``evaluate_holdout(model)``, the float model
  and the chosen plan are both measured on it, so a plan that only passes on the search
  data (overfitting the threshold) shows up as a held-out loss above the budget. These calls
  are not search evaluations and are not counted in ``num_evaluations``.
- **Ranking audit** (``audit=M``): each of the M worst-ranked layers is evaluated *alone
  quantized* (every other searchable layer float), so the measured loss is that layer's own
  drop, the quantity the proxy score predicts. Spearman's rho is computed between the
  proxy's sensitivity (``-score``) and the measured loss: +1 means the proxy ordered those
  layers exactly as the evaluator does, 0 no relation, -1 reversed. Rho weighs every pair
  alike, so where most single-layer losses are far below the budget (near-ties that the
  metric's own noise orders) it says little about the search; the audit also names the
  *significant* layers, those that lose at least a quarter of the budget alone
  (`SIGNIFICANT_SHARE`), with their places in the ranking: a bisection needs those first.
  The audit's evaluations go through the trial runner (cache, budget, journal) and count
  in ``num_evaluations``.
- **Monotonicity**: the prefix searches assume that falling back more of the ranking never
  hurts. Every evaluated prefix plan (the k worst-ranked layers fallen back) is checked for
  a pass at k and a fail at some k' > k; each such pair is reported.
- **Idle fallbacks**: between two consecutive evaluated prefixes k < k', falling back the
  layers ranked k..k'-1 should lower the loss; each span where it did not is reported (the
  ranking put first layers the evaluator finds harmless; `binary` re-quantizes them first).
- **Disputed fallbacks**: a ranking measured at the model's output (the gradient scope)
  comes with a second opinion from the same pass, each layer's own output error. A
  fallen-back layer that this second opinion does not rank among its as many most
  sensitive layers as fell back is disputed: the two measures disagree about it, and
  `binary` tries re-quantizing such layers before it answers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from autoquant.errors import ConfigError
from autoquant.evaluation.adapter import EvaluatorAdapter
from autoquant.plan import FLOAT, QuantPlan
from autoquant.quant.qmodel import QuantModel
from autoquant.search.loop import BudgetExhausted, TrialRunner
from autoquant.search.strategy import SearchContext, TrialRecord
from autoquant.sensitivity.ranking import spearman

__all__ = [
    "check_trust_args",
    "spearman",
    "holdout_check",
    "ranking_audit",
    "significant_layers",
    "significant_text",
    "SIGNIFICANT_SHARE",
    "monotonicity_violations",
    "idle_fallbacks",
    "prefix_spans",
    "local_ranks",
    "disputed_fallbacks",
]

logger = logging.getLogger(__name__)

SIGNIFICANT_SHARE = 0.25  # a layer losing this share of the budget alone is significant


def check_trust_args(holdout: Any, audit: Any) -> None:
    """Validate the `holdout` and `audit` arguments of `auto_quantize` before any work."""
    if holdout is not None and not isinstance(holdout, bool):
        raise ConfigError(f"holdout must be None, True or False, got {holdout!r}")
    if isinstance(audit, bool) or not isinstance(audit, int) or audit < 0:
        raise ConfigError(f"audit must be an int >= 0 (layers to audit), got {audit!r}")


def holdout_check(qmodel: QuantModel, evaluator: EvaluatorAdapter, plan: QuantPlan,
                  float_plan: QuantPlan, required: bool | None) -> dict[str, Any] | None:
    """Measure the float model and `plan` with ``evaluator.evaluate_holdout``.

    Args:
        required: True raises ConfigError if the evaluator has no ``evaluate_holdout``;
            None runs the check only if it has one; False skips it.

    Returns:
        ``{"float_metric", "metric", "loss", "passed"}`` or None when skipped.
    """
    if required is False:
        return None
    if not evaluator.has_holdout:
        if required:
            raise ConfigError(
                f"holdout=True needs {evaluator.name}.evaluate_holdout(model) -> "
                "float (the metric on data the search never saw); add it or pass "
                "holdout=None"
            )
        return None
    where = "(held-out check)"
    qmodel.apply_plan(float_plan)
    ref = evaluator.measure_holdout(qmodel.model, where)
    qmodel.apply_plan(plan)
    new = evaluator.measure_holdout(qmodel.model, where)
    passed, loss = evaluator.decide(ref, new)
    if not passed:
        logger.warning(
            "held-out check failed: the chosen plan loses %.6g on the held-out data (float "
            "%.6g, quantized %.6g) although it passed on the search data", loss, ref, new,
        )
    return {"float_metric": ref, "metric": new, "loss": loss, "passed": bool(passed)}


def ranking_audit(runner: TrialRunner, context: SearchContext, count: int,
                  budget: float | None = None) -> dict[str, Any]:
    """Evaluate the `count` worst-ranked layers each alone quantized; Spearman's rho of the
    proxy sensitivity (``-score``) against the measured loss.

    With the loss `budget` (``max_loss``), also the significant layers
    (`significant_layers`). Stops early (``"complete": False``) if the
    evaluation budget runs out.
    """
    check_trust_args(None, count)
    rows: list[dict[str, Any]] = []
    complete = True
    plans = []
    for name in context.ranking[:count]:
        plan = dict.fromkeys(context.ranking, FLOAT)
        plan[name] = context.quant_schemes[name]
        plans.append(plan)
    runner.prefetch(plans)  # concurrent with workers > 1; a no-op otherwise
    for name, plan in zip(context.ranking[:count], plans, strict=True):
        try:
            record = runner.evaluate(plan, f"audit {name}")
        except BudgetExhausted:
            complete = False
            logger.warning("the ranking audit stopped after %d layer(s): budget exhausted",
                           len(rows))
            break
        rows.append({"layer": name, "score": context.scores[name], "loss": record.loss})
    rho = spearman([-r["score"] for r in rows], [r["loss"] for r in rows])
    logger.info("ranking audit of %d layer(s): Spearman rho %s", len(rows),
                "n/a" if rho is None else f"{rho:.3f}")
    out: dict[str, Any] = {"layers": rows, "spearman_rho": rho, "complete": complete}
    if budget is not None and budget > 0:
        out.update(significant_layers(rows, list(context.ranking), budget))
    return out


def significant_layers(rows: Sequence[Mapping[str, Any]], ranking: Sequence[str],
                       budget: float) -> dict[str, Any]:
    """The audited layers that lose at least ``SIGNIFICANT_SHARE * budget`` alone, most
    harmful first, each with its 1-based place in `ranking`; and how many of those s layers
    the ranking puts among its first s (all of them: the bisection meets them first).

    Example:
        >>> rows = [{"layer": "a", "loss": 0.0}, {"layer": "b", "loss": 0.5}]
        >>> significant_layers(rows, ["a", "b"], 1.0)["significant_found"]
        0
    """
    floor = SIGNIFICANT_SHARE * budget
    hits = sorted((r for r in rows if r["loss"] >= floor), key=lambda r: -r["loss"])
    places = {name: i + 1 for i, name in enumerate(ranking)}
    found = sum(1 for r in hits if places[r["layer"]] <= len(hits))
    return {"significant": [{"layer": r["layer"], "loss": r["loss"],
                             "rank": places[r["layer"]]} for r in hits],
            "significant_floor": floor, "significant_found": found}


def significant_text(audit: Mapping[str, Any]) -> str:
    """The audit's significant layers in words, for the summary and the report ("" when the
    audit has no budget to judge by)."""
    rows = audit.get("significant")
    if rows is None:
        return ""
    if not rows:
        return "; no layer loses a quarter of the budget alone"
    shown = ", ".join(f"{r['layer']} (ranked {r['rank']})" for r in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return (f"; {len(rows)} lose(s) a quarter of the budget or more alone: {shown}{more}, "
            f"{audit['significant_found']} of them ranked within the first {len(rows)}")


def _prefixes(records: Sequence[TrialRecord], context: SearchContext
              ) -> dict[int, TrialRecord]:
    """The records whose plan is exactly ``context.plan(fallback=ranking[:k])`` (the k
    worst-ranked layers at their fallback), by k."""
    ranking = list(context.ranking)
    out = {}
    for record in records:
        back = [n for n in ranking if record.plan.get(n, FLOAT) != context.quant_schemes[n]]
        k = len(back)
        if record.plan == context.plan(fallback=ranking[:k]):
            out.setdefault(k, record)
    return out


def prefix_spans(losses: Mapping[int, float]) -> list[tuple[int, int]]:
    """Consecutive pairs (k, k') of the evaluated prefixes whose loss is finite: the spans
    ``ranking[k:k']`` whose fallback the loss difference measures."""
    ks = sorted(k for k, loss in losses.items() if math.isfinite(loss))
    return list(zip(ks, ks[1:], strict=False))


def idle_fallbacks(records: Sequence[TrialRecord], context: SearchContext
                   ) -> list[dict[str, Any]]:
    """Spans between consecutive evaluated prefixes k < k' whose loss did not drop: falling
    back ``ranking[k:k']`` gained nothing the evaluator could measure. A span from a loss
    of 0 or less is not one: there was no loss to lower (an all-INT8 plan as good as
    float is not a sign that every layer is harmless to fall back)."""
    losses = {k: r.loss for k, r in _prefixes(records, context).items()}
    out = [{"layers": list(context.ranking[lo:hi]), "from_k": lo, "to_k": hi,
            "loss_from": losses[lo], "loss_to": losses[hi]}
           for lo, hi in prefix_spans(losses) if losses[hi] >= losses[lo] > 0]
    if out:
        logger.info("falling back %s did not lower the loss: the ranking put layers first "
                    "that the evaluator finds harmless",
                    "; ".join(", ".join(v["layers"]) for v in out[:3]))
    return out


def monotonicity_violations(records: Sequence[TrialRecord], context: SearchContext
                            ) -> list[dict[str, Any]]:
    """Pairs (pass at k, fail at k' > k) among the records whose plan is exactly
    ``context.plan(fallback=ranking[:k])`` (the k worst-ranked layers at their fallback)."""
    prefixes = _prefixes(records, context)
    passes = {k for k, r in prefixes.items() if r.passed}
    fails = {k for k, r in prefixes.items() if not r.passed}
    out = []
    for k in sorted(passes):
        for k2 in sorted(fails):
            if k2 > k:
                out.append({"pass_at": k, "fail_at": k2})
    if out:
        logger.warning(
            "pass/fail is not monotone in the number of fallbacks: %s; the ranking does not "
            "order the layers the way the evaluator does (refinement repairs the plan)",
            ", ".join(f"pass at {v['pass_at']}, fail at {v['fail_at']}" for v in out[:5]),
        )
    return out


def local_ranks(context: SearchContext) -> dict[str, int]:
    """Each layer's rank by the second opinion (``context.local_scores``, 0 = most
    sensitive; ties in ranking order); empty unless every searchable layer has a score."""
    if not context.ranking or any(n not in context.local_scores for n in context.ranking):
        return {}
    order = sorted(context.ranking, key=lambda n: context.local_scores[n])  # stable
    return {name: rank for rank, name in enumerate(order)}


def disputed_fallbacks(context: SearchContext, fallback: Sequence[str]
                       ) -> list[dict[str, Any]]:
    """The `fallback` layers that the second opinion does not rank among its
    ``len(fallback)`` most sensitive: ``{"layer", "rank", "local_rank"}`` each."""
    local = local_ranks(context)
    if not local:
        return []
    rank = {name: i for i, name in enumerate(context.ranking)}
    return [{"layer": n, "rank": rank[n], "local_rank": local[n]}
            for n in fallback if local[n] >= len(fallback)]
