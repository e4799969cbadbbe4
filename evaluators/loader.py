"""`BatchLoaderEvaluator`: the shared base of evaluators over ``(inputs, target)`` batches.

It validates the loader, moves batches to the model's device and calibrates on the first
batches; subclasses (`ClassificationEvaluator`, `PerplexityEvaluator`) only define the
metric.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from autoquant.batches import call_model, model_device, to_device
from autoquant.errors import ConfigError
from autoquant.evaluators.base import Evaluator

__all__ = ["BatchLoaderEvaluator"]


class BatchLoaderEvaluator(Evaluator):
    """Base of evaluators over a re-iterable of ``(inputs, target)`` batches.

    `inputs` is a tensor, a tuple of tensors (``model(*inputs)``) or a dict of keyword inputs
    (``model(**inputs)``); outputs are read as `autoquant.batches.first_tensor` says.
    Tensors follow the model's device unless `device` is given. Subclasses implement
    `evaluate`; ``target_name`` names the second element in messages.
    """

    target_name = "labels"

    def __init__(
        self,
        loader: Iterable[Any],
        calibration_batches: int = 4,
        device: str | torch.device | None = None,
    ) -> None:
        if isinstance(loader, Iterator):
            raise ConfigError(
                f"loader is a one-shot iterator ({type(loader).__name__}); the evaluator "
                "iterates it once per trial. Pass a list of batches or a DataLoader instead."
            )
        if not isinstance(loader, Iterable):
            raise ConfigError(
                f"loader must be an iterable of (inputs, {self.target_name}) batches, got "
                f"{type(loader).__name__}; pass a DataLoader or a list of batches."
            )
        if (
            isinstance(calibration_batches, bool)
            or not isinstance(calibration_batches, numbers.Integral)
            or calibration_batches < 1
        ):
            raise ConfigError(
                f"calibration_batches must be an int >= 1, got {calibration_batches!r}; "
                "use e.g. 4 (a few hundred samples are usually enough)."
            )
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"device {device!r} is not a valid torch device; use e.g. 'cpu' or 'cuda:0', "
                "or leave it None to follow the model."
            ) from exc
        self.loader = loader
        self.calibration_batches = int(calibration_batches)

    def _batches(self) -> Iterator[tuple[Any, Any]]:
        """Yield ``(inputs, target)`` pairs, checking the shape of each batch."""
        for index, batch in enumerate(self.loader):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ConfigError(
                    f"batch {index} of the loader is {type(batch).__name__} {batch!r:.60}; "
                    f"expected an (inputs, {self.target_name}) pair. Make the loader yield "
                    f"(inputs, {self.target_name})."
                )
            yield batch[0], batch[1]

    def _device_for(self, model: nn.Module) -> torch.device:
        return self.device if self.device is not None else model_device(model)

    def calibration(self, model: nn.Module) -> None:
        """Run `model` over the first `calibration_batches` batches of the loader.

        Why: quantizer observers record ranges during these forward passes.

        Raises:
            ConfigError: if the loader yields no batch.
        """
        device = self._device_for(model)
        seen = 0
        with torch.no_grad():
            for inputs, _ in self._batches():
                if seen >= self.calibration_batches:
                    break
                call_model(model, to_device(inputs, device))
                seen += 1
        if seen == 0:
            raise ConfigError(
                "the loader yielded no batch, so nothing was calibrated; pass a loader with "
                f"at least one (inputs, {self.target_name}) batch."
            )

