"""ONNX export of the layer modes (static, dynamic, weight_only), bias correction and the
extra layer kinds (Embedding, RNNs, attention, QuantMatMul): onnxruntime computes what the
torch fake-quant model computes, within the tolerance stated in tests/onnxcheck.py."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import autoquant as aq
from autoquant.errors import ExportError
from autoquant.export import export_onnx
from autoquant.export.onnx_export import export_checked
from autoquant.export.prepare import export_copy as _export_copy
from autoquant.quant.layers import QuantLayer
from tests.helpers.synthetic import BatchCalibrator, DropEvaluator, mlp

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tests.helpers.onnxcheck import (  # noqa: E402
    check_parity,
    check_parity_catches_a_scale_error,
    ort_run,
)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _initializers(path) -> dict[str, int]:
    return {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}


MLP_CASES = {
    "bias_correction": {"bias_correction": True},
    "weight_only": {"default": {"mode": "weight_only"}},
    "dynamic": {"default": {"mode": "dynamic"}, "layers": {
        "2": {"activation": {"symmetric": True, "bits": 4}},  # int8 storage + Clip
        "4": {"activation": {"per_channel": True, "bits": 6}},  # per-channel ranges
    }},
}


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_layer_modes_and_bias_correction_export_faithfully(case, tmp_path) -> None:
    torch.manual_seed(0)
    qmodel = aq.quantize(mlp(3), DropEvaluator({}), MLP_CASES[case])
    path = export_onnx(qmodel, tmp_path / "m.onnx", (torch.randn(2, 8),))
    ops, inits = _ops(path), _initializers(path)
    assert ops["DequantizeLinear"] >= 3 and inits["0.weight_int"] == onnx.TensorProto.INT8
    if case == "weight_only":
        assert "QuantizeLinear" not in ops  # the activations stay float
    else:
        assert ops["QuantizeLinear"] == 3
    if case.startswith("dynamic"):
        assert ops["ReduceMin"] + ops["Min"] >= 3  # qparams computed in the graph
        assert "0.act_scale" not in inits
    if case == "bias_correction":
        deltas = [m.bias_delta for m in qmodel.modules() if isinstance(m, QuantLayer)]
        assert all(d.numel() == 8 for d in deltas) and any(bool(d.abs().gt(0).any())
                                                           for d in deltas)
        # bias + bias_delta: one int32 bias inside each Gemm (the pattern QGemm fuses)
        assert "Add" not in ops
        assert all(inits[f"{i}.bias_int"] == onnx.TensorProto.INT32 for i in (0, 2, 4))
    gen = torch.Generator().manual_seed(1)
    check_parity(qmodel, path, torch.randn(16, 8, generator=gen))
    # far outside the calibrated range: saturation (static) or a new range (dynamic)
    check_parity(qmodel, path, 6.0 * torch.randn(5, 8, generator=gen))


class Kinds(nn.Module):
    """Embedding, LSTM, bidirectional GRU, MultiheadAttention, QuantMatMul and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True, bidirectional=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mm = aq.QuantMatMul()
        self.head = nn.Linear(16, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        x, _ = self.lstm(x)
        x, _ = self.gru(x)
        a, _ = self.attn(x, x, x)
        scores = self.mm(a, a.transpose(1, 2)).softmax(-1)
        return self.head(scores @ a)


Calib = BatchCalibrator


# (config, number of activation QDQ points, of them dynamic); every layer has a mode and
# each kind is exported in at least two modes. attn's query = key = value is quantized once.
KIND_CASES = {
    "static_dynamic_weight_only_bias_correction": (
        {"bias_correction": True,
         "layers": {"lstm": {"mode": "dynamic"}, "gru": {"mode": "weight_only"}}},
        1 + 0 + 6 + 2 + 1, 1),  # lstm, gru, attn, mm, head
    "dynamic_static_weight_only": (
        {"default": {"mode": "dynamic"},
         "layers": {"lstm": {"mode": "static"}, "attn": {"mode": "weight_only"},
                    # a weight-only Linear on (N, T, C): onnxruntime would rewrite
                    # DequantizeLinear -> MatMul into MatMulNBits (an int8 input), the
                    # export keeps a 2-D Gemm
                    "head": {"mode": "weight_only"}}},
        1 + 1 + 0 + 2 + 0, 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(KIND_CASES))
def test_embedding_rnn_and_attention_kinds_export_faithfully(case, tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 20, (4, 3), generator=gen) for _ in range(3)]
    torch.manual_seed(0)
    config, acts, dynamic = KIND_CASES[case]
    qmodel = aq.quantize(Kinds().eval(), Calib(data), config)
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    ops, inits = _ops(path), _initializers(path)
    assert ops["LSTM"] == ops["GRU"] == 1 and ops["Gather"] >= 1
    # integer tables and gate matrices; no float copy of a quantized weight
    assert inits["emb.weight_int"] == onnx.TensorProto.INT8
    for name in ("attn.wint_in_proj_weight_0", "attn.wint_in_proj_weight_2",
                 "attn.wint_out_proj_weight"):
        assert inits[name] == onnx.TensorProto.INT8, name
    # the recurrent weights in ONNX's gate and direction layout: W and R of each
    rnn = [i for i in onnx.load(str(path)).graph.initializer
           if i.name.startswith(("lstm.", "gru.")) and len(i.dims) >= 2]
    assert len(rnn) == 4 and {i.data_type for i in rnn} == {onnx.TensorProto.INT8}
    matrices = [i.name for i in onnx.load(str(path)).graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2
                and sorted(i.dims)[-2] >= 5]
    assert not matrices  # float vectors only (biases, scales)
    # lstm 2, gru 2 (W and R, both directions in each), attn 4 (the packed q|k|v
    # in-projection as three integer weights, the out-projection), head 1 weights (emb: its
    # integer rows are gathered, then scaled); + the activation points; + the int32 bias
    # of the head where it runs an integer kernel
    head_bias = int(qmodel.head.integer_kernel)
    assert ops["DequantizeLinear"] == 9 + acts + head_bias and ops["QuantizeLinear"] == acts
    assert ops["ReduceMin"] == ops["ReduceMax"] == dynamic
    x = torch.randint(0, 20, (6, 3), generator=gen)
    check_parity(qmodel, path, x)
    if case.startswith("static"):  # the tolerance has teeth: a 1% error in one activation scale
        check_parity_catches_a_scale_error(qmodel, path, x, "attn.ascale_attn", tmp_path)


class PackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        out, _ = self.lstm(pack_padded_sequence(x, lengths, batch_first=True))
        return out.data


def test_untraceable_rnn_is_refused_naming_the_layer_its_kind_and_the_fix(tmp_path) -> None:
    data = [torch.randn(4, 5, 8)]
    torch.manual_seed(0)
    qmodel = aq.quantize(PackedLSTM().eval(), Calib(data))
    with pytest.raises(ExportError, match=r"layer 'lstm' \(QuantRNN\).*skip_layers"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    assert not (tmp_path / "m.onnx").exists()


class CrossAttention(nn.Module):
    """MultiheadAttention with separate q/k/v projection weights (kdim, vdim != embed)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x[..., :6], x[..., 3:])[0]


def test_weight_only_attention_projections_on_sequences_stay_exact_in_onnxruntime(
        tmp_path) -> None:
    # F.linear on (N, T, C) with a dequantized weight would become MatMulNBits in
    # onnxruntime (an int8 input); the export runs it as a 2-D Gemm
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 5, 8, generator=gen) for _ in range(2)]
    torch.manual_seed(0)
    qmodel = aq.quantize(CrossAttention().eval(), Calib(data),
                         {"default": {"mode": "weight_only"}})
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    assert "QuantizeLinear" not in _ops(path)
    assert _initializers(path)["attn.wint_k_proj_weight"] == onnx.TensorProto.INT8
    check_parity(qmodel, path, torch.randn(3, 5, 8, generator=gen))


class Encoder(nn.Module):
    """torch's own encoder layer: its forward reads ``self_attn.batch_first`` and would take
    a fused fast path over raw float weights in eval mode under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_torch_transformer_encoder_layer_exports_its_quantized_layers_not_the_fast_path(
        tmp_path, caplog) -> None:
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 5, 8, generator=gen) for _ in range(2)]
    torch.manual_seed(0)
    model = Encoder().eval()
    qmodel = aq.quantize(model, Calib(data), {"default": {"weight": {"bits": 4},
                                                           "activation": {"bits": 4}}})
    with torch.no_grad(), caplog.at_level(logging.WARNING):  # no_grad: the fast path's
        path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))  # precondition
        float_out, quant_out = model(data[1]), qmodel(data[1])
    # onnxscript's note on the attention's Split is nothing a user can act on
    assert "Skipping constant folding" not in caplog.text
    assert float((float_out - quant_out).abs().max()) > 1e-2  # W4A4 differs from float
    # the module the graph is traced from computes the searched model eagerly too, where
    # torch would take the fused path over raw float weights without the QDQ modules' hook
    work, _ = _export_copy(qmodel, quantized=True)
    with torch.no_grad():
        torch.testing.assert_close(work(data[1]), quant_out, atol=1e-5, rtol=1e-5)
    inits = _initializers(path)
    for name in ("layer.linear1.weight_int", "layer.linear2.weight_int",
                 "layer.self_attn.wint_in_proj_weight_1"):
        assert inits[name] == onnx.TensorProto.INT8, name
    check_parity(qmodel, path, data[1])


def test_lstm_with_projection_is_refused_before_a_broken_file_is_written(tmp_path) -> None:
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(8, 8, proj_size=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    data = [torch.randn(5, 2, 8)]
    torch.manual_seed(0)
    qmodel = aq.quantize(Projected().eval(), Calib(data))
    with pytest.raises(ExportError, match=r"layer 'rnn' is an nn.LSTM with proj_size=4.*"
                                          r"proj_size=0 with an nn.Linear"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    assert not (tmp_path / "m.onnx").exists()


class HalfLinear(nn.Linear):
    """A subclass with its own forward: the bias is inside the scaled output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class PaddedConv(nn.Conv2d):
    """timm's Conv2dSame pattern: pads in forward, then F.conv2d with the module's weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, [1, 1, 1, 1]),
                                          self.weight, self.bias) * 2.0


class Subclassed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = PaddedConv(3, 4, 3)
        self.fc = HalfLinear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_linear_and_conv_subclasses_with_their_own_forward_export_faithfully(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 6, 6, generator=gen)]
    torch.manual_seed(0)
    model = Subclassed().eval()
    with torch.no_grad():
        model.fc.bias.fill_(3.0)  # a bias moved out of the scaled output would be off by 1.5
        model.conv.bias.fill_(1.0)
    qmodel = aq.quantize(model, Calib(data))
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    check_parity(qmodel, path, torch.randn(5, 3, 6, 6, generator=gen))


class Vector(nn.Module):
    """A Linear on a 1-D input (an unbatched sample): ONNX MatMul, not Gemm, unless the
    export reshapes it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_linear_on_a_1d_input_stays_exact_in_onnxruntime(mode, tmp_path) -> None:
    # onnxruntime turns DequantizeLinear -> MatMul into MatMulNBits, which re-quantizes
    # its input on the fly; the export runs a 1-D F.linear as a 2-D Gemm
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, generator=gen) for _ in range(2)]
    torch.manual_seed(0)
    qmodel = aq.quantize(Vector().eval(), Calib(data), {"default": {"mode": mode}})
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    assert "MatMul" not in _ops(path)
    for _ in range(20):
        x = torch.randn(8, generator=gen)
        with torch.no_grad():
            ref = qmodel(x)
        assert float((ort_run(path, x) - ref).abs().max()) <= 1e-5 * (1 + float(ref.abs().max()))


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D`` as ``transformers.pytorch_utils`` defines it: a
    Linear whose weight is stored (in, out). Named as that class is, without transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


Conv1D.__module__ = "transformers.pytorch_utils"


def test_gpt2_conv1d_is_quantized_per_output_channel_and_runs_integer_kernels(
        tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 5, 8, generator=gen) for _ in range(2)]
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(16, 8), nn.GELU(), Conv1D(4, 16)).eval()
    with torch.no_grad():
        model[0].weight[:, 3] *= 50  # one output channel 50x wider: per-channel scales
    qmodel = aq.quantize(model, Calib(data))
    assert isinstance(qmodel[0], QuantLayer) and isinstance(qmodel[2], QuantLayer)
    scale = qmodel[0].weight_qparams(8)[0]
    assert scale.numel() == 16 and float(scale[3]) > 20 * float(scale[0])
    path, figures = export_checked(qmodel, tmp_path / "m.onnx", (data[0],))
    assert figures["integer_kernels"]["summary"].startswith("2 of 2")
    check_parity(qmodel, path, torch.randn(3, 5, 8, generator=gen))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.regular = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(torch.relu(self.grouped(torch.relu(self.regular(x)))))


def test_grouped_convolutions_run_float_where_the_integer_kernel_is_slower(tmp_path) -> None:
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    qmodel = aq.quantize(Grouped().eval(), BatchCalibrator(data))
    assert qmodel.regular.integer_kernel and qmodel.depthwise.integer_kernel
    assert not qmodel.grouped.integer_kernel
    _, figures = export_checked(qmodel, tmp_path / "m.onnx", (data[0],))  # parity checked
    kernels = figures["integer_kernels"]
    assert sorted(kernels["integer"]) == ["depthwise", "regular"]
    assert "grouped convolution (groups=4, not depthwise)" in kernels["float"]["grouped"]
