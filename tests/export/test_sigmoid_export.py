"""A sigmoid (alone or in a SiLU) after a requantized integer convolution has its output
quantized at fixed 8-bit qparams, in the searched model and the export, so that
onnxruntime runs QLinearSigmoid and QLinearMul instead of float ops between QDQ pairs; a
SiLU whose product no single quantizing layer reads gets a calibrated output quantizer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoquant as aq
from autoquant.quant.activations import SIGMOID_SCALE, QuantSigmoid, QuantSiLU, sigmoid_range
from autoquant.quant.qmath import fake_quantize
from autoquant.quant.qmodel import QuantModel
from tests.helpers.synthetic import BatchCalibrator

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from autoquant.export.onnx_export import export_checked  # noqa: E402
from autoquant.export.ortmodule import ort_session  # noqa: E402
from tests.helpers.onnxcheck import check_parity  # noqa: E402


class SiLUNet(nn.Module):
    """Conv-BN-SiLU twice, a conv gated by a sigmoid, and one SiLU module shared by a
    convolution's output and a sum (that one must stay float)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.gate = nn.Conv2d(8, 8, 1)
        self.sig = nn.Sigmoid()
        self.shared = nn.SiLU()
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(self.c1(x))
        y = y * self.sig(self.gate(y))
        z = self.shared(self.c3(y))
        return self.head(self.shared(z + y))


def _data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 12, 12, generator=gen) for _ in range(2)]


def _quantized(symmetric: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = {"default": {"activation": {"symmetric": True}}} if symmetric else None
    return aq.quantize(SiLUNet().eval(), BatchCalibrator(_data()), config=config)


def test_a_sigmoid_after_a_requantized_convolution_runs_qlinear_sigmoid(tmp_path) -> None:
    qmodel = _quantized()
    assert isinstance(qmodel.c1[2], QuantSiLU) and isinstance(qmodel.sig, QuantSigmoid)
    assert type(qmodel.shared) is nn.SiLU  # one of its calls reads a sum: left alone
    assert sigmoid_range(qmodel.c1[2]) == (0, 255) and sigmoid_range(qmodel.sig) == (0, 255)
    # c2's product is read by the gate conv and the gating Mul: it is quantized itself
    assert qmodel.c1[2].output_qparams() is None and qmodel.c2[2].output_qparams() is not None
    x = _data()[0]
    _, figures = export_checked(qmodel, tmp_path / "m.onnx", (x,))  # parity checked
    check_parity(qmodel, tmp_path / "m.onnx", x)
    ort_session(tmp_path / "m.onnx", optimized_model=tmp_path / "opt.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    # c1's, c2's and the gate's sigmoids run as tables; the shared SiLU's two stay float
    assert ops["QLinearSigmoid"] == 3 and ops["Sigmoid"] + ops["QuickGelu"] == 2
    # c1's product (c2 quantizes it) and c2's (its own quantizer); not the gating Mul,
    # which c3 and a sum read
    assert ops["QLinearMul"] == 2
    assert figures["integer_kernels"]["summary"].startswith("5 of 5")


def test_int8_activations_keep_the_sigmoid_float_as_onnxruntime_fuses_none_of_it() -> None:
    qmodel = _quantized(symmetric=True)  # x86 kernels fuse no int8 activation
    assert sigmoid_range(qmodel.c1[2]) is None and sigmoid_range(qmodel.sig) is None
    x = _data()[0]
    with torch.no_grad():
        y = qmodel.c1[1](qmodel.c1[0](x))
        assert torch.equal(qmodel.c1[2](y), F.silu(y))


def test_the_searched_silu_quantizes_its_sigmoid_and_the_float_plan_does_not() -> None:
    torch.manual_seed(0)
    model = SiLUNet().eval()
    qm = QuantModel(model, aq.QuantConfig())
    data = _data()
    qm.calibrate(lambda m, where: [m(x) for x in data])
    silu, conv = qm.model.c1[2], qm.layers["c1.0"]
    qm.apply_plan(qm.quant_plan())
    with torch.no_grad():
        y = conv(data[0])
        expected = y * fake_quantize(torch.sigmoid(y), torch.tensor(SIGMOID_SCALE),
                                     torch.tensor(0), 0, 255)
        assert torch.equal(silu(y), expected)
        assert not torch.equal(silu(y), F.silu(y))
    qm.apply_plan({**qm.quant_plan(), "c1.0": "float"})  # its producer runs float: off
    assert sigmoid_range(silu) is None
    with torch.no_grad():
        assert torch.equal(silu(y), F.silu(y))


def test_a_saved_silu_output_quantizer_loads_back_with_the_same_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    model = SiLUNet().eval()
    result = aq.auto_quantize(model, aq.FidelityEvaluator(model, _data()), max_loss=0.5)
    assert result.model.c2[2].output_qparams() is not None
    loaded = aq.load_quantized(model, result.save(tmp_path / "out"))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


class ConvAct(nn.Module):
    """Conv-BN-SiLU whose SiLU is one module object shared by every block (a class
    attribute, as YOLO-style code writes it)."""

    default_act = nn.SiLU()

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = self.default_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = ConvAct(3, 8), ConvAct(8, 8), ConvAct(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.c(y + self.b(y))  # a's and b's products are read by a sum


def test_a_silu_shared_by_blocks_gets_a_quantizer_per_block(tmp_path) -> None:
    torch.manual_seed(0)
    qmodel = aq.quantize(Blocks().eval(), BatchCalibrator(_data()))
    acts = [qmodel.a.act, qmodel.b.act, qmodel.c.act]
    assert all(isinstance(act, QuantSiLU) for act in acts) and len(set(map(id, acts))) == 3
    assert type(ConvAct.default_act) is nn.SiLU  # the class's module is not touched
    assert [act.output_qparams() is not None for act in acts] == [True, True, True]
    x = _data()[0]
    export_checked(qmodel, tmp_path / "m.onnx", (x,))  # parity checked
    ort_session(tmp_path / "m.onnx", optimized_model=tmp_path / "opt.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearSigmoid"] == 3 and ops["QLinearMul"] == 3 and ops["QLinearAdd"] == 1
