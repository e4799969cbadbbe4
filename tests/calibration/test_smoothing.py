"""SmoothQuant-style smoothing: found with torch.fx, function-preserving, never fatal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoquant as aq
from autoquant.calibration.refine import calibrate_model
from autoquant.calibration.smoothing import find_smoothable, smooth_model, smoothing_scales
from autoquant.evaluation.adapter import calibration_of
from autoquant.quant.layers import QuantState
from autoquant.quant.qmodel import QuantModel
from tests.helpers.synthetic import BatchCalibrator


class Block(nn.Module):
    """A pre-LayerNorm transformer block with explicit Q/K/V projections."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).reshape(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(att)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Untraceable(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return super().forward(x)


Calib = BatchCalibrator


def _block_and_data(cls: type[Block] = Block) -> tuple[Block, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # outlier channels after the LayerNorm, as in real transformers
        model.ln1.weight[[2, 7]] = 20.0
        model.ln2.weight[5] = 30.0
    return model, [torch.randn(4, 6, 16) for _ in range(3)]


def test_groups_are_layernorm_to_its_linear_consumers() -> None:
    model, _ = _block_and_data()
    qmodel = QuantModel(model, aq.QuantConfig())
    assert find_smoothable(qmodel.model) == [("ln1", ["q", "k", "v"]), ("ln2", ["fc1"])]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smoothing_leaves_the_float_function_unchanged(alpha: float) -> None:
    # float64 isolates the algebra from float32 rounding (outputs reach ~10 here, where
    # float32 alone differs by ~1e-6 per operation)
    model, batches = _block_and_data()
    model, batches = model.double(), [x.double() for x in batches]
    qmodel = QuantModel(model, aq.QuantConfig())
    done = smooth_model(qmodel, calibration_of(Calib(batches)), alpha)
    assert [n for n, _ in done] == ["ln1", "ln2"]
    with torch.no_grad(), qmodel.state(QuantState.FLOAT):
        for x in batches + [torch.randn(2, 5, 16, dtype=torch.float64)]:
            assert float((qmodel.model(x) - model(x)).abs().max()) <= 1e-5
    assert float(model.ln1.weight.detach()[2]) == 20.0  # the user's model is untouched
    if alpha > 0:
        assert not torch.equal(qmodel.model.ln1.weight, model.ln1.weight)


def test_smoothing_flattens_the_activation_channels() -> None:
    model, batches = _block_and_data()
    qmodel = QuantModel(model, aq.QuantConfig())
    smooth_model(qmodel, calibration_of(Calib(batches)), 0.5)
    with torch.no_grad():
        before = torch.cat([model.ln2(x).reshape(-1, 16) for x in batches]).abs().amax(0)
        after = torch.cat([qmodel.model.ln2(x).reshape(-1, 16) for x in batches]).abs().amax(0)
    assert float(after.max() / after.median()) < 0.5 * float(before.max() / before.median())


def test_smoothing_scales_follow_the_formula_and_keep_dead_channels() -> None:
    act = torch.tensor([4.0, 1.0, 0.0])
    weight = torch.tensor([[1.0, 4.0, 2.0], [0.5, -1.0, 1.0]])
    scales = smoothing_scales(act, [weight], 0.5)
    # s_j = sqrt(act_j) / sqrt(max_i |W_ij|): sqrt(4)/1, sqrt(1)/2, dead channel -> 1
    assert torch.allclose(scales, torch.tensor([2.0, 0.5, 1.0]))


def test_untraceable_model_is_not_smoothed_and_still_quantizes() -> None:
    model, batches = _block_and_data(Untraceable)
    qmodel = QuantModel(model, aq.QuantConfig(smoothing_alpha=0.5))
    calibrate_model(qmodel, calibration_of(Calib(batches)))
    assert torch.equal(qmodel.model.ln1.weight, model.ln1.weight)
    assert not any(getattr(layer, "smoothed", False) for layer in qmodel.layers.values())


def test_smoothing_reduces_the_error_of_a_quantized_outlier_block() -> None:
    model, batches = _block_and_data()
    errors = {}
    for alpha in (None, 0.5):
        quant = aq.quantize(model, Calib(batches), {"smoothing_alpha": alpha})
        with torch.no_grad():
            errors[alpha] = sum(float(F.mse_loss(quant(x), model(x))) for x in batches)
    assert errors[0.5] < errors[None]


def test_smoothed_search_result_saves_and_reloads(tmp_path) -> None:
    model, batches = _block_and_data()

    class Eval(Calib):
        def evaluate(self, model: nn.Module) -> float:
            return 1.0

    result = aq.auto_quantize(model, Eval(batches), (batches[0],), max_loss=0.5,
                              config={"smoothing_alpha": 0.5, "bias_correction": True})
    rows = {row["name"]: row for row in result.to_report()["layers"]}
    assert rows["q"]["smoothed"] and rows["fc1"]["smoothed"] and not rows["fc2"]["smoothed"]
    result.save(tmp_path)
    reloaded = aq.load_quantized(model, tmp_path)
    with torch.no_grad():
        assert torch.allclose(reloaded(batches[0]), result.model(batches[0]), atol=1e-6)
