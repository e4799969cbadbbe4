"""The report's sizes are the bytes an export stores (int8/int16 weights, float32 biases),
never bit-packed figures, and the summary names the schemes."""

from __future__ import annotations

import autoquant as aq
from autoquant.report.build import model_sizes
from autoquant.report.render import summary_lines
from tests.helpers.synthetic import DropEvaluator, mlp

W4A4 = {"default": {"weight": {"bits": 4}, "activation": {"bits": 4}}}


def test_a_w4a4_model_reports_int8_storage_not_a_packed_8x():
    model = mlp(3)  # 3 x (64 weights + 8 biases)
    result = aq.auto_quantize(model, DropEvaluator({}), max_loss=0.5, config=W4A4)
    assert result.quantized_layers == ["0", "2", "4"]
    report = result.to_report()
    sizes = report["sizes"]
    assert sizes["float_weight_bytes"] == 3 * 72 * 4
    assert sizes["quantized_weight_bytes"] == 3 * (64 * 1 + 8 * 4)  # int8 weight, f32 bias
    assert sizes["schemes"] == {"w4a4": 3}
    lines = "\n".join(summary_lines(report))
    assert "3 W4A4" in lines and "8.0x" not in lines and "3.0x smaller" in lines
    assert "3 W4A4" in result.summary() and "3.00x smaller" in result.summary()


def test_sixteen_bit_weights_take_two_bytes_and_float_layers_four():
    rows = [{"name": "a", "parameters": 110, "weight_elements": 100},
            {"name": "b", "parameters": 10, "weight_elements": 10},
            {"name": "c", "parameters": 10, "weight_elements": 10}]
    sizes = model_sizes(rows, {"a": "w16a16", "b": "w3a3", "c": "float"})
    assert sizes["quantized_weight_bytes"] == 100 * 2 + 10 * 4 + 10 + 40
    assert sizes["schemes"] == {"float": 1, "w16a16": 1, "w3a3": 1}
