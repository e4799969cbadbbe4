"""Output-level sensitivity: each layer quantized alone and scored at the model's output,
so a layer whose error the model absorbs is not mistaken for a sensitive one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.errors import ConfigError
from tests.helpers.absorbing import CONFIG, Absorbing, Counting


@pytest.fixture
def model_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Absorbing().eval(), [torch.randn(32, 16) for _ in range(4)]


def test_output_scope_ranks_the_layer_whose_error_reaches_the_output_first(model_and_batches):
    model, batches = model_and_batches
    local = aq.sensitivity_analysis(model, calibration_data=batches, config=CONFIG,
                                    sensitivity_scope="layer")
    output = aq.sensitivity_analysis(model, calibration_data=batches, config=CONFIG,
                                     sensitivity_scope="output")
    assert local[0].name == "noisy"  # the coarse layer looks worst on its own output
    assert [r.name for r in output][-1] == "noisy"  # ... and barely moves the model's
    assert output[0].name == "big" and output[-1].score > 0.99999
    assert [r.calls for r in output] == [4, 4, 4]  # one call per calibration batch


def test_the_search_keeps_the_absorbed_layer_quantized_in_as_many_evaluations(
        model_and_batches):
    model, batches = model_and_batches
    evaluator = aq.FidelityEvaluator(model, batches)
    local = aq.auto_quantize(model, evaluator, (batches[0],), config=CONFIG, max_loss=1e-3,
                             sensitivity_scope="layer")
    output = aq.auto_quantize(model, evaluator, (batches[0],), config=CONFIG, max_loss=1e-3,
                              sensitivity_scope="output")
    assert local.met and output.met
    assert sorted(local.quantized_layers) == ["head"]
    assert sorted(output.quantized_layers) == ["head", "noisy"]
    assert output.num_evaluations <= local.num_evaluations
    assert output.settings.sensitivity_scope == "output"
    assert output.to_report()["settings"]["sensitivity_scope"] == "output"


def test_output_scope_costs_one_calibration_pass_per_layer_plus_the_float_one(
        model_and_batches):
    model, batches = model_and_batches
    local, output = Counting(batches), Counting(batches)
    aq.sensitivity_analysis(model, local, config=CONFIG, sensitivity_scope="layer")
    aq.sensitivity_analysis(model, output, config=CONFIG, sensitivity_scope="output")
    assert output.passes - local.passes == 3  # N + 1 passes instead of 1, N = 3 layers


def test_a_calibration_that_shuffles_its_batches_is_refused(model_and_batches):
    model, batches = model_and_batches
    with pytest.raises(ConfigError, match="same batches in the same order.*shuffling"):
        aq.sensitivity_analysis(model, Counting(batches, shuffle=True), config=CONFIG,
                                sensitivity_scope="output")


def test_an_unknown_scope_or_dump_dir_with_the_output_scope_is_a_config_error(
        model_and_batches, tmp_path):
    model, batches = model_and_batches
    with pytest.raises(ConfigError, match="sensitivity_scope.*'layer'.*'output'"):
        aq.auto_quantize(model, aq.FidelityEvaluator(model, batches), (batches[0],),
                         sensitivity_scope="global")
    with pytest.raises(ConfigError, match="sensitivity_scope must be one of"):
        aq.sensitivity_analysis(model, calibration_data=batches, sensitivity_scope="model")
    with pytest.raises(ConfigError, match="dump_dir"):
        aq.sensitivity_analysis(model, calibration_data=batches, dump_dir=tmp_path,
                                sensitivity_scope="output")


class Subset(aq.FidelityEvaluator):
    """Fidelity on all batches; `evaluate_subset` on the first one only, counted."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        super().__init__(model, batches)
        self.first = aq.FidelityEvaluator(model, batches[:1])
        self.subset_calls = self.full_calls = 0

    def evaluate(self, model: nn.Module) -> float:
        self.full_calls += 1
        return super().evaluate(model)

    def evaluate_subset(self, model: nn.Module) -> float:
        self.subset_calls += 1
        return self.first.evaluate(model)


def test_subset_scope_ranks_by_the_evaluators_own_metric_on_its_subset(model_and_batches):
    model, batches = model_and_batches
    evaluator = Subset(model, batches)
    result = aq.auto_quantize(model, evaluator, (batches[0],), config=CONFIG, max_loss=1e-3,
                              sensitivity_scope="subset")
    assert evaluator.subset_calls == 4  # the float model and each of the 3 layers alone
    assert evaluator.full_calls == result.num_evaluations  # the ranking costs no evaluation
    ranking = {row.name: row for row in result.sensitivity}
    assert ranking["noisy"].rank == 2 and ranking["noisy"].score > -1e-5  # barely a loss
    assert ranking["big"].rank == 0 and ranking["big"].score < ranking["head"].score <= 0
    assert sorted(result.quantized_layers) == ["head", "noisy"]


def test_subset_scope_without_evaluate_subset_names_the_missing_method(model_and_batches):
    model, batches = model_and_batches
    with pytest.raises(ConfigError, match=r"evaluate_subset\(model\).*FidelityEvaluator"):
        aq.auto_quantize(model, aq.FidelityEvaluator(model, batches), (batches[0],),
                         config=CONFIG, sensitivity_scope="subset")
    with pytest.raises(ConfigError, match="evaluate_subset"):
        aq.sensitivity_analysis(model, calibration_data=batches, sensitivity_scope="subset")


def test_the_default_scope_ranks_by_evaluate_subset_where_the_evaluator_has_it(
        model_and_batches, tmp_path):
    model, batches = model_and_batches
    evaluator = Subset(model, batches)
    result = aq.auto_quantize(model, evaluator, (batches[0],), config=CONFIG, max_loss=1e-3)
    assert evaluator.subset_calls == 4
    assert {row.scope for row in result.sensitivity} == {"subset"}
    ranking = aq.sensitivity_analysis(model, Subset(model, batches), config=CONFIG)
    assert [row.name for row in ranking] == [row.name for row in result.sensitivity]
    dumped = Subset(model, batches)  # dump_dir writes the layer scope's inputs: that scope
    ranking = aq.sensitivity_analysis(model, dumped, config=CONFIG, dump_dir=tmp_path)
    assert dumped.subset_calls == 0 and {row.scope for row in ranking} == {"layer"}
