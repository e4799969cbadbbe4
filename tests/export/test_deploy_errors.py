"""Deploying unusual models: one that cannot be exported keeps the search's answer and says
why; a forward that takes one dict searches, exports and deploys from dict batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.export.onnx_export import export_checked
from autoquant.report.render import check_lines
from tests.helpers.synthetic import BatchCalibrator, OneDict

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Cache:
    """A non-tensor object in the output, as a Hugging Face model's key/value cache."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Cache]:
        hidden = torch.relu(self.a(x))
        return self.b(hidden), Cache(hidden)


def test_a_plan_that_cannot_be_exported_comes_back_unverified_with_the_reason() -> None:
    torch.manual_seed(0)
    model = WithCache().eval()
    data = [torch.randn(16, 4) for _ in range(2)]

    class Agreement(aq.Evaluator):
        def calibration(self, m: nn.Module) -> None:
            for x in data:
                m(x)

        def evaluate(self, m: nn.Module) -> float:
            with torch.no_grad():
                return float(torch.stack([nn.functional.cosine_similarity(
                    m(x)[0], model(x)[0]).mean() for x in data]).mean())

    result = aq.auto_quantize(model, Agreement(), (data[0],), max_loss=0.01,
                              verify_deploy=True)
    assert result.met and result.quantized_layers == ["a", "b"]  # the search's answer stands
    assert result.met_on_deploy is None and result.deployed_metric is None
    error = result.checks["deploy_error"]
    assert "Cache" in error and "return tensors only" in error and "use_cache=False" in error
    assert "not verified, the export failed" in result.summary()
    lines = check_lines({"checks": result.checks, "settings": {}})
    assert any(line.startswith("Not verified in onnxruntime: torch.export") for line in lines)


def test_a_bfloat16_model_is_refused_before_export_naming_the_fix(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval().bfloat16()
    data = [torch.randn(8, 4, dtype=torch.bfloat16) for _ in range(2)]
    qmodel = aq.quantize(model, BatchCalibrator(data))
    with pytest.raises(aq.ExportError, match=r"bfloat16.*model\.float\(\)"):
        export_checked(qmodel, tmp_path / "m.onnx", (data[0],))
    assert not (tmp_path / "m.onnx").exists()


def test_a_forward_that_takes_one_dict_searches_exports_and_deploys_from_dict_batches() -> None:
    torch.manual_seed(0)
    batches = [{"x": torch.randn(8, 3), "y": torch.randn(8, 4)} for _ in range(3)]
    model = OneDict().eval()
    result = aq.auto_quantize(model, aq.FidelityEvaluator(model, batches), batches[0],
                              max_loss=0.01, verify_deploy=True)
    assert "deploy_error" not in result.checks
    assert result.met_on_deploy and result.deployed_metric == pytest.approx(
        result.quant_metric, abs=1e-5)


def test_an_int8_file_slower_than_float_is_reported_with_the_layers_that_run_float(caplog):
    from autoquant.export.onnx_export import _warn_if_slower

    figures = {"latency_ratio": 1.8, "host": "x86_avx2",
               "integer_kernels": {"float": {"rnn": "a recurrent op"}}}
    with caplog.at_level("WARNING", logger="autoquant.export.onnx_export"):
        _warn_if_slower(figures)
        _warn_if_slower({**figures, "latency_ratio": 1.05})  # within timing noise
        _warn_if_slower({"file_bytes": 10})  # not measured
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "1.80x the float file's latency" in message and "run float: rnn" in message
    assert "no VNNI" in message
