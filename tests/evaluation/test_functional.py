"""The functional form: a metric function and calibration data instead of an Evaluator
class, through the same adapter; ready evaluators take a DataLoader as well as a list."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoquant as aq
from autoquant.errors import ConfigError
from autoquant.evaluation.functional import FunctionEvaluator, calibration_inputs


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen)


def test_auto_quantize_takes_a_metric_function_and_a_data_loader() -> None:
    model = _model()
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # yields [inputs, labels] lists
    reference = model(x).detach()
    seen: list[nn.Module] = []

    def fidelity(m: nn.Module) -> float:
        seen.append(m)
        return float(nn.functional.cosine_similarity(m(x).flatten(), reference.flatten(), 0))

    result = aq.auto_quantize(model, evaluate=fidelity, calibration_data=loader,
                              max_loss=0.01, example_inputs=(x[:2],))
    assert result.status == "met" and result.num_evaluations == len(seen)
    assert result.quantized_layers  # calibrated on the loader: the layers have ranges
    lower = aq.auto_quantize(model, evaluate=lambda m: float(m(x).abs().mean()),
                             calibration_data=[x[:16]], higher_is_better=False,
                             max_loss=1e9)
    assert lower.higher_is_better is False


def test_quantize_and_the_ranking_take_bare_calibration_data() -> None:
    model = _model()
    x, _ = _data()
    qmodel = aq.quantize(model, calibration_data=[x[:16], x[16:32]])
    assert float((qmodel(x) - model(x)).abs().max()) > 0  # quantized, calibrated
    ranking = aq.sensitivity_analysis(model, calibration_data=[x[:16]])
    assert sorted(r.name for r in ranking) == ["0", "2"]


def test_the_functional_form_turns_mistakes_into_config_errors() -> None:
    model = _model()
    x, _ = _data()
    with pytest.raises(ConfigError, match="evaluate=fn"):
        aq.auto_quantize(model, max_loss=0.01)
    with pytest.raises(ConfigError, match="not both"):
        aq.auto_quantize(model, FunctionEvaluator(lambda m: 1.0, [x]), evaluate=lambda m: 1.0,
                         calibration_data=[x])
    with pytest.raises(ConfigError, match="one-shot iterator"):
        FunctionEvaluator(lambda m: 1.0, iter([x]))
    with pytest.raises(ConfigError, match="calibration_data"):
        FunctionEvaluator(lambda m: 1.0)
    with pytest.raises(ConfigError, match="evaluate must be a function"):
        FunctionEvaluator(3.0, [x])  # type: ignore[arg-type]


def test_a_list_batch_is_inputs_and_target_a_tuple_is_positional_inputs() -> None:
    x = torch.ones(2, 3)
    assert calibration_inputs([x, torch.zeros(2)]) is x
    pair = (x, x)
    assert calibration_inputs(pair) is pair


def test_fidelity_evaluator_reads_a_shuffling_data_loader_once() -> None:
    model = _model()
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    evaluator = aq.FidelityEvaluator(model, loader)
    assert evaluator.evaluate(model) == pytest.approx(1.0)  # same batches every time
    assert evaluator.evaluate(model) == pytest.approx(1.0)
    qmodel = aq.quantize(model, evaluator, {"default": {"weight": {"bits": 2}}})
    assert evaluator.evaluate(qmodel) < 1.0
