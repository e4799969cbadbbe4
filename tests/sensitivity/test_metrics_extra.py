"""The `mse` (SQNR) and `kl` sensitivity metrics: scores, and ranking real layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.sensitivity.metrics import MAX_SQNR_DB, KLMetric, SQNRMetric
from autoquant.sensitivity.ranking import SENSITIVITY_METRICS


def test_sqnr_is_the_signal_to_noise_ratio_in_db() -> None:
    metric = SQNRMetric()
    y = torch.ones(4, 10)
    metric.update(y, y + 0.1)  # noise power 0.01 per element vs signal 1
    assert metric.score() == pytest.approx(20.0)
    exact = SQNRMetric()
    exact.update(y, y.clone())
    assert exact.score() == MAX_SQNR_DB
    silent = SQNRMetric()
    silent.update(torch.zeros(3), torch.ones(3))
    assert silent.score() == -MAX_SQNR_DB


def test_kl_is_zero_for_a_match_and_negative_for_a_change() -> None:
    y = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    same = KLMetric()
    same.update(y, y.clone())
    assert same.score() == pytest.approx(0.0, abs=1e-12)
    changed = KLMetric()
    changed.update(y, y.flip(1))
    p = torch.softmax(y.double(), 1)
    q = torch.softmax(y.flip(1).double(), 1)
    expected = float((p * (p / q).log()).sum(1).mean())
    assert changed.score() == pytest.approx(-expected)
    assert math.isfinite(changed.score()) and changed.score() < 0


def test_metrics_are_registered_by_name() -> None:
    assert SENSITIVITY_METRICS.resolve("mse") is SQNRMetric
    assert SENSITIVITY_METRICS.resolve("sqnr") is SQNRMetric
    assert SENSITIVITY_METRICS.resolve("kl") is KLMetric


@pytest.mark.parametrize("metric", ["mse", "kl", "cosine"])
def test_each_metric_ranks_the_2_bit_layer_most_sensitive(metric) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    x = torch.randn(32, 16)

    class Calib:
        def calibration(self, m):
            m(x)

    config = {"layers": {"1": {"weight": {"bits": 2}, "activation": {"bits": 2}}}}
    ranking = aq.sensitivity_analysis(model, Calib(), (x,), config=config, sensitivity=metric)
    assert ranking[0].name == "1"
    assert ranking[0].score < ranking[1].score
