"""Odd or hostile models get the right answer or autoquant's own error: user hooks kept,
NaN outputs ranked worst, NaN weights refused, a copy sharing the user's modules refused,
empty layers skipped, per-channel statistics never reset, layer names never paths, and
tampered saved scales refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.config import QuantConfig
from autoquant.errors import EvaluatorError, ModelError
from autoquant.evaluators import FidelityEvaluator
from autoquant.io.checkpoint import load_state_dict_file
from autoquant.io.names import STATE_FILE
from autoquant.quant.qmodel import QuantModel
from autoquant.quant.wrapping import all_finite
from autoquant.sensitivity.ranking import NONFINITE_SCORE, compute_sensitivity
from tests.helpers.synthetic import BatchCalibrator, DropEvaluator, mlp


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_a_user_forward_hook_on_a_linear_still_applies_when_quantized(tmp_path):
    model = mlp(3)
    model[2].register_forward_hook(lambda module, inputs, out: out * 2)
    x = torch.randn(32, 8)
    result = aq.auto_quantize(model, FidelityEvaluator(model, [x]), (x[:1],), max_loss=0.05)
    assert result.quantized_layers  # the hooked layer is among them
    assert relative_error(result.model(x), model(x)) < 0.1  # 0.75 without the hook
    # the parity check passes: the hook is exported
    result.export_onnx(tmp_path / "m.onnx", measure=False)


def test_a_layer_with_nan_quantized_output_is_ranked_most_sensitive_not_identical():
    model = mlp(4)
    qmodel = QuantModel(model, QuantConfig(), None)
    data = [torch.randn(8, 8) for _ in range(2)]

    def calibrate(net, where):
        for x in data:
            net(x)

    qmodel.calibrate(calibrate)
    with torch.no_grad():  # weights broken after the checks: the quantized output is NaN
        qmodel.layers["6"].module.weight[0, 0] = float("nan")  # the last: nothing downstream
    ranking = compute_sensitivity(qmodel, calibrate)
    assert ranking[0].name == "6" and ranking[0].score == NONFINITE_SCORE
    assert all(r.score > -1.0 for r in ranking[1:])  # the others keep their cosine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_all_finite_sees_one_nan_or_infinity_in_any_float_dtype(dtype):
    x = torch.randn(4, 33, 7).to(dtype)
    assert all_finite(x) and all_finite(x[:0]) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3, 32, 6] = bad
        assert not all_finite(y), bad
    assert all_finite(torch.full((3,), torch.finfo(dtype).max, dtype=dtype))  # no overflow


def test_nan_or_inf_weights_are_refused_naming_the_layer():
    model = mlp(3)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"layer '2'.*'weight' holds 1 NaN or inf"):
        aq.auto_quantize(model, DropEvaluator({}), max_loss=0.1)


class SelfCopying(nn.Linear):
    def __deepcopy__(self, memo):
        return self


def test_a_copy_that_shares_modules_with_the_user_model_is_refused():
    model = nn.Sequential(SelfCopying(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    with pytest.raises(ModelError, match=r"kept '0' \(SelfCopying\) as the very same object"):
        aq.auto_quantize(model, DropEvaluator({}), max_loss=0.1)
    assert type(model[0]) is SelfCopying and not model[0]._forward_pre_hooks
    assert all(type(m).__module__.startswith(("torch", __name__)) for m in model.modules())


def test_a_layer_with_an_empty_weight_stays_float():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 0)).eval()
    result = aq.auto_quantize(model, BatchCalibrator([torch.randn(4, 8)]), max_loss=1.0)
    assert result.plan == {"0": result.plan["0"]}  # '1' is not a searchable layer


def test_per_channel_statistics_refuse_a_changing_channel_axis():
    config = {"default": {"activation": {"per_channel": True}}}
    seq = nn.Sequential(nn.Conv1d(3, 4, 1)).eval()
    batches = BatchCalibrator([torch.randn(2, 3, 5), torch.randn(2, 3, 7)])
    aq.auto_quantize(seq, batches, max_loss=1.0, config=config)  # channels fixed: fine

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 5)

        def forward(self, x):  # x: (batch, seq, 5): axis 1 (seq) changes between batches
            return self.lin(x)

    varying = BatchCalibrator([torch.randn(2, 3, 5), torch.randn(2, 4, 5)])
    with pytest.raises(EvaluatorError, match=r"layer 'lin' need the same size of axis 1.*got "
                                             r"3 then 4"):
        aq.auto_quantize(Flat().eval(), varying, max_loss=1.0, config=config)


def test_layer_names_never_become_paths_outside_dump_dir(tmp_path):
    outside = tmp_path / "outside"
    model = nn.Sequential()
    model.add_module(str(outside), nn.Linear(8, 8))  # an absolute path as a layer name
    model.add_module("~", nn.Linear(8, 8))
    dump = tmp_path / "dump"
    aq.auto_quantize(model.eval(), DropEvaluator({}), max_loss=1.0, dump_dir=dump)
    assert not outside.exists()
    written = {p.resolve() for p in tmp_path.rglob("*.pt")}
    assert written and all(dump.resolve() in p.parents for p in written)


def test_load_quantized_refuses_zeroed_scales(tmp_path):
    model = mlp(3)
    result = aq.auto_quantize(model, DropEvaluator({}), max_loss=1.0)
    folder = result.save(tmp_path / "saved")
    state = load_state_dict_file(Path(folder) / STATE_FILE, "the saved state")
    key = next(k for k in state if k.endswith("scale") and state[k].is_floating_point())
    state[key] = torch.zeros_like(state[key])
    torch.save(state, Path(folder) / STATE_FILE)
    with pytest.raises(ModelError, match=r"quantization scale .* zero, negative, NaN or inf"):
        aq.load_quantized(copy.deepcopy(model), folder)
