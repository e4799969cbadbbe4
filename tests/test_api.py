"""The public API end to end: safety, errors, save/load, sensitivity, AMCT names."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import autoquant as aq
import autoquant.report.build
from autoquant.evaluators import Evaluator, FidelityEvaluator
from autoquant.quant.layers import QuantLayer
from autoquant.report.build import REPORT_SCHEMA_VERSION
from tests.helpers.synthetic import DropEvaluator, ListEvaluator, linear_names, mlp

ROOT = Path(__file__).resolve().parents[1]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(),
                                  nn.Linear(16, 4))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def convnet():
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def fidelity(model, n=4):
    torch.manual_seed(1)
    return FidelityEvaluator(model, [torch.randn(8, 3, 6, 6) for _ in range(n)])


def test_user_model_is_never_mutated():
    model = convnet().train()
    before = copy.deepcopy(model.state_dict())
    ev = fidelity(model)
    result = aq.auto_quantize(model, ev, (torch.randn(1, 3, 6, 6),), max_loss=1e-4)
    assert model.training  # the user's mode is kept
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    assert isinstance(model.bn, nn.BatchNorm2d)  # not folded in the user's model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert result.model is not model


def test_conv_bn_model_search_end_to_end_with_fidelity_metric(tmp_path):
    model = convnet()
    result = aq.auto_quantize(model, fidelity(model), (torch.randn(1, 3, 6, 6),),
                              max_loss=3e-4, config={"default": {"weight": {"bits": 4}}})
    assert result.folded_bn == [["conv", "bn"]]
    assert result.status == "met" and result.loss <= 3e-4 and result.quantized_layers
    assert [r.name for r in result.sensitivity] and result.sensitivity[0].rank == 0
    # the float baseline, the fully quantized model, the bisection and binary's notice (2)
    assert result.num_evaluations <= 2 + math.ceil(math.log2(3 + 1)) + 2
    # the fake-quant model reproduces the accepted metric
    ev = fidelity(model)
    assert ev.evaluate(result.model) == pytest.approx(result.quant_metric, abs=1e-6)


def test_save_then_load_quantized_reproduces_the_model(tmp_path):
    model = convnet()
    result = aq.auto_quantize(model, fidelity(model), max_loss=1e-3,
                              config={"default": {"weight": {"bits": 3}}})
    assert result.quantized_layers and result.fallback_layers  # a mixed plan
    out = result.save(tmp_path / "out")
    assert {p.name for p in out.iterdir()} >= {"quant_config.yaml", "model_state.pt",
                                                "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == REPORT_SCHEMA_VERSION
    assert report["status"] == result.status
    assert [row["name"] for row in report["layers"]] == ["conv", "head.1", "head.3"]
    assert report["counts"]["evaluations"] == result.num_evaluations
    loaded = aq.load_quantized(model, out)
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(loaded(x), result.model(x), atol=0, rtol=0)
    assert not any(isinstance(f, Path) and f.name.endswith(".tmp") for f in out.iterdir())


def test_final_config_reproduces_the_plan_through_quantize():
    model = convnet()
    ev = fidelity(model)
    result = aq.auto_quantize(model, ev, max_loss=1e-3,
                              config={"default": {"weight": {"bits": 3}}})
    assert result.quantized_layers and result.fallback_layers  # a mixed plan
    again = aq.quantize(model, ev, result.config)
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(again(x), result.model(x))


def test_damaged_layer_ranks_most_sensitive():
    model = mlp(4, width=16)
    with torch.no_grad():
        w = model[4].weight  # layer "4": one huge weight per output channel
        w[:, 0] = w[:, 0] * 1000
    ev = DropEvaluator({}, inputs=torch.randn(64, 16))
    # its own output: at the model's output 64 rows do not separate it from layer 0
    ranking = aq.sensitivity_analysis(model, ev, sensitivity_scope="layer")
    assert ranking[0].name == "4"
    assert ranking[0].score < min(r.score for r in ranking[1:])
    assert [r.rank for r in ranking] == list(range(4)) and all(r.calls == 8 for r in ranking)


def test_dump_dir_writes_each_layer_input(tmp_path):
    model = mlp(2)
    ev = DropEvaluator({})
    aq.sensitivity_analysis(model, ev, dump_dir=tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pt"))
    assert files == ["0/input_00000.pt", "0/input_00001.pt", "2/input_00000.pt",
                     "2/input_00001.pt"]
    assert torch.equal(torch.load(tmp_path / "0/input_00000.pt"), ev.inputs[:8])


def test_layers_never_run_by_calibration_stay_float_and_are_reported():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    result = aq.auto_quantize(Branchy(), DropEvaluator({}), max_loss=0.1)
    assert result.skipped_layers == ["unused"] and result.quantized_layers == ["used"]
    assert "unused" in result.config.skip_layers


# -- bad inputs ---------------------------------------------------------------------------
def test_model_without_quantizable_layers_is_a_model_error():
    with pytest.raises(aq.ModelError, match="no quantizable layer"):
        aq.auto_quantize(nn.Sequential(nn.ReLU()), DropEvaluator({}))


def test_inputs_that_do_not_run_are_a_model_error():
    with pytest.raises(aq.ModelError, match="does not run on example_inputs"):
        aq.auto_quantize(mlp(2), DropEvaluator({}), (torch.randn(2, 5),))


@pytest.mark.parametrize(
    "value,message",
    [
        (float("nan"), r"evaluate\(\) in trial 0 \(float\) returned nan"),
        (None, "returned NoneType None; expected a real number"),
        ("0.9", "returned str"),
        (torch.tensor(0.9), r"return float\(x.item\(\)\)"),
        (float("inf"), "returned inf"),
    ],
)
def test_evaluator_returning_a_non_number_names_the_method_and_trial(value, message):
    with pytest.raises(aq.EvaluatorError, match=message):
        aq.auto_quantize(mlp(2), ListEvaluator([value]))


def test_evaluator_raising_in_a_later_trial_names_the_trial():
    ev = ListEvaluator([1.0, RuntimeError("disk gone")])
    with pytest.raises(aq.EvaluatorError, match=r"in trial 1 \(all quantized\) raised "
                                                r"RuntimeError: disk gone"):
        aq.auto_quantize(mlp(2), ev)


def test_calibration_that_runs_nothing_is_an_evaluator_error():
    class Lazy(Evaluator):
        def evaluate(self, model):
            return 1.0

    with pytest.raises(aq.EvaluatorError, match="ran no forward pass"):
        aq.auto_quantize(mlp(2), Lazy())


def test_metric_eval_returning_garbage_is_an_evaluator_error():
    class Odd(DropEvaluator):
        def metric_eval(self, original, new):
            return "yes"

    with pytest.raises(aq.EvaluatorError, match=r"expected a tuple \(ok: bool, loss: float\)"):
        aq.auto_quantize(mlp(2), Odd({}))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"strategy": "binarry"}, "unknown strategy 'binarry' .*did you mean 'binary'.*binary"),
        ({"sensitivity": "cos"}, "unknown sensitivity metric 'cos'"),
        ({"max_evaluations": 1}, "max_evaluations must be an int >= 2"),
        ({"max_loss": -0.1}, "max_loss must be a finite number >= 0"),
        ({"config": {"layers": {"fc": {}}}}, "layers names 'fc'"),
        ({"config": 3}, "config must be a QuantConfig, a mapping or a file path"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, message):
    with pytest.raises(aq.ConfigError, match=message):
        aq.auto_quantize(mlp(2), DropEvaluator({}), **kwargs)


# -- AMCT-style names -----------------------------------------------------------------------
class AmctEvaluator(DropEvaluator):
    def metric_eval(self, original_metric, new_metric):
        loss = original_metric - new_metric
        return loss <= 0.1, loss


def test_amct_create_config_then_accuracy_based_auto_calibration(tmp_path):
    model, names = mlp(5), linear_names(5)
    cfg_file = tmp_path / "quant.json"
    cfg = aq.create_quant_config(cfg_file, model, torch.randn(2, 8), skip_layers=[names[-1]])
    data = json.loads(cfg_file.read_text())
    assert sorted(data["layers"]) == sorted(names[:-1]) and data["skip_layers"] == [names[-1]]
    assert cfg.layer_config(names[0]).weight.bits == 8
    drops = dict.fromkeys(names, 0.0)
    drops[names[1]] = 0.5
    result = aq.accuracy_based_auto_calibration(
        model, AmctEvaluator(drops), cfg_file, tmp_path / "record.json", tmp_path / "save",
        torch.randn(2, 8), strategy="BinarySearch", sensitivity="CosineSimilarity",
    )
    assert result.met and names[1] in result.fallback_layers
    assert names[-1] in result.skipped_layers and names[-1] not in result.quantized_layers
    record = json.loads((tmp_path / "record.json").read_text())
    assert len(record["trials"]) == result.num_evaluations
    assert (tmp_path / "save" / "quant_config.yaml").is_file()


def test_amct_search_requires_metric_eval(tmp_path):
    with pytest.raises(aq.ConfigError, match="must implement metric_eval"):
        aq.accuracy_based_auto_calibration(mlp(2), DropEvaluator({}), tmp_path / "c.yaml",
                                           tmp_path / "r.json", tmp_path / "s")


def test_evaluator_is_importable_from_both_packages():
    assert aq.Evaluator is Evaluator


def test_import_autoquant_stays_light():
    import subprocess
    import sys

    code = ("import sys, autoquant; print(sorted(m for m in ('optuna', 'matplotlib', 'onnx', "
            "'onnxruntime', 'sklearn', 'strategies', 'evaluators') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_a_torch_compile_wrapper_is_searched_as_the_module_it_compiles(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    compiled = torch.compile(model, backend="eager")
    data = [torch.randn(3, 4)]
    result = aq.auto_quantize(compiled, FidelityEvaluator(model, data), (data[0],),
                              max_loss=0.01)
    assert result.quantized_layers == ["0", "2"]  # the user's names, no "_orig_mod."
    assert type(result.model).__name__ != "OptimizedModule"
    result.save(tmp_path)
    reloaded = aq.load_quantized(compiled, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(data[0]), result.model(data[0]))



def test_a_users_own_evaluators_and_strategies_folders_cannot_shadow_autoquants(tmp_path):
    import subprocess
    import sys

    for name in ("evaluators", "strategies"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("MINE = True\n")
    code = (
        "import torch, autoquant as aq\n"
        "from torch import nn\n"
        "import evaluators, strategies\n"
        "assert evaluators.MINE and strategies.MINE  # the user's own folders import\n"
        "m = nn.Sequential(nn.Linear(4, 4)).eval()\n"
        "x = torch.randn(4, 4)\n"
        "ev = aq.FidelityEvaluator(m, [x])\n"
        "assert isinstance(ev, aq.Evaluator)\n"
        "r = aq.auto_quantize(m, ev, strategy='binary', max_loss=0.5)\n"
        "print(r.status)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "met"


def test_the_old_top_level_imports_are_a_clear_error_in_a_checkout():
    import subprocess
    import sys

    for name in ("evaluators", "strategies"):
        out = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode != 0
        assert f"import autoquant.{name}" in out.stderr
