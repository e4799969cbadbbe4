"""`ClassificationEvaluator`: top-1 accuracy over a loader of ``(inputs, labels)`` batches.

The common case needs no subclass: hand autoquant the validation loader and the first few
batches double as calibration data.
"""

from __future__ import annotations

import torch
from torch import nn

from autoquant.batches import call_model, first_tensor, to_device
from autoquant.errors import ConfigError, ModelError
from autoquant.evaluators.loader import BatchLoaderEvaluator

__all__ = ["ClassificationEvaluator"]


class ClassificationEvaluator(BatchLoaderEvaluator):
    """Top-1 accuracy of a classifier, calibrated on the first batches of the same loader.

    Why: most users have a labelled validation loader and nothing else; this turns it into
    an evaluator without writing a subclass.

    Args:
        loader: a re-iterable of ``(inputs, labels)`` batches (a DataLoader or a list).
            ``inputs`` is a tensor, a tuple of tensors passed as ``model(*inputs)`` or a
            dict passed as ``model(**inputs)``; ``labels`` holds class indices. The model
            returns logits ``(batch, classes)``, or a tuple/list whose first tensor is such
            logits, or a dict / ``ModelOutput`` with a ``logits`` entry.
        calibration_batches: how many leading batches `calibration` runs (>= 1).
        device: where batches are moved; default: the device of the model's first parameter
            (CPU for a model without parameters).

    Raises:
        ConfigError: for a one-shot iterator, a non-iterable, or a bad `calibration_batches`.

    Example:
        >>> evaluator = ClassificationEvaluator(val_loader, calibration_batches=4)
        >>> evaluator.evaluate(model)
        0.9722222222222222
    """

    higher_is_better: bool = True

    def evaluate(self, model: nn.Module) -> float:
        """Return the top-1 accuracy of `model` over every batch, in [0, 1].

        Why: the metric the search keeps within ``max_loss`` of the float model.

        Raises:
            ConfigError: if the loader yields no sample.
            ModelError: if the output does not match the labels' batch size.
        """
        device = self._device_for(model)
        correct = 0
        total = 0
        with torch.no_grad():
            for inputs, labels in self._batches():
                logits = first_tensor(call_model(model, to_device(inputs, device)))
                labels = torch.as_tensor(labels).to(logits.device).reshape(-1)
                predictions = logits.reshape(logits.shape[0], -1).argmax(dim=1)
                if predictions.shape[0] != labels.shape[0]:
                    raise ModelError(
                        f"the model returned {predictions.shape[0]} predictions for a batch of "
                        f"{labels.shape[0]} labels; expected logits of shape (batch, classes)."
                    )
                correct += int((predictions == labels).sum().item())
                total += int(labels.shape[0])
        if total == 0:
            raise ConfigError(
                "the loader yielded no sample, so accuracy is undefined; pass a loader with "
                "at least one non-empty (inputs, labels) batch."
            )
        return correct / total
