"""Gradient-scope sensitivity: each layer's own error carried to the model's output by the
float model's gradient, in one pass, estimates what the output scope measures in N + 1."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.errors import ConfigError
from autoquant.sensitivity.gradient import NoGradient
from autoquant.sensitivity.ranking import SensitivityMetric
from tests.helpers.absorbing import CONFIG, Absorbing, Counting


@pytest.fixture
def model_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Absorbing().eval(), [torch.randn(64, 16) for _ in range(4)]


def _scores(model: nn.Module, batches: list[torch.Tensor], scope: str, metric: str = "cosine",
            config: dict | None = CONFIG) -> dict[str, float]:
    rows = aq.sensitivity_analysis(model, calibration_data=batches, config=config,
                                   sensitivity=metric, sensitivity_scope=scope)
    assert {r.scope for r in rows} == {scope}
    return {r.name: r.score for r in rows}


def test_gradient_scope_orders_layers_as_the_output_scope_does(model_and_batches):
    model, batches = model_and_batches
    output = _scores(model, batches, "output")
    gradient = _scores(model, batches, "gradient")
    layer = _scores(model, batches, "layer")
    assert min(layer, key=layer.get) == "noisy"  # worst on its own output ...
    order = sorted(output, key=output.get)
    assert sorted(gradient, key=gradient.get) == order and order[-1] == "noisy"  # ... not here
    for name in output:  # 1 - cos itself, not only its order, within the probe's noise
        assert 1 - gradient[name] == pytest.approx(1 - output[name], rel=0.3, abs=1e-7)


def test_the_gradient_pass_carries_the_layer_scope_cosine_as_a_second_opinion(
        model_and_batches):
    model, batches = model_and_batches
    layer = _scores(model, batches, "layer")
    rows = aq.sensitivity_analysis(model, calibration_data=batches, config=CONFIG,
                                   sensitivity_scope="gradient", sensitivity_fraction=1.0)
    local = {r.name: r.local for r in rows}
    assert local == pytest.approx(layer, rel=1e-6)  # the same rows, the same cosine
    assert min(local, key=local.get) == "noisy" != rows[0].name  # ... a different opinion
    assert all(r.local is None for r in aq.sensitivity_analysis(
        model, calibration_data=batches, config=CONFIG, sensitivity_scope="layer"))


@pytest.mark.parametrize("metric", ["mse", "kl"])
def test_mse_and_kl_estimates_match_the_measured_output_divergence(model_and_batches, metric):
    model, batches = model_and_batches
    output, gradient = (_scores(model, batches, s, metric) for s in ("output", "gradient"))
    assert sorted(gradient, key=gradient.get) == sorted(output, key=output.get)
    for name in ("big", "head"):
        if metric == "mse":  # SQNR in dB
            assert gradient[name] == pytest.approx(output[name], abs=1.5)
        else:  # -KL in nats
            assert -gradient[name] == pytest.approx(-output[name], rel=0.35)


def test_the_gradient_pass_costs_one_calibration_pass_like_the_layer_pass(model_and_batches):
    model, batches = model_and_batches
    layer, gradient, staged = Counting(batches), Counting(batches), Counting(batches)
    aq.sensitivity_analysis(model, layer, config=CONFIG, sensitivity_scope="layer")
    aq.sensitivity_analysis(model, gradient, config=CONFIG, sensitivity_scope="gradient",
                            sensitivity_fraction=1.0)
    assert gradient.passes == layer.passes
    # by default a share of the rows first, and the rest in a second pass if needed
    aq.sensitivity_analysis(model, staged, config=CONFIG, sensitivity_scope="gradient")
    assert layer.passes <= staged.passes <= layer.passes + 1


def test_the_ranking_is_reproducible_and_leaves_no_gradients_or_flags_behind(
        model_and_batches):
    model, batches = model_and_batches
    model.head.weight.requires_grad_(False)
    first = _scores(model, batches, "gradient")
    assert _scores(model, batches, "gradient") == first
    assert all(p.grad is None for p in model.parameters())
    assert not model.head.weight.requires_grad and model.big.weight.requires_grad
    result = aq.auto_quantize(model, aq.FidelityEvaluator(model, batches), (batches[0],),
                              config=CONFIG, max_loss=1e-3)
    flags = {n.replace(".module", ""): p.requires_grad
             for n, p in result.model.named_parameters()}
    assert flags["head.weight"] is False and flags["big.weight"] is True
    assert all(p.grad is None for p in result.model.parameters())


class Unused(nn.Module):
    """`spare` runs on every call, but its output never reaches the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.spare(x)
        return self.used(x)


def test_a_layer_whose_output_never_reaches_the_model_output_ranks_least_sensitive():
    torch.manual_seed(0)
    batches = [torch.randn(32, 16) for _ in range(2)]
    scores = _scores(Unused().eval(), batches, "gradient", config=None)
    assert scores["spare"] == 1.0 and scores["used"] < 1.0


def test_the_default_search_keeps_the_layer_the_model_absorbs(model_and_batches):
    model, batches = model_and_batches
    result = aq.auto_quantize(model, aq.FidelityEvaluator(model, batches), (batches[0],),
                              config=CONFIG, max_loss=1e-3)
    assert result.settings.sensitivity_scope == "auto"
    assert sorted(result.quantized_layers) == ["head", "noisy"]
    report = result.to_report()
    assert report["ranking_scope"] == ["gradient"]


class Argmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).argmax(dim=1)


class InferenceMode(Counting):
    def calibration(self, model: nn.Module) -> None:
        with torch.inference_mode():
            super().calibration(model)


def test_a_model_without_gradients_is_a_clear_error_and_auto_ranks_by_the_layer_scope(
        caplog):
    torch.manual_seed(0)
    batches = [torch.randn(8, 16)]
    with pytest.raises(NoGradient, match="no gradient.*argmax.*'output' or 'layer'"):
        _scores(Argmax().eval(), batches, "gradient", config=None)
    with caplog.at_level(logging.WARNING, logger="autoquant.sensitivity.output"):
        rows = aq.sensitivity_analysis(Argmax().eval(), calibration_data=batches)
    assert [r.scope for r in rows] == ["layer"] and "own output instead" in caplog.text


def test_inference_mode_calibration_is_a_clear_error_and_auto_falls_back(model_and_batches):
    model, batches = model_and_batches
    with pytest.raises(NoGradient, match="inference_mode.*torch.no_grad"):
        aq.sensitivity_analysis(model, InferenceMode(batches), config=CONFIG,
                                sensitivity_scope="gradient")
    rows = aq.sensitivity_analysis(model, InferenceMode(batches), config=CONFIG)
    assert {r.scope for r in rows} == {"layer"}


class MaxAbs(SensitivityMetric):
    name = "maxabs"

    def __init__(self) -> None:
        self.worst = 0.0

    def update(self, y_float: torch.Tensor, y_quant: torch.Tensor) -> None:
        self.worst = max(self.worst, float((y_float - y_quant).abs().max()))

    def score(self) -> float:
        return -self.worst


def test_a_metric_the_gradient_cannot_estimate_is_refused_and_auto_uses_the_layer_scope(
        model_and_batches):
    model, batches = model_and_batches
    with pytest.raises(ConfigError, match="cosine, mse or kl.*'maxabs'.*'output'"):
        aq.sensitivity_analysis(model, calibration_data=batches, config=CONFIG,
                                sensitivity=MaxAbs, sensitivity_scope="gradient")
    rows = aq.sensitivity_analysis(model, calibration_data=batches, config=CONFIG,
                                   sensitivity=MaxAbs)
    assert {r.scope for r in rows} == {"layer"} and all(math.isfinite(r.score) for r in rows)


class TightMemory(nn.Module):
    """Runs out of memory whenever autograd records its forward, as a large model on a small
    device would in the gradient pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.head(torch.relu(self.fc(x)))


def test_a_gradient_pass_out_of_memory_falls_back_to_the_layer_scope_under_auto(caplog):
    torch.manual_seed(0)
    batches = [torch.randn(8, 16) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="autoquant.sensitivity.output"):
        rows = aq.sensitivity_analysis(TightMemory().eval(), calibration_data=batches)
    assert {r.scope for r in rows} == {"layer"} and "out of memory" in caplog.text
    with pytest.raises(aq.EvaluatorError, match="OutOfMemoryError"):
        aq.sensitivity_analysis(TightMemory().eval(), calibration_data=batches,
                                sensitivity_scope="gradient")


def test_an_in_place_activation_after_a_layer_does_not_change_its_estimate():
    torch.manual_seed(0)

    def net(inplace: bool) -> nn.Sequential:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=inplace), nn.Linear(32, 32),
                             nn.ReLU(inplace=inplace), nn.Linear(32, 4)).eval()

    plain, in_place = net(False), net(True)
    in_place.load_state_dict(plain.state_dict())
    batches = [torch.randn(64, 16) for _ in range(4)]
    config = {"default": {"weight": {"bits": 4}, "activation": {"bits": 4}}}
    want = _scores(plain, batches, "gradient", config=config)
    assert _scores(in_place, batches, "gradient", config=config) == pytest.approx(want)
    assert min(want, key=want.get) == "0"  # and the estimate is not trivial


def _pass_with_saved_bytes(model: nn.Module, batches: list[torch.Tensor], frozen: bool
                           ) -> tuple[dict[str, float], int]:
    from autoquant.api import _calibrate
    from autoquant.calibration.refine import calibrate_model
    from autoquant.quant.qmodel import QuantModel
    from autoquant.sensitivity.gradient import _run_pass

    qmodel = QuantModel(model, aq.QuantConfig(), (batches[0],))
    calibrate = _calibrate(None, batches)
    calibrate_model(qmodel, calibrate)
    qmodel.apply_plan(qmodel.quant_plan())
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size() if not isinstance(t, nn.Parameter) else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        record = _run_pass(qmodel, calibrate, "cosine", frozen=frozen)
    assert record.error is None and not record.unrooted
    return dict(record.estimate), saved[0]


def test_frozen_weights_give_the_same_estimates_and_save_no_layer_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 4)).eval()
    batches = [torch.randn(64, 16) for _ in range(3)]
    frozen, frozen_bytes = _pass_with_saved_bytes(model, batches, True)
    graphed, graphed_bytes = _pass_with_saved_bytes(model, batches, False)
    assert frozen == pytest.approx(graphed, rel=1e-5) and min(frozen.values()) > 0
    # what remains saved: GELU's input, tanh's output (a Linear saves no input), and the
    # first layer's output copy that roots the graph
    assert frozen_bytes < 0.7 * graphed_bytes


class TupleHooked(nn.Module):
    """A Linear whose user hook returns a tuple: its output cannot become a graph root."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
        self.fc.register_forward_hook(lambda _m, _a, out: (out, out.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.fc(x)
        return self.head(torch.tanh(y))


def test_a_first_layer_whose_output_is_a_tuple_is_still_estimated():
    torch.manual_seed(0)
    batches = [torch.randn(32, 16) for _ in range(2)]
    scores = _scores(TupleHooked().eval(), batches, "gradient", config=None)
    output = _scores(TupleHooked().eval(), batches, "output", config=None)
    assert scores["fc"] < 1.0  # a rerun with the weights in the graph reached it
    assert sorted(scores, key=scores.get) == sorted(output, key=output.get)
