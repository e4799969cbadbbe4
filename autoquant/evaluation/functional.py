"""The functional form, as NNCF and Intel Neural Compressor users write it: a function that
returns the metric and the data to calibrate on, instead of an `Evaluator` class.

``auto_quantize(model, evaluate=fn, calibration_data=loader)`` builds a `FunctionEvaluator`
from them; everything else (the adapter, timeouts, checks) is the same as for a class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from autoquant.batches import call_model, model_device, to_device
from autoquant.errors import ConfigError
from autoquant.evaluation.base import Evaluator

__all__ = ["FunctionEvaluator", "calibration_inputs"]


def calibration_inputs(batch: Any) -> Any:
    """The model inputs in one `calibration_data` batch.

    A tensor, a tuple (``model(*batch)``) or a dict (``model(**batch)``) is the input
    itself; a *list* is what a ``DataLoader`` yields for a dataset of ``(inputs, target)``
    samples (or of ``(inputs,)``), so its first element is the input.
    """
    if isinstance(batch, list):
        if not batch:
            raise ConfigError("a calibration_data batch is an empty list; yield inputs")
        return batch[0]
    return batch


class FunctionEvaluator(Evaluator):
    """An `Evaluator` made of a metric function and calibration data.

    Args:
        evaluate: ``evaluate(model) -> float``, the metric of a model.
        calibration_data: a re-iterable of batches (a ``DataLoader`` or a list; see
            `calibration_inputs` for what a batch is), run through the model once per
            calibration pass; None leaves calibration to `calibration` passed explicitly.
        higher_is_better: False for a loss or perplexity.
        calibration: optional ``calibration(model)`` that replaces `calibration_data`.
        max_batches: how many batches of `calibration_data` a pass runs (None: all).

    Example:
        >>> def accuracy(model): ...
        >>> evaluator = FunctionEvaluator(accuracy, calibration_data=calib_loader)
    """

    def __init__(self, evaluate: Callable[[nn.Module], float],
                 calibration_data: Iterable[Any] | None = None, higher_is_better: bool = True,
                 calibration: Callable[[nn.Module], None] | None = None,
                 max_batches: int | None = None) -> None:
        if not callable(evaluate):
            raise ConfigError(f"evaluate must be a function evaluate(model) -> float, got "
                              f"{type(evaluate).__name__}")
        if calibration_data is None and calibration is None:
            raise ConfigError("pass calibration_data (a DataLoader or a list of batches) or "
                              "calibration(model), so that autoquant can calibrate")
        if calibration_data is not None:
            if isinstance(calibration_data, Iterator):
                raise ConfigError(
                    f"calibration_data is a one-shot iterator "
                    f"({type(calibration_data).__name__}); calibration runs several passes. "
                    "Pass a list of batches or a DataLoader instead.")
            if isinstance(calibration_data, (torch.Tensor, Mapping)) or \
                    not isinstance(calibration_data, Iterable):
                raise ConfigError(
                    f"calibration_data must be a DataLoader or a list of batches, got "
                    f"{type(calibration_data).__name__}; wrap a single batch as [x]")
        if max_batches is not None and (isinstance(max_batches, bool) or
                                        not isinstance(max_batches, int) or max_batches < 1):
            raise ConfigError(f"max_batches must be an int >= 1 or None, got {max_batches!r}")
        if not isinstance(higher_is_better, bool):
            raise ConfigError(f"higher_is_better must be True or False, got "
                              f"{higher_is_better!r}")
        self._evaluate = evaluate
        self._calibration = calibration
        self.calibration_data = calibration_data
        self.max_batches = max_batches
        self.higher_is_better = higher_is_better

    def calibration(self, model: nn.Module) -> None:
        """Run `model` over `calibration_data` (or the given `calibration` function)."""
        if self._calibration is not None:
            self._calibration(model)
            return
        device = model_device(model)
        assert self.calibration_data is not None
        for i, batch in enumerate(self.calibration_data):
            if self.max_batches is not None and i >= self.max_batches:
                break
            call_model(model, to_device(calibration_inputs(batch), device))

    def evaluate(self, model: nn.Module) -> float:
        """The metric function's value for `model`."""
        return self._evaluate(model)
