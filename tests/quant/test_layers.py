"""QuantLayer numerics per layer kind, and the explicit quantizer state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.config import LayerConfig
from autoquant.quant.integer import INTEGER_KERNEL_KINDS, slow_integer_kernel
from autoquant.quant.kind_registry import weight_axis_of
from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.quantizer import fake_quantize
from tests.helpers.fq import weight_bits

CASES = [
    (lambda: nn.Linear(6, 4), (5, 6)),
    (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2), (2, 3, 9, 9)),
    (lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4)),
    (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5)),
    (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1), (2, 3, 5, 5)),
]


def calibrated(module, x, scheme="w8a8", config=None):
    layer = QuantLayer(module, "layer", config or LayerConfig(), weight_axis_of(module))
    layer.state = QuantState.CALIBRATE
    layer(x)
    layer.set_scheme(scheme)
    layer.state = QuantState.QUANTIZE
    return layer


@pytest.mark.parametrize("make,shape", CASES)
def test_quantized_forward_equals_hand_written_qdq_reference(make, shape):
    torch.manual_seed(0)
    module, x = make().eval(), torch.randn(shape)
    layer = calibrated(module, x)
    # reference: fake-quant the input per tensor (affine u8) and the weight per channel (s8)
    axis = weight_axis_of(module)
    w = module.weight.detach()
    dims = [d for d in range(w.dim()) if d != axis]
    qmax = 2 ** (weight_bits() - 1) - 1  # 127, or 63 for the x86 target without VNNI
    w_scale = w.abs().amax(dim=dims) / qmax
    wq = fake_quantize(w, w_scale, torch.zeros_like(w_scale, dtype=torch.int32), -qmax - 1,
                       qmax, axis)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    a_scale = torch.tensor((hi - lo) / 255)
    a_zp = torch.clamp(-torch.round(torch.tensor(lo) / a_scale), 0, 255).to(torch.int32)
    xq = fake_quantize(x, a_scale, a_zp, 0, 255)
    params = {"weight": wq}
    if isinstance(module, INTEGER_KERNEL_KINDS) and slow_integer_kernel(module) is None:
        # an integer kernel adds its bias as int32 at scale a_scale * w_scale (a 3-D
        # convolution runs float in onnxruntime: its bias stays float)
        b_scale = a_scale * w_scale
        params["bias"] = torch.round(module.bias.detach() / b_scale) * b_scale
    ref = torch.func.functional_call(module, params, (xq,))
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, module(x), atol=1e-7)  # it really quantizes


@pytest.mark.parametrize("make,shape", CASES)
def test_float_state_and_float_scheme_equal_the_original_module(make, shape):
    torch.manual_seed(1)
    module, x = make().eval(), torch.randn(shape)
    layer = calibrated(module, x, scheme="float")
    assert torch.equal(layer(x), module(x))
    layer.set_scheme("w8a8")
    layer.state = QuantState.FLOAT
    assert torch.equal(layer(x), module(x))


def test_train_and_eval_never_change_the_quantizer_state():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    layer = calibrated(nn.Linear(6, 3), x)
    quant_out = layer(x)
    layer.train()
    assert layer.state is QuantState.QUANTIZE and torch.equal(layer(x), quant_out)
    layer.eval()
    assert layer.state is QuantState.QUANTIZE


def test_calibrate_state_observes_and_returns_float_output():
    module = nn.Linear(3, 2)
    layer = QuantLayer(module, "fc", LayerConfig(), 0)
    layer.state = QuantState.CALIBRATE
    x = torch.tensor([[-2.0, 0.5, 3.0]])
    assert torch.equal(layer(x), module(x))
    assert layer.observer.min_val.item() == -2.0 and layer.observer.max_val.item() == 3.0
    assert layer.calls == 1


def test_sixteen_bit_scheme_is_closer_to_float_than_eight_bit():
    torch.manual_seed(0)
    x, module = torch.randn(32, 16), nn.Linear(16, 8)
    layer = calibrated(module, x)
    err8 = (layer(x) - module(x)).abs().max()
    layer.set_scheme("w16a16")
    err16 = (layer(x) - module(x)).abs().max()
    assert err16 < err8 / 50


def test_uncalibrated_layer_cannot_be_quantized():
    layer = QuantLayer(nn.Linear(3, 2), "fc", LayerConfig(), 0)
    with pytest.raises(Exception, match="not executed by Evaluator.calibration"):
        layer.set_scheme("w8a8")


def test_wrapper_forwards_attribute_reads_to_the_wrapped_module():
    layer = QuantLayer(nn.Linear(3, 2), "fc", LayerConfig(), 0)
    assert layer.in_features == 3 and layer.weight is layer.module.weight


def test_weight_only_changes_with_the_weight_version():
    torch.manual_seed(0)
    x, module = torch.randn(8, 4), nn.Linear(4, 4)
    layer = calibrated(module, x)
    before = layer.quantized_weight().clone()
    with torch.no_grad():
        module.weight.mul_(2)
    assert not torch.equal(layer.quantized_weight(), before)


def test_linear_fast_path_matches_functional_reference():
    torch.manual_seed(0)
    x, module = torch.randn(3, 5), nn.Linear(5, 2)
    layer = calibrated(module, x)
    expected = F.linear(layer.quantize_input(x), layer.quantized_weight(),
                        layer.quantized_bias())
    assert torch.equal(layer(x), expected)
