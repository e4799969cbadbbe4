"""Shared test helpers: tiny models and evaluators with known answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autoquant.evaluators import Evaluator
from autoquant.quant.layers import QuantLayer


def mlp(n_layers: int, width: int = 8, seed: int = 0) -> nn.Sequential:
    """A stack of `n_layers` Linear+ReLU blocks (deterministic weights)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(n_layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods).eval()


def linear_names(n_layers: int) -> list[str]:
    """Qualified names of the Linear layers of `mlp(n_layers)`."""
    return [str(2 * i) for i in range(n_layers)]


def quantized_layers(model: nn.Module, max_bits: int = 16) -> set[str]:
    """Names of layers the model currently runs quantized below `max_bits` weight bits."""
    return {m.layer_name for m in model.modules()
            if isinstance(m, QuantLayer) and m.scheme != "float"
            and int(m.scheme[1:].split("a")[0]) < max_bits}


class DropEvaluator(Evaluator):
    """metric = 1 - sum of `drops[name]` over the layers quantized below 16 bits.

    The metric is known exactly for every plan, so strategy answers and evaluation counts
    can be asserted. Counts every evaluate() call and every plan it saw.
    """

    def __init__(self, drops: Mapping[str, float], inputs: torch.Tensor | None = None):
        self.drops = dict(drops)
        self.inputs = inputs if inputs is not None else torch.randn(16, 8)
        self.calls = 0
        self.seen: list[frozenset[str]] = []

    def calibration(self, model: nn.Module) -> None:
        for x in self.inputs.split(8):
            model(x)

    def evaluate(self, model: nn.Module) -> float:
        self.calls += 1
        q = quantized_layers(model)
        self.seen.append(frozenset(q))
        return 1.0 - sum(self.drops.get(n, 0.0) for n in q)


class ListEvaluator(Evaluator):
    """Returns the values of `values` in turn (to script odd evaluators)."""

    def __init__(self, values: Sequence[object], inputs: torch.Tensor | None = None):
        self.values = list(values)
        self.inputs = inputs if inputs is not None else torch.randn(16, 8)
        self.calls = 0

    def calibration(self, model: nn.Module) -> None:
        model(self.inputs)

    def evaluate(self, model: nn.Module) -> object:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        if isinstance(value, Exception):
            raise value
        return value


class BatchCalibrator:
    """Calibrates on fixed batches and evaluates nothing (for PTQ-only tests)."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self.batches = list(batches)

    def calibration(self, model: nn.Module) -> None:
        for x in self.batches:
            model(x)

    def evaluate(self, model: nn.Module) -> float:
        return 0.0


class OneDict(nn.Module):
    """A forward that takes one dict of tensors (``forward(self, batch)``): ``x`` of 3 and
    ``y`` of 4 features, summed through two Linear layers to `width`."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, width), nn.Linear(4, width)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.a(batch["x"]) + self.b(batch["y"])
