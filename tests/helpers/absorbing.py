"""The model and calibration of the sensitivity-scope tests: a layer whose error the model
absorbs, and a calibration that counts its passes."""

from __future__ import annotations

import torch
from torch import nn

import autoquant as aq

# `noisy` is quantized far more coarsely than the rest, but its branch is scaled down
# before the add: locally it is the worst layer, at the model's output the least harmful
CONFIG = {"default": {"weight": {"bits": 6}, "activation": {"bits": 6}},
          "layers": {"noisy": {"weight": {"bits": 2}, "activation": {"bits": 2}}}}


class Absorbing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big, self.noisy, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.big(x) + 1e-3 * self.noisy(x))


class Counting(aq.Evaluator):
    """Calibrates on fixed batches (shuffled on every pass if asked) and counts the passes."""

    def __init__(self, batches: list[torch.Tensor], shuffle: bool = False) -> None:
        self.batches, self.shuffle, self.passes = batches, shuffle, 0
        self.order = torch.Generator().manual_seed(0)

    def calibration(self, model: nn.Module) -> None:
        self.passes += 1
        order = torch.randperm(len(self.batches), generator=self.order) if self.shuffle \
            else range(len(self.batches))
        for i in order:
            model(self.batches[int(i)])

    def evaluate(self, model: nn.Module) -> float:
        return 0.0
