"""Held-out check, ranking audit (Spearman's rho) and effective bits in the report."""

from __future__ import annotations

import json

import pytest

import autoquant as aq
from autoquant.errors import ConfigError
from autoquant.search.testing import SyntheticEvaluator, linear_stack, ranking_from_drops
from autoquant.search.trust import significant_layers, spearman
from autoquant.sensitivity.ranking import LayerSensitivity

DROPS = {str(i): (i + 1) / 1024 for i in range(6)}




def run(evaluator, ranking=None, **kwargs):
    return aq.auto_quantize(
        linear_stack(len(DROPS)), evaluator, max_loss=10 / 1024,
        ranking=ranking if ranking is not None else ranking_from_drops(DROPS), **kwargs,
    )


def test_spearman_matches_known_values() -> None:
    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share ranks
    assert spearman([1, 1], [2, 3]) is None
    assert spearman([1], [1]) is None


def test_audit_of_a_perfect_ranking_gives_rho_one_and_counts_evaluations() -> None:
    plain = run(SyntheticEvaluator(DROPS))
    audited = run(SyntheticEvaluator(DROPS), audit=4)
    audit = audited.checks["audit"]
    assert [row["layer"] for row in audit["layers"]] == ["5", "4", "3", "2"]
    assert [row["loss"] for row in audit["layers"]] == [6 / 1024, 5 / 1024, 4 / 1024, 3 / 1024]
    assert audit["spearman_rho"] == pytest.approx(1.0) and audit["complete"]
    assert audited.num_evaluations == plain.num_evaluations + 4
    assert audited.plan == plain.plan  # the audit never changes the answer
    assert "Spearman rho 1" in audited.summary()


def test_audit_of_a_reversed_ranking_gives_rho_minus_one() -> None:
    # layer 0 ranked most sensitive (lowest score) although its drop is the smallest
    reversed_ranking = [LayerSensitivity(str(i), float(i), i, 1) for i in range(6)]
    result = run(SyntheticEvaluator(DROPS), ranking=reversed_ranking, audit=6)
    assert result.checks["audit"]["spearman_rho"] == pytest.approx(-1.0)


def test_audit_names_the_layers_that_lose_a_quarter_of_the_budget_with_their_places() -> None:
    # budget 10/1024: layers "2".."5" lose 3..6/1024 alone (>= 2.5/1024), "0" and "1" less
    perfect = run(SyntheticEvaluator(DROPS), audit=6).checks["audit"]
    assert [r["layer"] for r in perfect["significant"]] == ["5", "4", "3", "2"]
    assert [r["rank"] for r in perfect["significant"]] == [1, 2, 3, 4]
    assert perfect["significant_found"] == 4
    backwards = [LayerSensitivity(str(i), float(i), i, 1) for i in range(6)]
    result = run(SyntheticEvaluator(DROPS), ranking=backwards, audit=6)
    audit = result.checks["audit"]
    assert [r["rank"] for r in audit["significant"]] == [6, 5, 4, 3]
    assert audit["significant_found"] == 2  # "3" and "2" are within the first 4
    assert "4 lose(s) a quarter of the budget or more alone: 5 (ranked 6)" in result.summary()
    assert "2 of them ranked within the first 4" in result.summary()


def test_near_ties_below_the_floor_are_not_significant() -> None:
    rows = [{"layer": "a", "loss": 0.3}, {"layer": "b", "loss": 0.001},
            {"layer": "c", "loss": -0.002}, {"layer": "d", "loss": 0.002}]
    out = significant_layers(rows, ["d", "a", "c", "b"], budget=0.5)
    assert out["significant"] == [{"layer": "a", "loss": 0.3, "rank": 2}]
    assert out["significant_found"] == 0 and out["significant_floor"] == 0.125
    assert significant_layers(rows, ["a", "d", "c", "b"], 0.5)["significant_found"] == 1


def test_audit_stops_at_the_budget() -> None:
    result = run(SyntheticEvaluator(DROPS), audit=6, max_evaluations=7)
    assert result.num_evaluations == 7
    assert not result.checks["audit"]["complete"]
    with pytest.raises(ConfigError, match="audit"):
        run(SyntheticEvaluator(DROPS), audit=-1)
    with pytest.raises(ConfigError, match="holdout"):
        run(SyntheticEvaluator(DROPS), holdout="yes")


def test_holdout_check_reports_both_figures_and_catches_overfitting() -> None:
    ok = run(SyntheticEvaluator(DROPS))
    assert ok.checks["holdout"]["passed"] and ok.checks["holdout"]["float_metric"] == 1.0
    assert ok.checks["holdout"]["loss"] == ok.loss
    harder = run(SyntheticEvaluator(DROPS, holdout_factor=2.0))
    assert harder.met and harder.checks["holdout"]["loss"] == 2 * harder.loss
    assert not harder.checks["holdout"]["passed"]
    assert "held-out" in harder.summary() and "FAIL" in harder.summary()
    skipped = run(SyntheticEvaluator(DROPS), holdout=False)
    assert "holdout" not in skipped.checks


def test_holdout_required_without_the_method_is_a_config_error() -> None:
    class NoHoldout(SyntheticEvaluator):
        evaluate_holdout = None

    assert "holdout" not in run(NoHoldout(DROPS)).checks
    with pytest.raises(ConfigError, match="evaluate_holdout"):
        run(NoHoldout(DROPS), holdout=True)


def test_report_carries_checks_and_effective_bits(tmp_path) -> None:
    result = run(SyntheticEvaluator(DROPS), audit=2)
    result.save(tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["checks"]) == {"monotonicity", "idle_fallbacks", "audit", "holdout"}
    quantized = len(result.quantized_layers)
    expected = (quantized * 8 + (6 - quantized) * 32) / 6  # equal-size layers
    assert report["effective_bits"] == {"weights": expected, "activations": expected}
