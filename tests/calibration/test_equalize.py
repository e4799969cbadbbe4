"""Per-layer input smoothing (``smoothing`` in a layer config): float-exact, chosen by the
layer's output SQNR, pinned in the final config, saved, and exported as a Mul."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoquant as aq
from autoquant.calibration.equalize import STRENGTHS
from autoquant.errors import ConfigError
from autoquant.export.onnx_export import export_onnx
from autoquant.quant.layers import QuantLayer
from autoquant.sensitivity.metrics import SQNR


class PostGelu(nn.Module):
    """An FFN whose down-projection reads a GELU output with outlier channels: no LayerNorm
    to fold a scale into, as in a BERT-style encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.conv = nn.Conv1d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(F.gelu(self.up(x)))
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


def _model_and_data() -> tuple[PostGelu, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = PostGelu().eval()
    with torch.no_grad():  # a few up-projection channels come out 30x larger
        model.up.weight[[3, 40]] *= 30.0
        model.up.bias[[3, 40]] += 10.0
    return model, [torch.randn(8, 12, 16) for _ in range(3)]


def _layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def _output_sqnr(reference: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> float:
    sqnr = SQNR()
    with torch.no_grad():
        for x in batches:
            sqnr.update(reference(x), model(x))
    return sqnr.score()


def test_smoothing_keeps_the_float_function_and_narrows_the_quantized_input_range() -> None:
    model, batches = _model_and_data()
    q = aq.quantize(model, config={"default": {"smoothing": 0.85}}, calibration_data=batches)
    down = _layers(q)["down"]
    assert down.input_inv.shape == (64,)
    x = F.gelu(model.up(batches[0]))
    with torch.no_grad():
        exact = F.linear(down.scale_input(x), down.effective_weight(), model.down.bias)
    torch.testing.assert_close(exact, model.down(x), rtol=1e-5, atol=1e-5)
    plain = aq.quantize(model, calibration_data=batches)
    smoothed_range = float(down.observer.max_val - down.observer.min_val)
    raw = _layers(plain)["down"].observer
    assert smoothed_range < 0.5 * float(raw.max_val - raw.min_val)


def test_min_max_smoothing_in_the_observer_pass_sets_the_range_a_separate_pass_observes(
) -> None:
    model, batches = _model_and_data()
    passes = []

    def calibration(m: nn.Module) -> None:
        passes.append(1)
        for x in batches:
            m(x)

    merged = aq.quantize(model, aq.FunctionEvaluator(lambda m: 0.0, calibration=calibration),
                         config={"default": {"smoothing": 0.85}})
    assert len(passes) == 1  # statistics and ranges in one pass
    # percentile 100 is min-max computed from the observed (scaled) values: its own pass
    separate = aq.quantize(model, calibration_data=batches, config={"default": {
        "smoothing": 0.85, "activation": {"algorithm": "percentile", "percentile": 100.0}}})
    for name in ("up", "down"):
        a, b = _layers(merged)[name], _layers(separate)[name]
        torch.testing.assert_close(a.input_inv, b.input_inv)
        for got, want in zip(a.observer.qparams(8)[:2], b.observer.qparams(8)[:2], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(batches[0]), separate(batches[0]))


def test_smoothing_cuts_the_quantization_error_of_a_layer_with_outlier_input_channels() -> None:
    model, batches = _model_and_data()
    plain = aq.quantize(model, calibration_data=batches)
    auto = aq.quantize(model, config={"default": {"smoothing": "auto"}},
                       calibration_data=batches)
    assert _layers(auto)["down"].smoothing_alpha in STRENGTHS
    assert _output_sqnr(model, auto, batches) > _output_sqnr(model, plain, batches) + 3.0


def test_auto_smoothing_takes_the_best_local_score_and_none_unless_a_strength_beats_it() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16)).eval()
    batches = [torch.randn(32, 16) for _ in range(2)]  # no outlier: nothing to migrate
    q = aq.quantize(model, config={"default": {"smoothing": "auto"}}, calibration_data=batches)
    layer = _layers(q)["0"]
    scores = layer.smoothing_scores
    best = layer.smoothing_alpha
    assert scores[str(best)] == max(scores.values())
    assert best is None or scores[str(best)] > scores["None"]
    assert (layer.input_inv.numel() == 0) == (best is None)


def test_layers_that_cannot_be_smoothed_are_logged_and_left_as_they_are(caplog) -> None:
    model, batches = _model_and_data()
    with caplog.at_level(logging.INFO, logger="autoquant"):
        q = aq.quantize(model, config={"default": {"smoothing": 0.5}}, calibration_data=batches)
    assert _layers(q)["conv"].input_inv.numel() == 0
    assert "not smoothed: conv" in caplog.text


def test_the_final_config_pins_the_chosen_strength_and_reapplying_it_reproduces_the_model(
        tmp_path) -> None:
    model, batches = _model_and_data()
    evaluator = aq.FidelityEvaluator(model, batches)
    result = aq.auto_quantize(model, evaluator, (batches[0],), max_loss=0.05,
                              config={"default": {"smoothing": "auto"}})
    chosen = _layers(result.model)["down"].smoothing_alpha
    assert result.config.layers["down"]["smoothing"] == chosen
    again = aq.quantize(model, config=result.config, calibration_data=batches)
    loaded = aq.load_quantized(model, result.save(tmp_path / "saved"))
    with torch.no_grad():
        expected = result.model(batches[1])
        torch.testing.assert_close(again(batches[1]), expected)
        torch.testing.assert_close(loaded(batches[1]), expected)
    assert [r["smoothed"] for r in result.to_report()["layers"] if r["name"] == "down"] == [True]


@pytest.mark.parametrize("value", [1.5, -0.1, True, "always"])
def test_a_smoothing_value_out_of_range_is_a_config_error_naming_the_choices(value) -> None:
    with pytest.raises(ConfigError, match="smoothing must be null .*'auto'.* in \\[0, 1\\]"):
        aq.QuantConfig.from_dict({"default": {"smoothing": value}})


def test_the_smoothed_layer_exports_a_mul_ahead_of_an_integer_gemm(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, batches = _model_and_data()
    q = aq.quantize(model, config={"default": {"smoothing": 0.85}}, calibration_data=batches)
    path = export_onnx(q, tmp_path / "m.onnx", (batches[0],))  # checks parity in ORT
    graph = onnx.load(str(path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert any(producers.get(n.input[0]) is not None
               and producers[n.input[0]].op_type == "Mul" for n in quantizers)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert optimized & {"QGemm", "MatMulIntegerToFloat", "QLinearMatMul"}
