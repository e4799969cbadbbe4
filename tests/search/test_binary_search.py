"""The binary strategy on evaluators with known answers: exact k, evaluation bound, cache."""

from __future__ import annotations

import logging
import math

import pytest

import autoquant as aq
from autoquant.sensitivity.ranking import LayerSensitivity
from tests.helpers.synthetic import DropEvaluator, ListEvaluator, linear_names, mlp

N = 13


def fixed_ranking(names):
    return [LayerSensitivity(n, 0.5 + i / 100, i, 1) for i, n in enumerate(names)]


def drops_for_exact_k(names, k_star, max_loss=0.1):
    """Drops such that falling back the first k layers passes iff k >= k_star."""
    drops = dict.fromkeys(names, 0.0)
    # the layers at ranks < k_star each cost more than the budget; the rest cost nothing
    for name in names[:k_star]:
        drops[name] = max_loss * 2
    return drops


def test_before_answering_float_only_binary_tries_single_layers_the_ranking_misplaced():
    names = linear_names(4)
    # the ranking puts the harmless layer 2 among the most sensitive: every prefix fails
    drops = {names[0]: 0.5, names[1]: 0.5, names[2]: 0.001, names[3]: 0.5}
    ranking = fixed_ranking([names[0], names[2], names[1], names[3]])
    result = aq.auto_quantize(mlp(4), DropEvaluator(drops), max_loss=0.1, ranking=ranking)
    assert (result.status, result.quantized_layers) == ("met", [names[2]])
    plain = aq.auto_quantize(mlp(4), DropEvaluator(drops), max_loss=0.1, ranking=ranking,
                             strategy_options={"rescue": 0})
    assert (plain.status, plain.quantized_layers) == ("float_only", [])
    # the rescue spent at most 3 evaluations, the least sensitive layer alone was known
    assert result.num_evaluations - plain.num_evaluations <= 3


class InteractingDrops(DropEvaluator):
    """`DropEvaluator` plus a drop for each pair of `pairs` quantized together (negative:
    the pair costs less together than apart), as real layers interact."""

    def __init__(self, drops, pairs):
        super().__init__(drops)
        self.pairs = pairs

    def evaluate(self, model):
        metric = super().evaluate(model)
        quantized = self.seen[-1]
        return metric - sum(v for (a, b), v in self.pairs.items() if {a, b} <= quantized)


def test_rescue_does_not_trust_span_gains_measured_beside_interacting_layers():
    r = linear_names(8)  # ranked in this order; r[0], r[4] and r[5] pass alone
    drops = dict(zip(r, [0.03, 0.13, 0.18, 0.11, 0.04, 0.08, 0.11, 0.11], strict=True))
    # r[4] and r[5] together cost 0.1 more than apart (their span's gain per layer is over
    # the budget); r[6] costs little beside r[7] (its span gained the least), r[1] beside r[2]
    pairs = {(r[4], r[5]): 0.10, (r[6], r[7]): -0.07, (r[1], r[2]): -0.21}
    result = aq.auto_quantize(mlp(8), InteractingDrops(drops, pairs), max_loss=0.1,
                              ranking=fixed_ranking(r))
    # every prefix fails; the loss gained per layer alone would try r[6], r[3], r[2]: all fail
    assert result.status == "met" and result.quantized_layers == [r[5]]
    assert result.num_evaluations <= 1 + math.ceil(math.log2(9)) + 4


@pytest.mark.parametrize("k_star", list(range(N + 1)))
def test_binary_finds_the_exact_k_within_the_log_bound(k_star):
    names = linear_names(N)
    ev = DropEvaluator(drops_for_exact_k(names, k_star))
    result = aq.auto_quantize(mlp(N), ev, max_loss=0.1, ranking=fixed_ranking(names))
    # every layer falling back is the float model: its own status, not "met"
    assert (result.status, result.met) == (("met", True) if k_star < N else ("float_only", False))
    assert result.fallback_layers == names[:k_star]
    assert len(result.quantized_layers) == N - k_star
    # + up to 3 single layers re-quantized before answering "float only" (the rescue)
    bound = math.ceil(math.log2(N + 1)) + 2 + (3 if k_star == N else 0)
    assert result.num_evaluations <= bound
    assert ev.calls == result.num_evaluations
    assert len(set(ev.seen)) == len(ev.seen)  # never the same plan twice
    # the chosen plan was evaluated and passed: no extrapolated answer
    chosen = [r for r in result.history if r.plan == result.plan]
    assert len(chosen) == 1 and chosen[0].passed


def test_full_quant_pass_stops_after_two_evaluations():
    names = linear_names(5)
    ev = DropEvaluator(dict.fromkeys(names, 0.001))
    result = aq.auto_quantize(mlp(5), ev, max_loss=0.01)
    assert result.num_evaluations == 2 and result.fallback_layers == []
    assert result.quant_metric == pytest.approx(0.995)


def test_cost_estimate_is_logged_before_the_search(caplog):
    names = linear_names(6)
    with caplog.at_level(logging.INFO, logger="autoquant"):
        aq.auto_quantize(mlp(6), DropEvaluator(drops_for_exact_k(names, 3)), max_loss=0.1,
                         ranking=fixed_ranking(names))
    # float + all quantized + 3 bisection rounds, + 3 rescue tries if only float passed
    assert any("at most 8 evaluations" in r.getMessage() for r in caplog.records)


def test_budget_exhausted_returns_the_best_plan_so_far():
    names = linear_names(N)
    ev = DropEvaluator(drops_for_exact_k(names, 9))
    result = aq.auto_quantize(mlp(N), ev, max_loss=0.1, ranking=fixed_ranking(names),
                              max_evaluations=3)
    assert result.status == "budget_exhausted" and ev.calls == 3
    # float, all-quantized (fail), k=7 (fail): only the float plan passed, so the saved
    # result is the float plan; the lowest-loss failing plan is reported, never saved
    assert not result.met and result.loss == 0.0 and result.quantized_layers == []
    assert [r.passed for r in result.history if r.plan == result.plan] == [True]
    assert result.closest is not None and not result.closest.passed
    assert result.closest.loss == min(r.loss for r in result.history[1:])
    assert "budget" in result.reason


def test_budget_exhausted_after_a_pass_keeps_the_passing_plan():
    names = linear_names(N)
    ev = DropEvaluator(drops_for_exact_k(names, 3))
    result = aq.auto_quantize(mlp(N), ev, max_loss=0.1, ranking=fixed_ranking(names),
                              max_evaluations=3)
    assert result.status == "budget_exhausted" and result.met
    assert result.fallback_layers == names[:7]  # the first split point, k=7, passed


def test_all_fallback_failing_returns_the_float_model_as_float_only():
    # a drifting evaluator: every call after the float baseline scores lower, so even the
    # all-fallback plan (16-bit here: a real evaluation, not the cached baseline) fails
    ev = ListEvaluator([1.0, 0.5, 0.4, 0.3, 0.2, 0.1])
    result = aq.auto_quantize(mlp(4), ev, max_loss=0.01,
                              config={"default": {"fallback": 16}})
    assert result.status == "float_only" and not result.met
    assert result.quantized_layers == [] and result.loss == 0.0
    assert result.model is not None and result.plan


def test_float_model_failing_its_own_criterion_is_not_met():
    class Never(DropEvaluator):
        def metric_eval(self, original, new):
            return False, 1.0

    names = linear_names(3)
    result = aq.auto_quantize(mlp(3), Never(dict.fromkeys(names, 0.0)), max_loss=0.01)
    assert result.status == "not_met" and not result.met
    assert not any(r.passed for r in result.history)
    assert "no evaluated plan met" in result.reason


def test_all_float_plan_is_reused_from_the_baseline_not_re_evaluated():
    names = linear_names(3)
    ev = DropEvaluator(dict.fromkeys(names, 1.0))
    result = aq.auto_quantize(mlp(3), ev, max_loss=0.01, ranking=fixed_ranking(names))
    assert result.status == "float_only" and result.quantized_layers == []
    assert ev.calls == result.num_evaluations == len({frozenset(s) for s in ev.seen})
    assert "only the all-float plan" in result.reason


def test_lower_is_better_metric_with_relative_loss():
    names = linear_names(6)

    class Perplexity(DropEvaluator):
        higher_is_better = False

        def evaluate(self, model):
            return 10.0 / super().evaluate(model)  # quantizing raises the "perplexity"

    drops = dict.fromkeys(names, 0.0)
    drops[names[0]] = 0.5
    result = aq.auto_quantize(mlp(6), Perplexity(drops), max_loss=0.05, loss_type="relative",
                              ranking=fixed_ranking(names))
    assert result.fallback_layers == [names[0]] and result.loss == pytest.approx(0.0)


def test_sixteen_bit_fallback_is_the_fallback_scheme():
    names = linear_names(4)
    ev = DropEvaluator(drops_for_exact_k(names, 2))
    result = aq.auto_quantize(mlp(4), ev, max_loss=0.1, ranking=fixed_ranking(names),
                              config={"default": {"fallback": 16}})
    assert result.plan[names[0]] == "w16a16" and result.plan[names[2]] == "w8a8"
    assert result.fallback_layers == names[:2]
    assert set(result.quantized_layers) == set(names)
    assert result.config.layer_config(names[0]).scheme == "w16a16"
