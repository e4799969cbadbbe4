"""Models with weight_norm / spectral_norm parametrizations and torch.nn.utils.prune masks:
the searched layers compute with their fake-quant weight as is, the deployed graph matches,
and the user's model keeps its parametrizations untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import autoquant as aq
from autoquant.evaluators import FidelityEvaluator
from autoquant.quant.layers import QuantLayer
from tests.helpers.synthetic import BatchCalibrator

W4 = {"default": {"weight": {"bits": 4}}}


def net(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    if kind == "weight_norm":
        parametrizations.weight_norm(model[0])
        parametrizations.weight_norm(model[3])
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(model[3])
    elif kind == "prune":  # pruned, never run: `weight` is a non-leaf tensor attribute
        prune.l1_unstructured(model[0], "weight", 0.5)
        prune.random_unstructured(model[3], "weight", 0.3)
    return model.eval()


DATA = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "prune"])
def test_quantized_layers_compute_with_their_fake_quant_weight_as_is(kind) -> None:
    model = net(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = aq.quantize(model, BatchCalibrator(DATA), W4)
    layer = qmodel[3]
    x = torch.randn(5, 288)
    with torch.no_grad():
        expected = F.linear(layer.quantize_input(x), layer.quantized_weight(),
                            layer.quantized_bias())
        torch.testing.assert_close(layer(x), expected)
        # the fake-quant weight is the quantized eval-mode weight of the user's layer
        step = layer.weight_scale.reshape(-1, 1)
        assert float((layer.quantized_weight() - model[3].weight).abs().max()) <= \
            float(step.max()) / 2 + 1e-6
    if kind == "prune":  # pruned weights stay exactly zero after quantization
        assert bool((layer.quantized_weight()[model[3].weight_mask == 0] == 0).all())
    # the user's model is untouched: same tensors, parametrizations and pruning hooks
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if kind != "prune":
        assert parametrize.is_parametrized(model[3], "weight")
        assert model[3].weight.shape == (10, 288)  # the generated class still works
    else:
        assert hasattr(model[3], "weight_orig") and model[3]._forward_pre_hooks


def test_a_deep_copy_of_a_quantized_model_keeps_its_quant_layers() -> None:
    # a wrapper must not hand copy.deepcopy the __deepcopy__ of the module it wraps
    qmodel = aq.quantize(net("weight_norm"), BatchCalibrator(DATA), W4)
    clone = copy.deepcopy(qmodel)
    assert isinstance(clone[0], QuantLayer) and isinstance(clone[3], QuantLayer)
    with torch.no_grad():
        torch.testing.assert_close(clone(DATA[0]), qmodel(DATA[0]))


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "prune"])
def test_save_reload_and_onnx_export_reproduce_the_searched_model(kind, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from autoquant.export import export_onnx

    model = net(kind)
    result = aq.auto_quantize(model, FidelityEvaluator(model, DATA), (DATA[0],),
                              max_loss=0.05, config=W4)
    assert result.quantized_layers  # something to export
    qmodel = result.model
    result.save(tmp_path)
    reloaded = aq.load_quantized(net(kind), tmp_path)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), qmodel(x))
    from tests.helpers.onnxcheck import ort_run

    path = export_onnx(qmodel, tmp_path / "m.onnx", (DATA[0],))
    with torch.no_grad():
        torch.testing.assert_close(ort_run(path, x), qmodel(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "prune"])
def test_the_quantized_copy_pickles_for_worker_processes(kind) -> None:
    # workers=N sends the model to each process; weight_norm leaves a local-function
    # load_state_dict hook behind, which pickle refuses
    import pickle

    qmodel = aq.quantize(net(kind), BatchCalibrator(DATA), W4)
    clone = pickle.loads(pickle.dumps(qmodel))
    with torch.no_grad():
        torch.testing.assert_close(clone(DATA[0]), qmodel(DATA[0]))
