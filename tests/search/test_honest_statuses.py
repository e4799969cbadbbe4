"""What a search reports and saves is honest: the float model is its own status, the saved
plan always passes, the result model is in eval mode, and ladder counts add up."""

from __future__ import annotations

import torch
from torch import nn

import autoquant as aq
from autoquant.evaluators import Evaluator
from autoquant.quant.layers import QuantLayer
from autoquant.search.loop import trial_label
from tests.helpers.synthetic import DropEvaluator, linear_names, mlp


def fixed_ranking(names):
    return [aq.LayerSensitivity(n, 0.5 + i / 100, i, 1) for i, n in enumerate(names)]


def test_only_the_float_plan_passing_is_float_only_not_met():
    names = linear_names(3)
    result = aq.auto_quantize(mlp(3), DropEvaluator(dict.fromkeys(names, 0.5)), max_loss=0.01)
    assert (result.status, result.met) == ("float_only", False)
    assert result.quantized_layers == [] and result.loss == 0.0
    assert "no layer could stay quantized" in result.reason
    assert "layers quantized: 0/3;" in result.summary()


def test_relative_loss_on_a_zero_baseline_is_float_only():
    class ZeroBaseline(DropEvaluator):
        def evaluate(self, model):
            return super().evaluate(model) - 1.0  # float scores 0.0 exactly

    names = linear_names(3)
    result = aq.auto_quantize(mlp(3), ZeroBaseline(dict.fromkeys(names, 0.5)),
                              max_loss=0.01, loss_type="relative")
    assert (result.status, result.met) == ("float_only", False)


def test_budget_exhausted_saves_the_passing_float_plan_and_reports_the_closest_failure():
    names = linear_names(4)
    drops = dict.fromkeys(names, 0.07)
    result = aq.auto_quantize(mlp(4), DropEvaluator(drops), max_loss=0.02,
                              max_evaluations=2, ranking=fixed_ranking(names))
    assert result.status == "budget_exhausted" and not result.met
    assert result.loss == 0.0 and result.quantized_layers == []  # the float plan passed
    assert result.closest is not None and not result.closest.passed
    assert result.closest.loss > 0.02


def test_result_model_is_in_eval_mode_even_if_the_evaluator_trained_it():
    class Trains(DropEvaluator):
        def evaluate(self, model):
            model.train()
            return super().evaluate(model)

    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8)).eval()
    result = aq.auto_quantize(model, Trains({}), max_loss=0.5)
    assert not any(m.training for m in result.model.modules())
    x = torch.randn(4, 8)
    assert torch.equal(result.model(x), result.model(x))  # dropout is off


class ScoresPlan(Evaluator):
    """metric = 1 - 0.01 per layer at int8 - 0.001 per layer at int16."""

    def __init__(self):
        self.x = torch.randn(16, 8)

    def calibration(self, model):
        model(self.x)

    def evaluate(self, model):
        cost = {"w8a8": 0.01, "w16a16": 0.001}
        return 1.0 - sum(cost.get(m.scheme, 0.0) for m in model.modules()
                         if isinstance(m, QuantLayer))


def test_ladder_counts_each_layer_once_and_labels_differ_per_plan():
    names = linear_names(6)
    result = aq.auto_quantize(mlp(6), ScoresPlan(), max_loss=0.025, strategy="ladder",
                              ranking=fixed_ranking(names))
    line = next(ln for ln in result.summary().splitlines() if ln.startswith("layers"))
    assert line.startswith("layers quantized: 6/6 (")  # every layer, once, with its scheme
    assert "W16A16" in line and "W8A8" in line
    labels = [r.label for r in result.history]
    assert len(labels) == len(set(labels))  # one label per plan


def test_trial_labels_tell_apart_plans_with_as_many_fallbacks():
    a = {"0": "float", "1": "w8a8"}
    b = {"0": "w8a8", "1": "float"}
    assert trial_label(a, ["0"]) != trial_label(b, ["1"])
    assert trial_label(a, ["0"]).startswith("fallback 1 [")
    assert trial_label(a, []) == "all quantized"


def test_a_layer_the_calibration_never_runs_is_named_as_not_searched():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.unused, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = Unused().eval()
    batches = [torch.randn(6, 4) for _ in range(2)]
    result = aq.auto_quantize(model, aq.FidelityEvaluator(model, batches), max_loss=0.01)
    assert result.skipped_layers == ["unused"] and result.plan.get("unused", "float") == "float"
    assert "layers quantized: 2/3 (2 W8A8); fell back: none; not searched (skip_layers, or " \
           "never ran in calibration): unused" in result.summary()
