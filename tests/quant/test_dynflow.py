"""A model torch.fx cannot trace still gets its convolution outputs requantized: the
consumers of each layer's output are read off one real forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.quant.activations import QuantSiLU, sigmoid_range
from autoquant.quant.dataflow import output_uses, trace_layers
from autoquant.quant.dynflow import observed_uses
from autoquant.quant.qmodel import QuantModel
from tests.helpers.onnxcheck import optimized_ops
from tests.helpers.synthetic import BatchCalibrator


class Split(nn.Module):
    """A YOLO-style block: ``list(x.chunk(2, 1))`` is something fx cannot trace."""

    def __init__(self, untraceable: bool = True) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.stem(x)))
        parts = list(y.chunk(2, 1)) if self.untraceable else [y[:, :4], y[:, 4:]]
        y = torch.cat([parts[0], self.a(parts[1])], 1)
        z = torch.relu(self.b(y)).flatten(2).reshape(y.shape)
        return self.head(self.c(z)) + y[:, :2]


def _split(untraceable: bool = True) -> Split:
    torch.manual_seed(0)
    model = Split(untraceable)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 8, 8, generator=gen) for _ in range(2)]


def test_a_forward_pass_finds_the_readers_fx_finds() -> None:
    qm = QuantModel(_split(untraceable=False), aq.QuantConfig())
    traced = output_uses(qm.model, qm.layers)
    seen = observed_uses(qm.model, qm.layers, lambda: qm.model(_data()[0]))
    assert traced is not None and seen is not None
    for name in qm.layers:
        assert seen[name].consumers == traced[name].consumers, name
        assert bool(seen[name].others) == bool(traced[name].others), name
        assert seen[name].through_relu == traced[name].through_relu, name
    assert seen["b"].consumers == ("c",) and seen["b"].through_relu  # through relu, reshapes
    assert seen["c"].consumers == ("head",) and not seen["c"].others
    assert seen["head"].others == ("add",)


@pytest.mark.parametrize("with_example", [True, False], ids=["example_inputs", "calibration"])
def test_an_untraceable_model_gets_its_convolution_outputs_requantized(with_example) -> None:
    model = _split()
    qm = QuantModel(model, aq.QuantConfig(), (_data()[0],) if with_example else None)
    assert trace_layers(qm.model, qm.layers) is None  # fx cannot trace it
    # the pass before calibration folds the BatchNorm it saw read the stem alone
    assert qm.folded == ([("stem", "bn")] if with_example else [])
    with torch.no_grad():
        torch.testing.assert_close(qm.model(_data()[0]), model(_data()[0]))
    qm.calibrate(lambda m, where: [m(x) for x in _data()])
    qm.apply_plan(qm.quant_plan())
    assert qm.output_uses is not None
    assert [n for n, layer in qm.layers.items() if layer.requant] == ["stem", "a", "head"]
    if with_example:  # the SiLU reads the stem (its BatchNorm folded): a quantizing twin
        assert isinstance(qm.model.act, QuantSiLU) and sigmoid_range(qm.model.act) == (0, 255)
        assert qm.model.act.output_qparams() is not None  # its product is read by a chunk
    else:
        assert type(qm.model.act) is nn.SiLU  # it reads a BatchNorm, which stayed unfolded


def test_an_untraceable_model_deploys_every_convolution_as_an_integer_kernel(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from autoquant.export.onnx_export import export_checked

    qmodel = aq.quantize(_split(), BatchCalibrator(_data()), example_inputs=(_data()[0],))
    _, figures = export_checked(qmodel, tmp_path / "m.onnx", (_data()[0],))  # parity checked
    assert figures["integer_kernels"]["summary"].startswith("5 of 5")
    assert "QLinearSigmoid" in optimized_ops(tmp_path / "m.onnx", tmp_path)


class Gated(Split):
    """`Split` with an extra layer that runs only when the batch's mean input is positive,
    and optionally refusing any batch but a full one (a hard-coded batch size)."""

    def __init__(self, full: int | None = None) -> None:
        super().__init__()
        self.full = full
        self.extra = nn.Conv2d(2, 2, 1)
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # not fx's tracing proxy
            self.sizes.append(x.shape[0])
        if self.full is not None and x.shape[0] != self.full:
            raise RuntimeError(f"expected a batch of {self.full}")
        out = super().forward(x)
        return self.extra(out) if float(x.mean()) > 0 else out


def _gated(full: int | None = None) -> Gated:
    torch.manual_seed(0)
    return Gated(full).eval()


def _uses(qm: QuantModel) -> dict[str, tuple]:
    assert qm.output_uses is not None
    return {n: (u.consumers, u.others, u.through_relu) for n, u in qm.output_uses.items()}


def test_the_watched_pass_runs_two_rows_of_a_batch_and_finds_the_whole_batch_uses() -> None:
    batch = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)).abs()
    cut = QuantModel(_gated(), aq.QuantConfig(), (batch,))
    assert cut.model.sizes == [2, 2]  # the pass, and its rerun after the BatchNorm fold
    whole = QuantModel(_gated(), aq.QuantConfig())
    assert whole.output_uses is None  # no example inputs: found after calibration
    whole.check_runs((batch[:2].repeat(4, 1, 1, 1),))  # a batch of 8 from the same rows
    assert _uses(cut) == _uses(whole) and _uses(cut)["extra"][1] == ("output",)


def test_the_watched_pass_reruns_on_the_whole_batch_when_the_cut_fails_or_skips_a_layer(
        ) -> None:
    gen = torch.Generator().manual_seed(2)
    batch = torch.randn(8, 3, 8, 8, generator=gen).abs()
    refusing = QuantModel(_gated(full=8), aq.QuantConfig(), (batch,))
    assert refusing.model.sizes[:2] == [2, 8]  # the cut refused, then the whole batch
    assert _uses(refusing)["extra"][1] == ("output",)
    batch[:2] = -batch[:2] * 2  # the first two rows alone skip `extra`; the batch runs it
    gated = QuantModel(_gated(), aq.QuantConfig(), (batch,))
    assert gated.model.sizes[:2] == [2, 8]
    assert _uses(gated)["extra"][1] == ("output",)
