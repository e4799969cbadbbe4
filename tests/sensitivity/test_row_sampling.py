"""The gradient scope runs a share of the calibration rows first and the rest only when the
ranking from those has not settled; every row runs at most once."""

from __future__ import annotations

import logging
from collections import namedtuple
from typing import ClassVar

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.batches import row_slice
from autoquant.sensitivity import gradient
from autoquant.sensitivity.sampling import FIRST_ROWS, RowShare
from autoquant.settings import SettingError

# four layers quantized from coarse to fine: a ranking no half of the rows disputes
CONFIG = {"default": {"weight": {"bits": 8}, "activation": {"bits": 8}},
          "layers": {"fc1": {"weight": {"bits": 2}, "activation": {"bits": 8}},
                     "fc2": {"weight": {"bits": 3}, "activation": {"bits": 8}},
                     "fc3": {"weight": {"bits": 5}, "activation": {"bits": 8}}}}


class Recording(nn.Module):
    """An MLP that records the batch of every forward (a class list: the search's copy of
    the model records into it too); with `batch` set it refuses any other batch."""

    seen: ClassVar[list[int]] = []

    def __init__(self, batch: int | None = None) -> None:
        super().__init__()
        self.batch = batch
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 64)
        self.fc3, self.fc4 = nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is not None and x.shape[0] != self.batch:
            raise ValueError(f"this model runs batches of {self.batch} rows only")
        Recording.seen.append(x.shape[0])
        x = torch.relu(self.fc1(x))
        return self.fc4(torch.relu(self.fc3(torch.relu(self.fc2(x)))))


@pytest.fixture
def batches() -> list[torch.Tensor]:
    torch.manual_seed(0)
    Recording.seen.clear()
    return [torch.randn(64, 32) for _ in range(8)]


def _rank(model: nn.Module, batches: list[torch.Tensor], fraction: float) -> list[str]:
    rows = aq.sensitivity_analysis(model, calibration_data=batches, config=CONFIG,
                                   sensitivity_scope="gradient", sensitivity_fraction=fraction)
    assert all(r.calls == len(batches) for r in rows)  # a call split in two counts once
    return [r.name for r in rows]


def test_a_settled_ranking_runs_a_quarter_of_the_rows_and_matches_the_full_pass(batches):
    torch.manual_seed(1)
    model = Recording().eval()
    full = _rank(model, batches, 1.0)
    Recording.seen.clear()
    assert _rank(model, batches, 0.25) == full == ["fc1", "fc2", "fc3", "fc4"]
    # the last pass ran the first 32 rows, then a quarter of each call: 144 of 512 rows
    assert Recording.seen[-8:] == [FIRST_ROWS] + [16] * 7


def test_an_unsettled_ranking_runs_every_other_row_once(batches, monkeypatch):
    monkeypatch.setattr(gradient, "SETTLED", 1.01)  # no split-half agreement is enough
    torch.manual_seed(1)
    model = Recording().eval()
    assert _rank(model, batches, 0.25) == ["fc1", "fc2", "fc3", "fc4"]
    first, second = Recording.seen[-16:-8], Recording.seen[-8:]
    assert first == [32] + [16] * 7 and second == [32] + [48] * 7
    assert [a + b for a, b in zip(first, second, strict=True)] == [64] * 8


def test_a_model_that_refuses_a_cut_batch_is_ranked_on_every_row(batches, caplog):
    torch.manual_seed(1)
    model = Recording(batch=64).eval()
    with caplog.at_level(logging.WARNING, logger="autoquant.sensitivity.gradient"):
        assert _rank(model, batches, 0.25) == ["fc1", "fc2", "fc3", "fc4"]
    assert "running it on every row" in caplog.text and "batches of 64" in caplog.text
    assert set(Recording.seen) == {64}


def test_batch_one_calls_run_the_first_rows_then_every_fourth_then_the_rest():
    share = RowShare(0.25)
    first = [share.span(torch.zeros(1, 3)) for _ in range(100)]
    assert [s[2] for s in first[:FIRST_ROWS]] == [1] * FIRST_ROWS
    later = [s[2] for s in first[FIRST_ROWS:]]
    assert sum(later) == 17 and later[:4] == [0, 0, 0, 1]  # a quarter of 68, owed
    share.start_stage(2)
    second = [share.span(torch.zeros(1, 3)) for _ in range(100)]
    assert [a[2] - a[1] + b[2] - b[1] for a, b in zip(first, second, strict=True)] == [1] * 100
    assert share.left == 100 - FIRST_ROWS - 17


def test_row_slice_cuts_every_batch_tensor_in_nested_inputs_and_leaves_the_rest():
    pair = namedtuple("pair", "ids mask")
    x, table = torch.arange(12).reshape(6, 2), torch.zeros(4, 2)
    args, kwargs = row_slice(((pair(x, x),), {"mask": x, "table": table, "n": 3}), 6, 1, 3)
    assert isinstance(args[0], pair) and torch.equal(args[0].ids, x[1:3])
    assert torch.equal(kwargs["mask"], x[1:3]) and kwargs["table"] is table and kwargs["n"] == 3


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, True, "half"])
def test_a_fraction_outside_zero_to_one_is_a_setting_error(bad):
    with pytest.raises(SettingError, match="sensitivity_fraction"):
        aq.SearchSettings(sensitivity_fraction=bad)
