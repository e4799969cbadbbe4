"""ONNX QDQ export: the deployed graph computes what the fake-quant model computes.

Parity tolerance (stated in docs/deployment.md), with ``m = 1 + max|y|`` over the torch
fake-quant outputs ``y``: at least 90% of the onnxruntime outputs are within ``1e-4 * m`` of
torch, and all within ``5e-2 * m`` (on the digits data, 100% match within 2e-6). The graph
reproduces the quantizers (run eagerly in torch it matches the fake-quant model to float
rounding: ONNX divides by the scale where torch multiplies by its reciprocal); what remains
is float summation order in Conv/Gemm, which differs between any two runtimes and can move
a value lying at a rounding tie of the next quantizer by one step, rarely; such a flip
shifts the outputs of one sample slightly, so the share of matching outputs is not
required to be 100%.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.errors import ConfigError, ExportError
from autoquant.export import export_float_onnx, export_onnx, export_saved
from autoquant.export.onnx_export import export_checked
from autoquant.export.prepare import export_copy as _export_copy
from autoquant.export.qdq import QDQLayer
from autoquant.export.qdq_ops import dequantize_linear
from autoquant.quant.layers import QuantLayer
from tests.helpers.synthetic import BatchCalibrator

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx.numpy_helper")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tests.helpers.onnxcheck import (  # noqa: E402
    check_parity,
    check_parity_catches_a_scale_error,
    ort_run,
)


class AllKinds(nn.Module):
    """One of every quantizable layer kind on a single path; input (N, 3, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.t2 = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c3 = nn.Conv3d(1, 4, 3, padding=1)
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.t1 = nn.ConvTranspose1d(8, 4, 3)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(x))  # N, 8, 6, 6
        y = self.t2(y)  # N, 4, 12, 12
        z = self.c3(y.reshape(y.shape[0], 1, 4, 12, 12))  # N, 4, 4, 12, 12
        z = torch.relu(z.mean(dim=(3, 4)))  # N, 4, 4
        z = self.t1(torch.relu(self.c1(z)))  # N, 4, 6
        return self.fc(z.flatten(1))


Calib = BatchCalibrator


def _data(seed: int = 0, n: int = 4, shape: tuple[int, ...] = (8, 3, 6, 6)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


def _quantized(config: dict | None = None, seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = AllKinds().eval()
    data = _data(seed)
    return aq.quantize(model, Calib(data), config=config), data


def _graph(path) -> tuple[Counter, dict[str, int]]:
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    types = {i.name: i.data_type for i in model.graph.initializer}
    return ops, types


def _act_types(path) -> dict[str, int]:
    """{layer: storage type of its input QuantizeLinear} (by the layer's act_scale name;
    the exporter shares equal constants such as zero points between layers)."""
    model = onnx.load(str(path))
    types = {i.name: i.data_type for i in model.graph.initializer}
    return {n.input[1].rsplit(".", 1)[0]: types[n.input[2]] for n in model.graph.node
            if n.op_type == "QuantizeLinear"}


MIXED = {
    "default": {"weight": {"bits": 8}, "activation": {"bits": 8}},
    "layers": {
        # per-tensor affine weight, symmetric (signed int8) activation
        "t2": {"weight": {"per_channel": False, "symmetric": False},
               "activation": {"symmetric": True}},
        "c3": {"weight": {"bits": 16}, "activation": {"bits": 16}},  # int16 QDQ
        "c1": {"weight": {"bits": 4}, "activation": {"bits": 4}},  # stored in int8 + Clip
        "t1": {"activation": {"per_channel": True, "bits": 6}},  # per-channel, clamped
    },
    "skip_layers": ["fc"],  # stays float
}


def test_every_layer_kind_exports_as_int8_qdq_and_matches_fake_quant(tmp_path) -> None:
    qmodel, data = _quantized()
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    ops, types = _graph(path)
    # one Q/DQ per layer input, a DQ per weight, an int32 bias DQ per integer-kernel layer
    # (c2, c1, fc); the 3-D c3 runs a float Conv (QLinearConv is slower there), so its
    # output, read by a mean, is not requantized
    assert not qmodel.c3.integer_kernel and not qmodel.c3.requant
    assert not qmodel.c2.requant and not qmodel.c1.requant
    assert ops["QuantizeLinear"] == 6 and ops["DequantizeLinear"] == 12 + 3
    assert ops["Conv"] == 3 and ops["ConvTranspose"] == 2
    assert ops["Gemm"] + ops["MatMul"] == 1
    assert "Clip" not in ops  # 8-bit ranges are the storage types' own ranges
    assert set(_act_types(path).values()) == {onnx.TensorProto.UINT8}  # affine activations
    for layer in ("c2", "t2", "c3", "c1", "t1", "fc"):
        assert types[f"{layer}.weight_int"] == onnx.TensorProto.INT8
        assert f"{layer}.module.weight" not in types  # no float copy of the weight
    axes = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(".weight_int"):
            axes[node.input[0].split(".")[0]] = {a.name: a.i for a in node.attribute}["axis"]
    assert axes == {"c2": 0, "t2": 1, "c3": 0, "c1": 0, "t1": 1, "fc": 0}
    x = torch.cat(data[1:])  # other data than the example inputs, another batch size
    check_parity(qmodel, path, x)
    with torch.no_grad():  # the export graph run eagerly in torch: the same quantizers
        eager, ref = _export_copy(qmodel, quantized=True)[0](x), qmodel(x)
    assert float((eager - ref).abs().max()) <= 1e-5 * (1 + float(ref.abs().max()))
    # the tolerance has teeth: a 1% error in one activation scale breaks it
    check_parity_catches_a_scale_error(qmodel, path, x, "c2.act_scale", tmp_path)


def test_mixed_per_layer_settings_export_exactly(tmp_path) -> None:
    qmodel, data = _quantized(MIXED)
    assert not isinstance(qmodel.fc, QuantLayer)
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    ops, types = _graph(path)
    # c2's ReLU cannot fold into t2's signed input quantizer and c1 feeds t1's
    # per-channel one: both convolutions requantize their outputs themselves
    assert qmodel.c2.requant and qmodel.c1.requant and not qmodel.c3.integer_kernel
    assert ops["QuantizeLinear"] == 5 + 2
    assert types["fc.weight"] == onnx.TensorProto.FLOAT  # the float layer keeps its weight
    assert types["c2.weight_int"] == onnx.TensorProto.INT8
    assert types["t2.weight_int"] == onnx.TensorProto.UINT8  # per-tensor affine weight
    acts = _act_types(path)
    assert acts["t2"] == onnx.TensorProto.INT8  # symmetric activation
    assert types["c3.weight_int"] == acts["c3"] == onnx.TensorProto.INT16
    assert acts["c2"] == acts["c1"] == acts["t1"] == onnx.TensorProto.UINT8
    assert types["c1.weight_int"] == onnx.TensorProto.INT8
    assert ops["Clip"] == 1  # c1's 4-bit per-tensor range; t1's per-channel one: Max/Min
    assert ops["Max"] + ops["Min"] >= 2 or ops["Clip"] == 2
    model = onnx.load(str(path))
    t1_q = [n for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] == "t1.act_scale"]
    assert {a.name: a.i for a in t1_q[0].attribute}["axis"] == 1
    check_parity(qmodel, path, torch.cat(data[1:]))
    # far outside the calibrated ranges: the 4-bit activation saturates at 15, not at 255
    check_parity(qmodel, path, 8.0 * data[1])


def test_integer_weights_dequantize_to_the_searched_weights_bit_for_bit() -> None:
    qmodel, _ = _quantized(MIXED)
    layers = [m for m in qmodel.modules() if isinstance(m, QuantLayer)]
    assert len(layers) == 5
    for layer in layers:
        qdq = QDQLayer(layer)
        weight = dequantize_linear(qdq.weight_int, qdq.weight_scale, qdq.weight_zero_point,
                                   qdq.weight_axis)
        assert torch.equal(weight, layer.quantized_weight()), layer.layer_name


def test_int8_export_is_about_4x_smaller_than_the_float_export(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    data = _data(shape=(16, 256))
    qmodel = aq.quantize(model, Calib(data))
    q_path = export_onnx(qmodel, tmp_path / "q.onnx", (data[0],))
    f_path = export_float_onnx(qmodel, tmp_path / "f.onnx", (data[0],))
    ratio = f_path.stat().st_size / q_path.stat().st_size
    assert 3.5 <= ratio <= 4.1, ratio
    with torch.no_grad():
        assert torch.allclose(ort_run(f_path, data[1]), model(data[1]), atol=1e-5)
    check_parity(qmodel, q_path, data[1])


def test_sixteen_bit_layers_need_opset_21(tmp_path) -> None:
    qmodel, data = _quantized(MIXED)
    with pytest.raises(ExportError, match=r"opset 21.*opset=21"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), opset=19)
    with pytest.raises(ConfigError, match="opset must be an int"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), opset=11)
    assert not (tmp_path / "m.onnx").exists()


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.gate = Gate()
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gate(self.fc1(x)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:  # data-dependent Python control flow: not traceable
            return x
        return -x


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = SvdHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


class SvdHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x)[0]  # no ONNX translation


@pytest.mark.parametrize(("cls", "layer", "pattern"), [
    (DataDependent, "gate", "could not trace"),
    (Unsupported, "head", "refused op .*svd"),
])
def test_unexportable_model_raises_export_error_naming_layer_and_leaves_model_intact(
        cls, layer, pattern, tmp_path) -> None:
    torch.manual_seed(0)
    data = _data(shape=(5, 4), n=2)
    qmodel = aq.quantize(cls().eval(), Calib(data))
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    with pytest.raises(ExportError, match=pattern) as info:
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    assert f"'{layer}'" in str(info.value)
    assert isinstance(qmodel.fc1 if cls is DataDependent else qmodel.fc, QuantLayer)
    after = qmodel.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "m.onnx").exists()


class TinyEval:
    higher_is_better = True

    def __init__(self, data: list[torch.Tensor]) -> None:
        self.data = data
        self.reference: list[torch.Tensor] | None = None

    def calibration(self, model: nn.Module) -> None:
        for x in self.data:
            model(x)

    def evaluate(self, model: nn.Module) -> float:
        outs = [model(x) for x in self.data]
        if self.reference is None:
            self.reference = outs
        cos = [torch.nn.functional.cosine_similarity(o.flatten(), r.flatten(), dim=0)
               for o, r in zip(outs, self.reference, strict=True)]
        return float(torch.stack(cos).mean())


def test_search_result_export_records_deployment_figures_and_saved_export_matches(
        tmp_path) -> None:
    torch.manual_seed(0)
    model = AllKinds().eval()
    data = _data()
    result = aq.auto_quantize(model, TinyEval(data), (data[0],), max_loss=0.05)
    path = result.export_onnx(tmp_path / "r.onnx")
    figures = result.deployment
    assert figures["file_bytes"] == path.stat().st_size
    assert figures["matching_outputs"] >= 0.9
    assert figures["max_abs_diff"] <= 5e-2 * (1 + float(result.model(data[0]).abs().max()))
    assert figures["onnxruntime_ms"] > 0 and figures["torch_fake_quant_ms"] > 0
    assert result.to_report()["deployment"]["export"]["opset"] == 21
    assert isinstance(result.model.c2, QuantLayer) or result.plan["c2"] == "float"

    saved = result.save(tmp_path / "saved")
    out = export_saved(saved, tmp_path / "s.onnx", model=model, example_inputs=(data[0],))
    assert torch.equal(ort_run(out, data[1]), ort_run(path, data[1]))
    report = json.loads((saved / "report.json").read_text())
    assert report["deployment"]["export"]["file_bytes"] == out.stat().st_size
    with pytest.raises(ConfigError, match="job.yaml"):
        export_saved(saved, tmp_path / "t.onnx")


def test_export_without_example_inputs_is_a_clear_error(tmp_path) -> None:
    qmodel, _ = _quantized()
    with pytest.raises(ConfigError, match="example_inputs"):
        export_onnx(qmodel, tmp_path / "m.onnx", None)


@pytest.mark.slow
def test_searched_digits_model_deployed_in_onnxruntime_keeps_its_accuracy(tmp_path) -> None:
    pytest.importorskip("sklearn")
    from autoquant.evaluators import ClassificationEvaluator
    from examples.digits.model import load_data, make_loaders
    from examples.digits.train import get_trained_model

    model = get_trained_model()
    _, val_loader = make_loaders(batch_size=64)
    images, labels = load_data().val
    result = aq.auto_quantize(model, ClassificationEvaluator(val_loader), (images[:64],),
                              max_loss=0.01)
    path = result.export_onnx(tmp_path / "digits.onnx", measure=False)
    logits = ort_run(path, images)
    with torch.no_grad():
        ref = result.model(images)
    diff, scale = (logits - ref).abs(), 1.0 + float(ref.abs().max())
    assert float((diff <= 1e-4 * scale).float().mean()) >= 0.9
    assert float(diff.max()) <= 5e-2 * scale
    acc_onnx = float((logits.argmax(1) == labels).float().mean())
    assert result.quant_metric is not None
    assert abs(acc_onnx - result.quant_metric) <= 0.002, (acc_onnx, result.quant_metric)


QUIET_EXPORT = """
import logging, sys, torch
from torch import nn
import autoquant as aq
from autoquant.export import export_onnx
from tests.helpers.synthetic import BatchCalibrator
logging.basicConfig(level=logging.WARNING)
registry = logging.getLogger("torch.onnx._internal.exporter._registration")
registry.setLevel(logging.INFO)
data = [torch.randn(4, 8)]
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
export_onnx(aq.quantize(model, BatchCalibrator(data)), sys.argv[1], (data[0],))
assert registry.level == logging.INFO, registry.level  # the user's setting is restored
print("exported")
"""


def test_export_keeps_torch_exporter_noise_off_the_console(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    # a fresh process: torch logs its registry notes on the first export of a process only
    proc = subprocess.run([sys.executable, "-W", "default", "-c", QUIET_EXPORT,
                           str(tmp_path / "m.onnx")], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "exported" in proc.stdout, proc.stderr[-2000:]
    assert "torchvision is not installed" not in proc.stderr
    assert "LeafSpec" not in proc.stderr and "FutureWarning" not in proc.stderr


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_convolution_with_a_copying_padding_mode_runs_its_integer_kernel(mode, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    data = _data()
    qmodel = aq.quantize(model, Calib(data))
    _, figures = export_checked(qmodel, tmp_path / "m.onnx", (data[0],))  # parity checked
    assert figures["integer_kernels"]["float"] == {}
