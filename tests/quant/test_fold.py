"""Tests for autoquant.quant.fold: Conv-BN folding keeps outputs and names, and skips unsafe
pairs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from autoquant.quant.fold import fold_conv_bn

_SPATIAL = {1: (9,), 2: (6, 6), 3: (4, 4, 4)}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _randomize_bn(bn: nn.Module, seed: int = 0) -> None:
    """Give ``bn`` non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _conv_bn(conv_cls: type[nn.Module], dims: int, bias: bool, groups: int = 1) -> ConvBN:
    torch.manual_seed(0)
    conv = conv_cls(4, 6, kernel_size=3, padding=1, bias=bias, groups=groups)
    bn = _BN[dims](6)
    _randomize_bn(bn)
    return ConvBN(conv, bn).eval()


def _input(dims: int, channels: int = 4) -> torch.Tensor:
    return torch.randn(2, channels, *_SPATIAL[dims], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    ("conv_cls", "dims", "groups"),
    [
        (nn.Conv1d, 1, 1),
        (nn.Conv2d, 2, 1),
        (nn.Conv3d, 3, 1),
        (nn.Conv2d, 2, 2),
        (nn.ConvTranspose1d, 1, 1),
        (nn.ConvTranspose2d, 2, 1),
        (nn.ConvTranspose2d, 2, 2),
    ],
    ids=["conv1d", "conv2d", "conv3d", "conv2d-g2", "convT1d", "convT2d", "convT2d-g2"],
)
def test_fold_preserves_outputs_and_module_names(
    conv_cls: type[nn.Module], dims: int, groups: int, bias: bool
) -> None:
    model = _conv_bn(conv_cls, dims, bias, groups)
    x = _input(dims)
    conv_before = model.conv
    with torch.no_grad():
        expected = model(x)
        unfolded_conv_only = model.act(model.conv(x))
    # The BN must really change the output, or the comparison below proves nothing.
    assert _max_diff(expected, unfolded_conv_only) > 1e-2

    pairs = fold_conv_bn(model)

    assert pairs == [("conv", "bn")]
    assert isinstance(model.bn, nn.Identity)
    assert model.conv is conv_before
    assert [name for name, _ in model.named_modules()] == ["", "conv", "bn", "act"]
    assert isinstance(model.conv.bias, nn.Parameter)
    with torch.no_grad():
        assert _max_diff(model(x), expected) <= 1e-5


def test_bn_without_affine_folds_exactly() -> None:
    model = _conv_bn(nn.Conv2d, 2, bias=True)
    model.bn = nn.BatchNorm2d(6, affine=False)
    _randomize_bn(model.bn)
    model.eval()
    x = _input(2)
    with torch.no_grad():
        expected = model(x)

    assert fold_conv_bn(model) == [("conv", "bn")]
    with torch.no_grad():
        assert _max_diff(model(x), expected) <= 1e-5


def test_fold_keeps_parameter_dtype() -> None:
    model = _conv_bn(nn.Conv2d, 2, bias=False).double()
    x = _input(2).double()
    with torch.no_grad():
        expected = model(x)

    assert fold_conv_bn(model) == [("conv", "bn")]
    assert model.conv.weight.dtype == torch.float64
    assert model.conv.bias.dtype == torch.float64
    with torch.no_grad():
        assert _max_diff(model(x), expected) <= 1e-12


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 5, 3, padding=1, bias=False),
            nn.BatchNorm2d(5),
        )
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_nested_sequential_folds_with_qualified_names() -> None:
    torch.manual_seed(0)
    model = Nested()
    _randomize_bn(model.features[1], seed=1)
    _randomize_bn(model.features[4], seed=2)
    model.eval()
    names_before = [name for name, _ in model.named_modules()]
    x = _input(2, channels=3)
    with torch.no_grad():
        expected = model(x)

    pairs = fold_conv_bn(model)

    assert pairs == [("features.0", "features.1"), ("features.3", "features.4")]
    assert isinstance(model.features[1], nn.Identity)
    assert isinstance(model.features[4], nn.Identity)
    assert isinstance(model.features[0], nn.Conv2d)
    assert isinstance(model.features[3], nn.Conv2d)
    assert [name for name, _ in model.named_modules()] == names_before
    with torch.no_grad():
        assert _max_diff(model(x), expected) <= 1e-5


class Untraceable(ConvBN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y
        return -y


def test_untraceable_model_is_skipped_with_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = Untraceable(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)).eval()
    _randomize_bn(model.bn)
    state_before = copy.deepcopy(model.state_dict())

    with caplog.at_level(logging.INFO, logger="autoquant.quant.fold"):
        pairs = fold_conv_bn(model)

    assert pairs == []
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "does not trace with torch.fx" in infos[0].getMessage()
    assert "\n" not in infos[0].getMessage()
    assert isinstance(model.bn, nn.BatchNorm2d)
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)


def _assert_not_folded(model: nn.Module, x: torch.Tensor) -> None:
    state_before = copy.deepcopy(model.state_dict())
    bns_before = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        expected = model(x)

    assert fold_conv_bn(model) == []

    bns_after = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns_after == bns_before and bns_after
    state_after = model.state_dict()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class ConvOutputReused(ConvBN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_with_a_second_user_is_not_folded(caplog: pytest.LogCaptureFixture) -> None:
    model = ConvOutputReused(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)).eval()
    _randomize_bn(model.bn)
    with caplog.at_level(logging.DEBUG, logger="autoquant.quant.fold"):
        _assert_not_folded(model, _input(2))
    assert any("more than one user" in r.getMessage() for r in caplog.records)


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


def test_bn_called_twice_is_not_folded() -> None:
    model = SharedBN().eval()
    _randomize_bn(model.bn)
    _assert_not_folded(model, _input(2))


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.conv(x)))


def test_conv_called_twice_is_not_folded() -> None:
    model = SharedConv().eval()
    _randomize_bn(model.bn)
    _assert_not_folded(model, _input(2))


def test_bn_without_running_stats_is_not_folded() -> None:
    model = ConvBN(
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False)
    ).eval()
    _assert_not_folded(model, _input(2))


def test_bn_in_training_mode_is_not_folded() -> None:
    model = _conv_bn(nn.Conv2d, 2, bias=True).train()
    assert fold_conv_bn(model) == []
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_channel_mismatch_is_not_folded() -> None:
    # symbolic_trace never runs the model, so a mismatched pair can reach the matcher.
    model = ConvBN(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(5)).eval()
    weight_before = model.conv.weight.detach().clone()
    assert fold_conv_bn(model) == []
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert torch.equal(model.conv.weight, weight_before)


class PaddedConv(nn.Conv2d):
    """A subclass that only changes construction (as Hugging Face's depthwise conv)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding="valid", bias=False)


class StandardizedConv(nn.Conv2d):
    """A subclass whose forward transforms the weight: folding a BN scale into it is wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


@pytest.mark.parametrize("conv, folds", [(PaddedConv(3, 4), True),
                                         (StandardizedConv(3, 4, 3), False)],
                         ids=["construction_only", "own_forward"])
def test_a_conv_subclass_folds_only_when_it_runs_torchs_forward(conv, folds) -> None:
    model = nn.Sequential(conv, nn.BatchNorm2d(4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        assert fold_conv_bn(model) == ([("0", "1")] if folds else [])
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert isinstance(model[1], nn.Identity) == folds
