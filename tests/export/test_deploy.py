"""What is deployed is what was searched: deploy targets, integer kernels in onnxruntime's
optimized graph, the parity check of every export, the deployed metric, dynamic axes.

Every onnxruntime session here uses default session options (all graph optimizations), so
on a CPU without VNNI its u8×s8 kernels saturate unless the weights fit the target.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.config import QuantConfig
from autoquant.errors import ConfigError, ExportError
from autoquant.evaluators import Evaluator, FidelityEvaluator
from autoquant.export import export_checked, export_float_onnx, export_onnx
from autoquant.quant.layers import QuantLayer
from autoquant.quant.quantizer import fake_quantize
from autoquant.quant.target import deploy_weight_bits, host_target, runs_exactly_on
from tests.helpers.synthetic import BatchCalibrator

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from autoquant.export.ortmodule import OnnxModule  # noqa: E402
from autoquant.export.runtime import check_parity  # noqa: E402
from tests.helpers.onnxcheck import optimized_ops  # noqa: E402


def _batches(shape: tuple[int, ...], n: int = 3, seed: int = 0, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * scale for _ in range(n)]


class ResCNN(nn.Module):
    """Conv-BN-ReLU, max pooling, a residual add, a flatten and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 16, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        x = torch.relu(self.c3(x) + x)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def res_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = ResCNN().eval()
    for bn in (model.b1, model.b2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def tanh_mlp(depth: int = 16, width: int = 64) -> nn.Sequential:
    """Saturated tanh layers: inputs to every Linear near ±1, weights with large rows; a
    u8×s8 kernel without VNNI overflows its int16 pair sums on 8-bit weights."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.normal_(linear.weight, std=2.0 / width**0.5)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers).eval()


# -- deploy targets ----------------------------------------------------------------------------
def test_x86_target_without_vnni_gives_8bit_weights_7bits_so_no_pair_sum_saturates() -> None:
    assert deploy_weight_bits(8, True, "x86_avx2") == 7
    for target in ("x86_vnni", "arm", "reference"):
        assert deploy_weight_bits(8, True, target) == 8
    assert deploy_weight_bits(8, False, "x86_avx2") == 8  # u8×u8 is exact
    assert deploy_weight_bits(4, True, "x86_avx2") == 4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    qmodel = aq.quantize(model, BatchCalibrator(_batches((8, 64))), {"target": "x86_avx2"})
    layer = qmodel[0]
    ints = torch.round(layer.quantized_weight() / layer.weight_scale.reshape(-1, 1))
    assert int(ints.min()) >= -64 and int(ints.max()) <= 63
    # the worst u8·s8 pair sum of VPMADDUBSW stays inside int16
    assert 2 * 255 * int(ints.abs().max()) <= 32767
    assert runs_exactly_on("x86_avx2", "x86_avx2") and not runs_exactly_on("x86_vnni",
                                                                            "x86_avx2")


def test_auto_target_resolves_to_this_cpu_and_the_saved_config_holds_it(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    evaluator = FidelityEvaluator(model, _batches((4, 8)))
    result = aq.auto_quantize(model, evaluator, max_loss=0.5)
    assert result.config.target == host_target() != "auto"
    assert result.target == host_target()
    result.save(tmp_path)
    assert QuantConfig.load(tmp_path / "quant_config.yaml").target == host_target()
    assert result.to_report()["settings"]["target"] == host_target()


def test_unknown_target_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"x86_avx2.*did you mean 'x86_avx2'"):
        QuantConfig.from_dict({"target": "x86_avx"})


def test_exporting_for_a_cpu_the_searched_arithmetic_does_not_fit_is_an_error(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    data = _batches((4, 8))
    qmodel = aq.quantize(model, BatchCalibrator(data), {"target": "x86_vnni"})
    with pytest.raises(ExportError, match="searched for target 'x86_vnni'.*x86_avx2"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), target="x86_avx2", check=False)
    assert not (tmp_path / "m.onnx").exists()
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), target="x86_avx2",
                       allow_target_mismatch=True, check=False)
    assert path.is_file()
    portable = aq.quantize(model, BatchCalibrator(data), {"target": "x86_avx2"})
    export_onnx(portable, tmp_path / "p.onnx", (data[0],), target="x86_vnni", check=False)


def test_unsigned_weights_deploy_as_int8_with_a_shifted_zero_point_on_a_vnni_target(
        tmp_path) -> None:
    # onnxruntime's u8xu8 kernel has no VNNI path; int8 with a zero point runs u8xs8 (VNNI)
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 4)).eval()
    data = _batches((4, 3, 6, 6))
    stored = {}
    for target in ("x86_vnni", "x86_avx2"):
        qmodel = aq.quantize(model, BatchCalibrator(data), {
            "target": target, "default": {"weight": {"symmetric": False}}})
        path, figures = export_checked(qmodel, tmp_path / f"{target}.onnx", (data[0],),
                                       allow_target_mismatch=True)
        assert figures["integer_kernels"]["summary"].startswith("2 of 2")
        graph = onnx.load(str(path)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        weights = [(inits[n.input[0]], inits[n.input[2]]) for n in graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in inits
                   and inits[n.input[0]].ndim > 1]
        assert len(weights) == 2
        stored[target] = weights
        if runs_exactly_on(target):  # this CPU computes the file as searched
            assert figures["parity_ok"], figures
        ops = optimized_ops(path, tmp_path)
        assert {"QGemm", "QLinearConv"} <= ops, ops
    for (w_vnni, zp_vnni), (w_avx2, zp_avx2) in zip(stored["x86_vnni"], stored["x86_avx2"],
                                                    strict=True):
        assert str(w_vnni.dtype) == "int8" and str(w_avx2.dtype) == "uint8"
        assert bool((zp_vnni.astype("int32") != 0).any())  # a real zero point, not symmetric
        # the same integers, shifted: the dequantized weights are equal
        assert (w_vnni.astype("int32") + 128 == w_avx2.astype("int32")).all()
        assert (zp_vnni.astype("int32") + 128 == zp_avx2.astype("int32")).all()


# -- integer kernels -----------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [(res_cnn, (8, 3, 16, 16)), (tanh_mlp, (16, 64))])
def test_every_conv_and_linear_runs_an_integer_kernel_in_the_optimized_graph(
        make, shape, tmp_path) -> None:
    data = _batches(shape, scale=3.0 if make is tanh_mlp else 1.0)
    qmodel = aq.quantize(make(), BatchCalibrator(data))
    path, figures = export_checked(qmodel, tmp_path / "m.onnx", (data[0],),
                                   check_inputs=[(x,) for x in data[1:]])
    layers = [n for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    coverage = figures["integer_kernels"]
    assert coverage["float"] == {} and sorted(coverage["integer"]) == sorted(layers)
    assert coverage["summary"] == f"{len(layers)} of {len(layers)} quantized layers run " \
                                  "integer kernels"
    assert figures["parity_ok"]
    # read the optimized graph independently: integer ops only, no float Conv/Gemm left
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert not {"Conv", "FusedConv", "Gemm", "MatMul"} & set(ops)
    assert ops.count("QLinearConv") + ops.count("QGemm") == len(layers)


def test_a_convolution_read_by_an_add_requantizes_its_output_in_search_and_export() -> None:
    data = _batches((8, 3, 16, 16))
    qmodel = aq.quantize(res_cnn(), BatchCalibrator(data))
    # c1 feeds c2 through ReLU + max pooling: c2's input quantizer is its output Q;
    # c2's output goes to c3 and to the add, c3's to the add: both quantize their own
    assert not qmodel.c1.requant and qmodel.c2.requant and qmodel.c3.requant
    assert not qmodel.fc1.requant  # QGemm takes a float output: no requantization
    layer = qmodel.c3
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        y = layer(x)
    step = float(layer.out_scale)
    ints = (y / step).round() + float(layer.out_zero_point)
    assert torch.allclose(y / step, (ints - float(layer.out_zero_point)), atol=1e-3)


def test_layers_that_cannot_run_integer_kernels_are_reported_with_the_reason(
        tmp_path, caplog) -> None:
    data = _batches((8, 3, 16, 16))
    config = {"layers": {"c2": {"weight": {"bits": 16}, "activation": {"bits": 16}},
                         "fc1": {"mode": "dynamic"}, "fc2": {"mode": "weight_only"}}}
    qmodel = aq.quantize(res_cnn(), BatchCalibrator(data), config)
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        _, figures = export_checked(qmodel, tmp_path / "m.onnx", (data[0],))
    floats = figures["integer_kernels"]["float"]
    assert set(floats) == {"c2", "fc1", "fc2"}
    assert "16-bit" in floats["c2"] and "dynamic" in floats["fc1"]
    assert "weight-only" in floats["fc2"]
    assert "3 quantized layer(s) run in float" in caplog.text


# -- the parity check of every export ------------------------------------------------------------
def test_saturating_tanh_mlp_exports_what_was_searched_with_default_session_options(
        tmp_path) -> None:
    data = _batches((32, 64), scale=3.0)
    model = tanh_mlp()
    evaluator = FidelityEvaluator(model, [(x,) for x in data])
    result = aq.auto_quantize(model, evaluator, (data[0],), max_loss=0.2, verify_deploy=True)
    path = result.export_onnx(tmp_path / "m.onnx", measure=False)
    figures = result.deployment
    assert figures["parity_ok"] and figures["relative_error"] <= 0.03
    deployed = evaluator.evaluate(OnnxModule(path, result.model, (data[0],)))
    assert abs(deployed - result.quant_metric) <= 2e-3
    assert result.met_on_deploy and abs(result.deployed_metric - result.quant_metric) <= 2e-3


@pytest.mark.skipif(host_target() != "x86_avx2", reason="saturation needs a CPU without VNNI")
def test_int8_weights_saturate_this_cpu_and_the_check_names_the_first_layer(tmp_path) -> None:
    data = _batches((32, 64), scale=3.0)
    qmodel = aq.quantize(tanh_mlp(), BatchCalibrator(data), {"target": "reference"})
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), check=False)
    with pytest.raises(ExportError, match=r"first layer that diverges is '0'.*target"):
        check_parity(qmodel, path, [(data[1],)])


def test_an_export_that_diverges_is_an_error_naming_the_layer_and_writes_no_file(
        tmp_path, monkeypatch, caplog) -> None:
    from autoquant.export.qdq import QDQLayer

    data = _batches((8, 3, 16, 16))
    qmodel = aq.quantize(res_cnn(), BatchCalibrator(data))
    forward = QDQLayer.forward

    def wrong(self, x, *args, **kwargs):  # the graph of c3 computes 20% too much
        y = forward(self, x, *args, **kwargs)
        return y * 1.2 if self.layer_name == "c3" else y

    monkeypatch.setattr(QDQLayer, "forward", wrong)
    with pytest.raises(ExportError, match=r"first layer that diverges is 'c3'"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    assert not (tmp_path / "m.onnx").exists()
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), strict=False)
    assert path.is_file() and "first layer that diverges is 'c3'" in caplog.text


def test_fake_quantize_rounds_ties_as_onnx_quantize_linear_divides() -> None:
    from onnx import TensorProto, helper, numpy_helper

    # a scale and values on rounding ties where x * (1 / s) and x / s round differently
    for i in range(1, 200):
        scale = torch.tensor(i / 997.0)
        x = (torch.arange(-100, 100) + 0.5) * scale
        if bool((torch.round(x * (1 / scale)) != torch.round(x / scale)).any()):
            break
    assert bool((torch.round(x * (1 / scale)) != torch.round(x / scale)).any())
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(scale.numpy(), "s"),
         numpy_helper.from_array(torch.tensor(128, dtype=torch.uint8).numpy(), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    theirs = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    ours = fake_quantize(x, scale, torch.tensor(128), 0, 255)
    assert torch.equal(ours, theirs)


# -- the deployed metric -------------------------------------------------------------------------
def test_onnx_module_returns_the_model_output_structure(tmp_path) -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = torch.relu(self.body(x))
            return {"logits": self.a(h), "aux": (self.b(h), None)}

    data = _batches((4, 8))
    qmodel = aq.quantize(TwoHeads().eval(), BatchCalibrator(data))
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    deployed = OnnxModule(path, qmodel, (data[0],))
    out = deployed(data[1])
    with torch.no_grad():
        ref = qmodel(data[1])
    assert set(out) == {"logits", "aux"} and out["aux"][1] is None
    torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["aux"][0], ref["aux"][0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="takes 1 input tensor"):
        deployed(data[0], data[1])


class _DeployAware(Evaluator):
    """Scores the deployed ONNX model lower when more than `limit` layers are quantized:
    a runtime gap the fake-quant model does not show (as a saturating kernel would)."""

    def __init__(self, data: list[torch.Tensor], limit: int) -> None:
        self.data, self.limit = data, limit
        self.deployed_calls = 0

    def calibration(self, model: nn.Module) -> None:
        for x in self.data:
            model(x)

    def evaluate(self, model: nn.Module) -> float:
        if isinstance(model, OnnxModule):
            self.deployed_calls += 1
            n = sum(1 for init in onnx.load(str(model.path)).graph.initializer
                    if init.name.endswith(".weight_int"))
            return 1.0 if n <= self.limit else 0.0
        quantized = sum(isinstance(m, QuantLayer) and m.scheme != "float"
                        for m in model.modules())
        return 1.0 - 0.001 * quantized


def test_a_plan_that_misses_the_budget_once_deployed_is_not_reported_met(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.ReLU())]).eval()
    data = _batches((8, 8))
    evaluator = _DeployAware(data, limit=2)
    result = aq.auto_quantize(model, evaluator, (data[0],), max_loss=0.01,
                              verify_deploy=True)
    assert result.status == "met" and result.met_on_deploy
    assert len(result.quantized_layers) <= 2
    assert [c.passed for c in result.deploy_checks][-1] and not all(
        c.passed for c in result.deploy_checks)
    rejected = [r for r in result.history if "failed once deployed" in r.label]
    assert rejected and not any(r.passed for r in rejected)
    # the rejected plans kept more layers quantized than the one returned
    assert all(len(r.fallback_layers) < len(result.fallback_layers) for r in rejected)
    # every deploy check is an evaluation
    assert result.num_evaluations == len(result.history) + len(result.deploy_checks)
    assert evaluator.deployed_calls == len(result.deploy_checks)
    report = result.to_report()
    assert report["deployment"]["met_on_deploy"] is True
    assert len(report["deployment"]["checks"]) == len(result.deploy_checks)


def test_searched_digits_model_deployed_metric_equals_the_searched_one() -> None:
    from autoquant.evaluators import ClassificationEvaluator
    from examples.digits.model import load_data, make_loaders
    from examples.digits.train import get_trained_model

    _, val_loader = make_loaders(batch_size=64)
    images, _ = load_data().val
    result = aq.auto_quantize(get_trained_model(), ClassificationEvaluator(val_loader),
                              (images[:64],), max_loss=0.01, verify_deploy=True)
    assert result.met_on_deploy
    assert abs(result.deployed_metric - result.quant_metric) <= 0.002  # 0.2 points
    check = result.deploy_checks[-1].export
    assert check["integer_kernels"]["float"] == {}


# -- the graph signature -------------------------------------------------------------------------
def test_named_inputs_outputs_and_dynamic_image_size(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    data = _batches((2, 3, 12, 12))
    qmodel = aq.quantize(model, BatchCalibrator(data))
    path = export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), input_names=["images"],
                       output_names=["features"],
                       dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}})
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["features"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 20, 16)
    out = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
    with torch.no_grad():
        assert out.shape == (5, 4, 20, 16)
        torch.testing.assert_close(out, qmodel(x), atol=1e-4, rtol=1e-4)
    float_path = export_float_onnx(qmodel, tmp_path / "f.onnx", (data[0],),
                                   dynamic_axes={"input": [0, 2]})
    dims = [d.dim_param for d in onnx.load(str(float_path)).graph.input[0].type.tensor_type
            .shape.dim]
    assert dims[0] == "input_dim0" and dims[2] == "input_dim2" and dims[1] == dims[3] == ""


def test_bad_signature_arguments_are_config_errors_naming_the_choices(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    data = _batches((4, 8))
    qmodel = aq.quantize(model, BatchCalibrator(data))
    with pytest.raises(ConfigError, match="dynamic_axes names 'img'.*input"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), dynamic_axes={"img": [0]})
    with pytest.raises(ConfigError, match="input_names has 2 name"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), input_names=["a", "b"])
    with pytest.raises(ConfigError, match="axis 5"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],), dynamic_axes={"input": [5]})


def test_a_machine_without_onnxruntime_gets_an_error_naming_the_extra(monkeypatch,
                                                                       tmp_path) -> None:
    import builtins

    real = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args, **kwargs)

    model = nn.Sequential(nn.Linear(8, 4)).eval()
    data = _batches((4, 8))
    qmodel = aq.quantize(model, BatchCalibrator(data))
    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ConfigError, match=r"autoquant\[onnx\]"):
        export_onnx(qmodel, tmp_path / "m.onnx", (data[0],))
    assert dataclasses.is_dataclass(QuantConfig)  # the rest of autoquant still works
