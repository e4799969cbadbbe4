"""The evaluator's ``sensitivity_output``: the ranking compares what the metric reads of the
model's output (here its argmax), so a layer that moves the raw output a lot but never the
decision is not ranked first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.errors import ConfigError, EvaluatorError

# `common` adds one coarse (2-bit) value to both logits: it moves the raw output far more
# than `decide` (6-bit) does, but never the argmax, which is all the metric reads
CONFIG = {"default": {"weight": {"bits": 6}, "activation": {"bits": 6}},
          "layers": {"common": {"weight": {"bits": 2}, "activation": {"bits": 2}}}}


class Decision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decide, self.common = nn.Linear(16, 2), nn.Linear(16, 1)
        with torch.no_grad():
            self.common.weight.mul_(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decide(x) + self.common(x)


class Agreement(aq.Evaluator):
    """Share of rows whose argmax agrees with the float model's: the metric reads only the
    decision, which this evaluator does not tell the ranking."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        with torch.no_grad():
            self.labels = [model(x).argmax(-1) for x in batches]

    def calibration(self, model: nn.Module) -> None:
        for x in self.batches:
            model(x)

    def evaluate(self, model: nn.Module) -> float:
        hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in
                   zip(self.batches, self.labels, strict=True))
        return hits / sum(len(y) for y in self.labels)


class ReadsArgmax(Agreement):
    """The same metric, saying what it reads of the output."""

    def sensitivity_output(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(-1)


class ReturnsAList(Agreement):
    def sensitivity_output(self, output: torch.Tensor) -> list:
        return [1]


@pytest.fixture
def model_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Decision().eval(), [torch.randn(64, 16) for _ in range(4)]


def test_the_default_ranking_compares_what_the_metric_reads_of_the_output(
        model_and_batches):
    model, batches = model_and_batches
    raw = aq.sensitivity_analysis(model, Agreement(model, batches), config=CONFIG)
    read = aq.sensitivity_analysis(model, ReadsArgmax(model, batches), config=CONFIG)
    assert raw[0].name == "common" and raw[0].scope == "gradient"
    assert [r.name for r in read] == ["decide", "common"]
    assert read[0].scope == "output" and read[0].score < 1
    assert read[1].score == pytest.approx(1.0)  # the decision never moved


def test_the_search_keeps_the_layer_that_never_moves_the_decision(model_and_batches):
    model, batches = model_and_batches
    result = aq.auto_quantize(model, ReadsArgmax(model, batches), (batches[0],), config=CONFIG,
                              max_loss=0.0, sensitivity="mse")
    assert result.met and result.quantized_layers == ["common"]
    assert result.num_evaluations == 3  # float, all quantized (fails), `decide` back
    assert result.to_report()["ranking_scope"] == ["output"]


def test_sensitivity_output_with_the_gradient_scope_or_returning_no_tensor_is_refused(
        model_and_batches):
    model, batches = model_and_batches
    with pytest.raises(ConfigError, match="gradient.*sensitivity_output.*'output' or 'auto'"):
        aq.sensitivity_analysis(model, ReadsArgmax(model, batches), config=CONFIG,
                                sensitivity_scope="gradient")
    with pytest.raises(EvaluatorError, match=r"sensitivity_output\(\) returned list.*tensor"):
        aq.sensitivity_analysis(model, ReturnsAList(model, batches), config=CONFIG)
