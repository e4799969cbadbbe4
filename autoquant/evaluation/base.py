"""The `Evaluator` contract: how autoquant calibrates and measures a user's model.

A user subclasses it (or writes any object with the same methods). autoquant calls
`calibration` once per run on the model with quantizers observing, then `evaluate` once per
trial. Both receive a model in eval mode under `torch.no_grad()`; neither may keep it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import nn

__all__ = ["Evaluator"]


class Evaluator(ABC):
    """Contract between autoquant and the user's data and metric.

    Required: `evaluate(model) -> float`. Usually overridden: `calibration(model)`, which runs
    forward passes over a few representative batches (ranges and sensitivity are measured
    during these passes, so they must exercise every layer that matters). Optional:
    `metric_eval(original, new) -> (ok, loss)` to replace the search's accuracy criterion;
    `evaluate_subset(model) -> float` (the metric on a cheap subset, for
    ``sensitivity_scope="subset"``); `evaluate_holdout(model) -> float` (a re-check on data
    the search never saw); `sensitivity_output(output) -> Tensor`, what the metric reads of
    the model's output (decoded labels, a pitch, boxes): the default ranking then compares
    that, one layer quantized at a time, instead of the raw output.

    Invariants autoquant relies on: `evaluate` is deterministic for a given model (the
    search compares metrics across trials) and does not modify the model's parameters.

    Attributes:
        higher_is_better: False for metrics like loss or perplexity.

    Example:
        >>> class MyEvaluator(Evaluator):
        ...     def calibration(self, model):
        ...         for x, _ in calib_batches:
        ...             model(x)
        ...     def evaluate(self, model):
        ...         return accuracy(model, val_loader)
    """

    higher_is_better: bool = True

    def calibration(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Run forward passes of `model` over calibration data; return nothing.

        The default does nothing, which leaves every layer uncalibrated: override it.
        """

    @abstractmethod
    def evaluate(self, model: nn.Module) -> float:
        """Return the metric of `model` on the evaluation data, as a finite float."""

    def metric_eval(self, original_metric: float, new_metric: float) -> Any:
        """Decide whether `new_metric` is acceptable next to `original_metric`.

        Return ``(ok, loss)``. The default returns ``NotImplemented``, which tells autoquant
        to use the criterion given to the search (``max_loss`` / ``loss_type`` and this
        evaluator's `higher_is_better`). Override it for a custom rule (AMCT style).
        """
        return NotImplemented
