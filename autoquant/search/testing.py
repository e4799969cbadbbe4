"""Test helpers for strategies: a synthetic evaluator with known per-layer drops, and the
`StrategyTestCase` conformance suite every strategy passes (third parties can reuse it).

The synthetic evaluator's metric is ``1 - sum of the drops of the quantized layers``: a
layer at its configured scheme costs its drop, at another bit width (a ladder rung) its
drop times ``rung_factor``, in float nothing. With drops that are multiples of 1/1024 the
arithmetic is exact, so the optimum and the evaluation counts can be asserted exactly.

Example:
    >>> from autoquant.search.testing import StrategyTestCase
    >>> class TestMyStrategy(StrategyTestCase):   # collected by pytest
    ...     strategy = MyStrategy
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from autoquant.plan import FLOAT, plan_key
from autoquant.quant.layers import QuantLayer
from autoquant.sensitivity.ranking import LayerSensitivity

__all__ = [
    "SyntheticEvaluator",
    "linear_stack",
    "ranking_from_drops",
    "optimal_fallbacks",
    "StrategyTestCase",
]


def linear_stack(n: int, width: int = 4, seed: int = 0) -> nn.Sequential:
    """`n` Linear(width, width) layers in a Sequential (layer names ``"0"`` .. ``"n-1"``)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n):
        layer = nn.Linear(width, width)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(width, width, generator=gen) / width ** 0.5)
            layer.bias.zero_()
        layers.append(layer)
    return nn.Sequential(*layers)


class SyntheticEvaluator:
    """Metric ``1 - sum(drop of each quantized layer)``, read off the layers' schemes.

    Args:
        drops: each layer's drop when at its configured scheme (negative: quantizing it
            helps, which makes pass/fail non-monotone along a ranking).
        rung_factor: fraction of the drop a layer costs at any other non-float scheme.
        holdout_factor: `evaluate_holdout` scales every drop by this (a held-out set on
            which quantization hurts more, or less).
        width: the input width of the model (for calibration).

    Attributes:
        calls: evaluate() calls made in this process.
    """

    higher_is_better = True

    def __init__(self, drops: Mapping[str, float], rung_factor: float = 0.25,
                 holdout_factor: float = 1.0, width: int = 4) -> None:
        self.drops = dict(drops)
        self.rung_factor = rung_factor
        self.holdout_factor = holdout_factor
        self.x = torch.linspace(-1, 1, 2 * width).reshape(2, width)
        self.calls = 0

    def calibration(self, model: nn.Module) -> None:
        """One forward pass, so every layer has activation statistics."""
        model(self.x)

    def _loss(self, model: nn.Module) -> float:
        total = 0.0
        for module in model.modules():
            if isinstance(module, QuantLayer) and module.scheme != FLOAT:
                drop = self.drops.get(module.layer_name, 0.0)
                full = module.scheme == module.config.scheme
                total += drop if full else drop * self.rung_factor
        return total

    def evaluate(self, model: nn.Module) -> float:
        """The metric of the model's current plan (exact for dyadic drops)."""
        self.calls += 1
        return 1.0 - self._loss(model)

    def evaluate_holdout(self, model: nn.Module) -> float:
        """The metric on a "held-out set": every drop scaled by `holdout_factor`."""
        return 1.0 - self.holdout_factor * self._loss(model)


def ranking_from_drops(drops: Mapping[str, float]) -> list[LayerSensitivity]:
    """The ranking a perfect proxy would give: largest drop first (score = -drop)."""
    order = sorted(drops, key=lambda n: (-drops[n], n))
    return [LayerSensitivity(n, -drops[n], rank, 1) for rank, n in enumerate(order)]


def optimal_fallbacks(drops: Mapping[str, float], max_loss: float) -> set[str]:
    """The fewest layers to fall back (to float) so the summed drop is within `max_loss`,
    for non-negative drops: remove the largest drops first."""
    left = sum(drops.values())
    out: set[str] = set()
    for name in sorted(drops, key=lambda n: (-drops[n], n)):
        if left <= max_loss:
            break
        out.add(name)
        left -= drops[name]
    return out


class StrategyTestCase:
    """Conformance suite for a `SearchStrategy` (pytest collects subclasses named Test*).

    Set `strategy` (a registered name or a class) and `options`. Every test runs
    `autoquant.auto_quantize` on `linear_stack` with a `SyntheticEvaluator` whose ranking
    is exact, so the minimal set of fallbacks is known.

    Attributes:
        strategy: the strategy name or class under test.
        options: its ``strategy_options``.
        exact: True if the strategy must find the minimal fallback set (else any passing
            plan is accepted).
        n_layers: layers of the synthetic model.
    """

    strategy: ClassVar[Any] = "binary"
    options: ClassVar[dict[str, Any]] = {}
    exact: ClassVar[bool] = True
    n_layers: ClassVar[int] = 12

    def setup_method(self, method: Any) -> None:
        # tiny tensors: one thread avoids OpenMP spin-waits on a busy machine (x20 faster)
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def teardown_method(self, method: Any) -> None:
        torch.set_num_threads(self._threads)

    # -- helpers ---------------------------------------------------------------------------
    def drops(self) -> dict[str, float]:
        """Distinct dyadic drops, not in module order: layer i costs ((7i mod n) + 1)/1024."""
        n = self.n_layers
        return {str(i): ((7 * i) % n + 1) / 1024 for i in range(n)}

    def search(self, drops: Mapping[str, float], max_loss: float,
               ranking: Sequence[LayerSensitivity] | None = None, **kwargs: Any
               ) -> tuple[Any, SyntheticEvaluator]:
        """Run the strategy under test; return the result and the evaluator."""
        from autoquant.api import auto_quantize

        evaluator = SyntheticEvaluator(drops)
        result = auto_quantize(
            linear_stack(self.n_layers), evaluator, max_loss=max_loss,
            strategy=self.strategy, strategy_options=dict(self.options),
            ranking=ranking if ranking is not None else ranking_from_drops(drops), **kwargs,
        )
        return result, evaluator

    # -- the contract ----------------------------------------------------------------------
    def test_finds_the_known_optimum(self) -> None:
        drops = self.drops()
        max_loss = 30 / 1024
        result, _ = self.search(drops, max_loss)
        assert result.status == "met" and result.met
        assert result.loss <= max_loss
        if self.exact:
            assert set(result.fallback_layers) == optimal_fallbacks(drops, max_loss)

    def test_keeps_everything_quantized_when_the_budget_allows(self) -> None:
        drops = self.drops()
        result, _ = self.search(drops, sum(drops.values()))
        assert result.met and result.fallback_layers == []
        assert len(result.quantized_layers) == self.n_layers

    def test_falls_back_everything_when_nothing_else_passes(self) -> None:
        result, _ = self.search(self.drops(), 0.0)
        assert result.status == "float_only" and not result.met and result.loss == 0.0
        assert result.quantized_layers == []

    def test_never_evaluates_a_plan_twice(self) -> None:
        result, evaluator = self.search(self.drops(), 30 / 1024)
        keys = [plan_key(r.plan) for r in result.history]
        assert len(keys) == len(set(keys)) == result.num_evaluations == evaluator.calls

    def test_respects_the_evaluation_budget(self) -> None:
        result, evaluator = self.search(self.drops(), 30 / 1024, max_evaluations=3)
        assert result.num_evaluations <= 3 and evaluator.calls <= 3
        assert result.status in ("met", "budget_exhausted")
        assert result.plan  # a result always comes back

    def test_is_deterministic(self) -> None:
        first, _ = self.search(self.drops(), 30 / 1024)
        second, _ = self.search(self.drops(), 30 / 1024)
        assert [r.plan for r in first.history] == [r.plan for r in second.history]
        assert first.plan == second.plan
