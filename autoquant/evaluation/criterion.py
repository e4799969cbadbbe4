"""Accuracy semantics: direction (higher/lower is better) and loss type (absolute/relative).

The loss is always "how much worse the new metric is than the float one", so a positive loss
is a degradation whatever the direction, and `loss <= max_loss` is the acceptance test.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

from autoquant.errors import ConfigError, EvaluatorError

__all__ = ["AccuracyCriterion", "LossType", "check_metric_value"]

LossType = Literal["absolute", "relative"]


def check_metric_value(value: Any, where: str) -> float:
    """Return `value` as a finite float, or raise EvaluatorError naming `where`.

    Args:
        value: what the evaluator returned.
        where: a phrase naming the call, e.g. ``"evaluate() in trial 3"``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = ""
        if hasattr(value, "item"):
            hint = " (a tensor or array: return float(x.item()))"
        raise EvaluatorError(
            f"{where} returned {type(value).__name__} {value!r:.60}; expected a real number"
            f"{hint}. Make the method return a Python float."
        )
    try:
        out = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        out = math.inf
    if not math.isfinite(out):
        raise EvaluatorError(
            f"{where} returned {out}; expected a finite number. Check the evaluator for a "
            "division by zero or an empty data set."
        )
    return out


@dataclass(frozen=True)
class AccuracyCriterion:
    """Decides whether a quantized metric is close enough to the float metric.

    Attributes:
        max_loss: the largest accepted loss (>= 0), in metric units for ``absolute`` or as a
            fraction of ``|float_metric|`` for ``relative`` (0.01 means 1%).
        loss_type: ``"absolute"`` or ``"relative"``.
        higher_is_better: True for accuracy-like metrics, False for loss/perplexity.

    Example:
        >>> AccuracyCriterion(0.01).check(0.90, 0.895)
        (True, 0.0050000000000000044)
    """

    max_loss: float = 0.01
    loss_type: LossType = "absolute"
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_loss, bool) or not isinstance(self.max_loss, numbers.Real):
            raise ConfigError(f"max_loss must be a number, got {self.max_loss!r}")
        if not math.isfinite(self.max_loss) or self.max_loss < 0:
            raise ConfigError(
                f"max_loss must be a finite number >= 0, got {self.max_loss!r}; "
                "use e.g. 0.01 for one point of accuracy (absolute) or 1% (relative)."
            )
        if self.loss_type not in ("absolute", "relative"):
            raise ConfigError(
                f"loss_type must be 'absolute' or 'relative', got {self.loss_type!r}"
            )
        if not isinstance(self.higher_is_better, bool):
            raise ConfigError(f"higher_is_better must be a bool, got {self.higher_is_better!r}")

    def loss(self, float_metric: float, new_metric: float) -> float:
        """Degradation of `new_metric` relative to `float_metric` (positive = worse)."""
        drop = float_metric - new_metric if self.higher_is_better else new_metric - float_metric
        if self.loss_type == "absolute":
            return drop
        if float_metric == 0:
            # A relative loss against a zero baseline is undefined; any degradation is
            # infinitely large and no change at all is no loss.
            return 0.0 if drop <= 0 else math.inf
        return drop / abs(float_metric)

    def check(self, float_metric: float, new_metric: float) -> tuple[bool, float]:
        """Return ``(passes, loss)`` in the shape of ``Evaluator.metric_eval``."""
        loss = self.loss(float_metric, new_metric)
        return loss <= self.max_loss, loss
