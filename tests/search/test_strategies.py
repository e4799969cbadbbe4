"""Each strategy on synthetic evaluators with known optima: exact answers and counts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autoquant as aq
from autoquant.errors import ConfigError
from autoquant.report.render import check_lines
from autoquant.search.testing import (
    SyntheticEvaluator,
    linear_stack,
    optimal_fallbacks,
    ranking_from_drops,
)
from autoquant.sensitivity.ranking import LayerSensitivity
from autoquant.strategies._bisect import Bisection

N = 12
DROPS = {str(i): ((7 * i) % N + 1) / 1024 for i in range(N)}  # 1..12 / 1024, shuffled
BUDGET = 30 / 1024  # optimum: fall back the 5 largest drops (12..8), 28/1024 left


def run(strategy: str, drops=DROPS, max_loss=BUDGET, ranking=None, **kwargs):
    evaluator = SyntheticEvaluator(drops)
    result = aq.auto_quantize(
        linear_stack(len(drops)), evaluator, max_loss=max_loss, strategy=strategy,
        ranking=ranking if ranking is not None else ranking_from_drops(drops), **kwargs,
    )
    return result, evaluator


def named_ranking(order: list[str]) -> list[LayerSensitivity]:
    return [LayerSensitivity(n, float(i), i, 1) for i, n in enumerate(order)]


def test_binary_finds_the_optimum_in_six_evaluations() -> None:
    result, evaluator = run("binary")
    assert set(result.fallback_layers) == optimal_fallbacks(DROPS, BUDGET)
    assert len(result.fallback_layers) == 5
    # float, k=0 (fail), then k = 6 (pass), 3 (fail), 4 (fail), 5 (pass)
    assert [len(r.fallback_layers) for r in result.history] == [12, 0, 6, 3, 4, 5]
    assert evaluator.calls == result.num_evaluations == 6


def test_greedy_finds_the_same_optimum_one_layer_at_a_time() -> None:
    result, _ = run("greedy")
    assert set(result.fallback_layers) == optimal_fallbacks(DROPS, BUDGET)
    assert [len(r.fallback_layers) for r in result.history] == [12, 0, 1, 2, 3, 4, 5]


def test_an_all_int8_plan_as_good_as_float_reports_no_idle_fallbacks() -> None:
    # every layer harmless: k=0 passes at loss 0, the float baseline is k=N at loss 0;
    # that span is not "falling back every layer gained nothing": nothing fell back
    result, _ = run("binary", dict.fromkeys(map(str, range(6)), 0.0), 0.01)
    assert result.met and not result.fallback_layers and result.num_evaluations == 2
    assert result.checks["idle_fallbacks"] == []
    assert "did not lower the loss" not in result.summary()


def test_refinement_requantizes_layers_a_bad_ranking_sent_back() -> None:
    # the proxy puts two harmless layers (drop 0) first; binary must fall them back too
    drops = {**{str(i): 0.0 for i in range(4)}, **{str(i): 4 / 1024 for i in range(4, 8)}}
    order = ["0", "1", "4", "5", "6", "7", "2", "3"]
    plain, _ = run("binary", drops, 8 / 1024, named_ranking(order),
                   strategy_options={"notice": 0})
    refined, _ = run("binary", drops, 8 / 1024, named_ranking(order),
                     strategy_options={"refine": True})
    assert set(plain.fallback_layers) == {"0", "1", "4", "5"}
    assert set(refined.fallback_layers) == {"4", "5"}
    assert refined.met and refined.loss <= 8 / 1024
    # the bisection's prefixes k=0 and k=2 scored the same loss: the harmless "1" and "0"
    # are tried first, then "4" (it fails), one evaluation each; re-quantizing "5" already
    # failed (the prefix 0, 1, 4) and is not tried again
    assert refined.num_evaluations == plain.num_evaluations + 3
    assert [r.fallback_layers for r in refined.history[-3:]] == [
        ["0", "4", "5"], ["4", "5"], ["5"]]


def test_binary_notices_fallbacks_that_did_not_lower_the_loss_and_requantizes_them() -> None:
    drops = {**{str(i): 0.0 for i in range(4)}, **{str(i): 4 / 1024 for i in range(4, 8)}}
    order = ["0", "1", "4", "5", "6", "7", "2", "3"]  # the harmless 0 and 1 ranked worst
    ignored, _ = run("binary", drops, 8 / 1024, named_ranking(order),
                     strategy_options={"notice": 0})
    noticed, evaluator = run("binary", drops, 8 / 1024, named_ranking(order))
    # falling back 0 and 1 (k=0 -> k=2) left the loss at 16/1024: two evaluations re-quantize
    # them, and the search keeps the optimum of 6/8 within the bound ceil(log2 9) + 4
    assert set(ignored.fallback_layers) == {"0", "1", "4", "5"}
    assert set(noticed.fallback_layers) == {"4", "5"} and noticed.met
    assert noticed.num_evaluations == ignored.num_evaluations + 2 == evaluator.calls
    assert noticed.num_evaluations <= 4 + 4
    # the report says where the ranking misled
    assert noticed.checks["idle_fallbacks"] == [
        {"layers": ["0", "1"], "from_k": 0, "to_k": 2, "loss_from": 16 / 1024,
         "loss_to": 16 / 1024}]
    lines = check_lines({"checks": noticed.checks, "settings": {}})
    assert any(line.startswith("Falling back 0, 1 (k 0 to 2) did not lower the loss")
               for line in lines), lines
    # a ranking the losses never contradict costs nothing extra
    exact, _ = run("binary")
    assert exact.num_evaluations == 6


def _with_local(order: list[str], local_order: list[str]) -> list[LayerSensitivity]:
    """A ranking with a second opinion: `local_order` ranks the layers most sensitive first."""
    local = {n: float(i) for i, n in enumerate(local_order)}
    return [LayerSensitivity(n, float(i), i, 1, local=local[n]) for i, n in enumerate(order)]


def test_binary_requantizes_a_fallback_its_second_opinion_disputes() -> None:
    # the ranking puts the harmless "0" first, but every span of the bisection still lowers
    # the loss (no idle fallback); each layer's own output error ranks "0" least sensitive
    drops = {"0": 0.0, **{str(i): 4 / 1024 for i in (4, 5, 6)},
             **{str(i): 1 / 1024 for i in (1, 2, 3, 7)}}
    order = ["0", "4", "5", "6", "1", "2", "3", "7"]
    local = ["4", "5", "6", "1", "2", "3", "7", "0"]
    plain, _ = run("binary", drops, 8 / 1024, named_ranking(order))
    assert set(plain.fallback_layers) == {"0", "4", "5"} and not plain.checks["idle_fallbacks"]
    assert "disputed_fallbacks" not in plain.checks  # no second opinion, no dispute
    disputed, evaluator = run("binary", drops, 8 / 1024, _with_local(order, local))
    assert set(disputed.fallback_layers) == {"4", "5"} and disputed.met
    # re-quantizing "0" passes, which earns one more try ("5"), which fails: two in all
    assert disputed.num_evaluations == plain.num_evaluations + 2 == evaluator.calls
    assert disputed.num_evaluations <= 4 + 4
    assert disputed.checks["disputed_fallbacks"] == []  # "0" is quantized again
    # second opinions that agree with the ranking cost nothing
    agreed, _ = run("binary", drops, 8 / 1024, _with_local(order, order))
    assert agreed.num_evaluations == plain.num_evaluations
    # two workers at a time reach the same plan
    with ThreadPoolExecutor(2) as pool:
        wide, _ = run("binary", drops, 8 / 1024, _with_local(order, local), executor=pool,
                      workers=2)
    assert wide.plan == disputed.plan


def test_a_wrong_second_opinion_costs_one_evaluation_and_is_reported() -> None:
    drops = {str(i): (4 if i < 2 else 1) / 1024 for i in range(8)}
    order = [str(i) for i in range(8)]
    ranking = _with_local(order, order[1:] + ["0"])  # "0" least sensitive by its own output
    plain, _ = run("binary", drops, 8 / 1024, ranking, strategy_options={"notice": 0})
    result, evaluator = run("binary", drops, 8 / 1024, ranking)
    assert result.fallback_layers == plain.fallback_layers == ["0", "1"] and result.met
    # re-quantizing "0" fails: no second evaluation for the dispute
    assert result.num_evaluations == plain.num_evaluations + 1 == evaluator.calls
    assert result.checks["disputed_fallbacks"] == [{"layer": "0", "rank": 0, "local_rank": 7}]
    lines = check_lines({"checks": result.checks, "settings": {}})
    assert any(line.startswith("0 fell back, but its own output error ranks it 8 (the "
                               "ranking: 1; 1 = most sensitive)") for line in lines), lines
    assert "disputed fallbacks: 0" in result.summary()


def test_refinement_budget_caps_the_extra_evaluations() -> None:
    plain, _ = run("binary")
    capped, _ = run("binary", strategy_options={"refine": 2})  # the k=4 prefix is free
    assert capped.num_evaluations == plain.num_evaluations + 2


@settings(max_examples=25, deadline=None)
@given(
    drops=st.lists(st.integers(-2, 8), min_size=3, max_size=7),
    order_seed=st.randoms(use_true_random=False),
    budget=st.integers(0, 20),
)
def test_refinement_is_never_worse_than_binary(drops, order_seed, budget) -> None:
    named = {str(i): d / 1024 for i, d in enumerate(drops)}
    order = list(named)
    order_seed.shuffle(order)
    plain, _ = run("binary", named, budget / 1024, named_ranking(order))
    refined, _ = run("binary", named, budget / 1024, named_ranking(order),
                     strategy_options={"refine": True})
    assert refined.met >= plain.met  # refinement only ever adds passing plans
    if plain.met:
        assert refined.loss <= budget / 1024
        assert set(refined.fallback_layers) <= set(plain.fallback_layers)


def test_binary_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="refine"):
        run("binary", strategy_options={"refine": -1})
    with pytest.raises(ConfigError, match="strategy_options"):
        run("binary", strategy_options={"refnie": True})
    with pytest.raises(ConfigError, match="notice must be an int >= 0"):
        run("binary", strategy_options={"notice": -1})


def test_bisection_points_split_the_range_evenly() -> None:
    assert Bisection(0, 13).points(1) == [6]
    assert Bisection(0, 13).points(3) == [3, 6, 9]
    assert Bisection(4, 6).points(4) == [5]
    assert Bisection(4, 5).points(2) == []
    search = Bisection(0, 13)
    for k, ok in ((3, False), (6, True), (9, False)):
        search.update(k, ok)
    assert (search.lo, search.hi, search.violations) == (3, 6, [(6, 9)])


def test_non_monotone_outcome_is_detected_and_refined() -> None:
    # ranking A..F; falling back B hurts (quantizing it helps): pass at k=1, fail at k=2
    drops = {"0": 8 / 1024, "1": -6 / 1024, "2": 5 / 1024, "3": 1 / 1024, "4": 1 / 1024,
             "5": 1 / 1024}
    ranking = named_ranking(list(drops))
    plain, _ = run("binary", drops, 4 / 1024, ranking)
    assert plain.checks["monotonicity"] == []  # plain bisection never probes k=2
    checked, _ = run("binary", drops, 4 / 1024, ranking, strategy_options={"verify": True})
    assert checked.checks["monotonicity"] == [{"pass_at": 1, "fail_at": 2}]
    assert checked.fallback_layers == ["0"] and checked.met
    # verify probed k=2 (fail), refinement then retried the single fallback (k=0, cached)
    assert [len(r.fallback_layers) for r in checked.history] == [6, 0, 3, 1, 2]


def test_ladder_puts_only_the_most_sensitive_layers_in_float() -> None:
    result, _ = run("ladder", strategy_options={"ladder": [16]})
    order = [r.name for r in ranking_from_drops(DROPS)]
    # 5 layers leave int8; int16 costs a quarter of the drop: 4 float + 1 int16 fits 30/1024
    assert [result.plan[n] for n in order[:6]] == ["float"] * 4 + ["w16a16", "w8a8"]
    assert all(result.plan[n] == "w8a8" for n in order[5:])
    assert result.loss == BUDGET
    assert set(result.plan.values()) <= {"w8a8", "w16a16", "float"}
    bits = result.effective_bits
    assert bits["weights"] == pytest.approx((4 * 32 + 16 + 7 * 8) / 12)
    assert bits["activations"] == pytest.approx((4 * 32 + 16 + 7 * 8) / 12)
    assert result.to_report()["effective_bits"] == bits


def test_ladder_with_two_rungs_and_an_empty_ladder() -> None:
    result, _ = run("ladder", strategy_options={"ladder": [12, 16]})
    assert set(result.plan.values()) <= {"w8a8", "w12a12", "w16a16", "float"}
    assert result.met and len(result.fallback_layers) == 5
    plain, _ = run("ladder", strategy_options={"ladder": []})
    binary, _ = run("binary")
    assert plain.plan == binary.plan
    with pytest.raises(ConfigError, match="ascending"):
        run("ladder", strategy_options={"ladder": [16, 12]})


def test_unknown_strategy_lists_the_new_ones() -> None:
    with pytest.raises(ConfigError, match="greedy.*ladder.*optuna"):
        run("grady")
