"""Per-layer quantization modes: static, dynamic (range of each batch), weight_only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.evaluation.adapter import calibration_of
from autoquant.quant.qmodel import QuantModel
from tests.helpers.fq import affine_scale, fq_affine, fq_batch, fq_rows, int32_bias, row_scales


class _Calib:
    def __init__(self, x):
        self.x = x

    def calibration(self, model):
        model(self.x)

    def evaluate(self, model):
        return 0.0


def _linear_model(mode: str, calib: torch.Tensor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).eval()
    cfg = aq.QuantConfig.from_dict({"layers": {"0": {"mode": mode}}})
    qm = QuantModel(model, cfg, (calib,))
    qm.calibrate(calibration_of(_Calib(calib)))
    qm.apply_plan(qm.quant_plan())
    return model[0], qm


def test_static_mode_uses_the_calibrated_range() -> None:
    calib = torch.randn(8, 6)
    lin, qm = _linear_model("static", calib)
    x = torch.randn(8, 6) * 5  # outside the calibrated range: clipped
    bias = int32_bias(lin.bias, affine_scale(calib.min(), calib.max()), row_scales(lin.weight))
    expected = fq_affine(x, calib.min(), calib.max()) @ fq_rows(lin.weight).T + bias
    torch.testing.assert_close(qm.model(x), expected, rtol=0, atol=1e-5)


def test_dynamic_mode_takes_the_range_of_each_batch() -> None:
    calib = torch.randn(8, 6)
    lin, qm = _linear_model("dynamic", calib)
    w_q = fq_rows(lin.weight)
    for factor in (0.1, 1.0, 30.0):
        x = torch.randn(8, 6) * factor
        expected = fq_batch(x) @ w_q.T + lin.bias
        torch.testing.assert_close(qm.model(x), expected, rtol=0, atol=1e-5 * factor)
    assert qm.layers["0"].act_scale.numel() == 0  # nothing calibrated is used


def test_weight_only_mode_leaves_activations_float() -> None:
    calib = torch.randn(8, 6)
    lin, qm = _linear_model("weight_only", calib)
    for factor in (1e-3, 1.0, 1e3):
        x = torch.randn(8, 6) * factor
        expected = nn.functional.linear(x, fq_rows(lin.weight), lin.bias)
        torch.testing.assert_close(qm.model(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_modes_need_no_calibration_statistics(mode) -> None:
    model = nn.Sequential(nn.Linear(3, 3)).eval()
    cfg = aq.QuantConfig.from_dict({"default": {"mode": mode}})
    qm = QuantModel(model, cfg, (torch.randn(2, 3),))
    qm.layers["0"].set_scheme("w8a8")  # would raise ModelError for "static"
    with pytest.raises(aq.ModelError, match="no activation statistics"):
        QuantModel(model, aq.QuantConfig()).layers["0"].set_scheme("w8a8")


def test_dynamic_lstm_input_follows_the_batch() -> None:
    torch.manual_seed(1)
    lstm = nn.LSTM(4, 3, batch_first=True)
    model = nn.Sequential(lstm).eval()
    calib = torch.randn(2, 5, 4)
    qm = QuantModel(model, aq.QuantConfig.from_dict({"default": {"mode": "dynamic"}}))
    qm.calibrate(calibration_of(_Calib(calib)))
    qm.apply_plan(qm.quant_plan())
    x = torch.randn(2, 5, 4) * 10
    reference = nn.LSTM(4, 3, batch_first=True)
    reference.load_state_dict(lstm.state_dict())
    with torch.no_grad():
        reference.weight_ih_l0.copy_(fq_rows(lstm.weight_ih_l0))
        reference.weight_hh_l0.copy_(fq_rows(lstm.weight_hh_l0))
    torch.testing.assert_close(qm.model(x)[0], reference(fq_batch(x))[0], rtol=0, atol=1e-5)


def test_weight_only_matmul_leaves_its_operands_float() -> None:
    torch.manual_seed(2)
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    model = nn.Sequential()
    model.add_module("mm", aq.QuantMatMul())
    qm = QuantModel(model, aq.QuantConfig.from_dict({"default": {"mode": "weight_only"}}))
    qm.apply_plan({"mm": "w8a8"})
    assert torch.equal(qm.model.mm(a, b), a @ b)


def test_mode_round_trips_through_yaml_and_json(tmp_path) -> None:
    cfg = aq.QuantConfig.from_dict({
        "default": {"mode": "dynamic"},
        "layers": {"emb": {"mode": "weight_only"}, "fc": {"mode": "static"}},
    })
    for name in ("c.yaml", "c.json"):
        back = aq.QuantConfig.load(cfg.save(tmp_path / name))
        assert back.to_dict() == cfg.to_dict()
        assert back.layer_config("emb").mode == "weight_only"
        assert back.layer_config("other").mode == "dynamic"
    assert aq.LayerConfig().mode == "static"


@pytest.mark.parametrize("bad", ["Dynamic", "int8", 3, None])
def test_bad_mode_is_a_config_error_naming_the_choices(bad) -> None:
    with pytest.raises(aq.ConfigError, match="static, dynamic, weight_only"):
        aq.QuantConfig.from_dict({"layers": {"fc": {"mode": bad}}})


def test_weight_only_mha_quantizes_projections_and_nothing_else() -> None:
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8) * 7

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x)[0]

    qm = QuantModel(Wrap(), aq.QuantConfig.from_dict({"default": {"mode": "weight_only"}}))
    qm.apply_plan({"attn": "w4a4"})  # no calibration needed; activation bits ignored
    reference = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    reference.load_state_dict(mha.state_dict())
    with torch.no_grad():
        reference.in_proj_weight.copy_(fq_rows(mha.in_proj_weight, bits=4))
        reference.out_proj.weight.copy_(fq_rows(mha.out_proj.weight, bits=4))
        torch.testing.assert_close(qm.model(x), reference(x, x, x)[0], rtol=0, atol=1e-5)
