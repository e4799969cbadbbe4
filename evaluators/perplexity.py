"""`PerplexityEvaluator`: language-model perplexity over batches of token ids.

Perplexity is ``exp(mean cross-entropy per target token)``; lower is better, so the search
reads ``higher_is_better = False`` and a relative ``max_loss`` of 0.02 means "at most 2%
higher perplexity than the float model".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoquant.batches import call_model, first_tensor, to_device
from autoquant.errors import ConfigError, ModelError
from autoquant.evaluators.loader import BatchLoaderEvaluator

__all__ = ["PerplexityEvaluator"]


class PerplexityEvaluator(BatchLoaderEvaluator):
    """Perplexity of a language model, calibrated on the first batches of the same loader.

    Each batch is ``(inputs, targets)``: ``inputs`` the model's input (token ids, or a tuple
    passed as ``model(*inputs)``, or a dict passed as ``model(**inputs)``), ``targets`` the
    next-token ids, shape ``(batch, time)``. The model returns logits ``(batch, time,
    vocab)``, or a tuple whose first tensor is that (an LSTM language model's ``(logits,
    hidden)``), or a dict / ``ModelOutput`` with a ``logits`` entry. Batches are
    independent: no recurrent state is carried from one batch to the next.

    Args:
        loader: a re-iterable of ``(inputs, targets)`` batches (a list or a DataLoader).
        calibration_batches: how many leading batches `calibration` runs (>= 1).
        ignore_index: target id that is not scored (padding), as in ``F.cross_entropy``.
        device: where batches go; default the device of the model's first parameter.

    Example:
        >>> evaluator = PerplexityEvaluator(val_batches, calibration_batches=2)
        >>> aq.auto_quantize(model, evaluator, (x,), max_loss=0.02, loss_type="relative")
    """

    higher_is_better: bool = False

    target_name = "targets"

    def __init__(
        self,
        loader: Iterable[Any],
        calibration_batches: int = 2,
        ignore_index: int = -100,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(loader, calibration_batches, device)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise ConfigError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)

    def cross_entropy(self, model: nn.Module) -> float:
        """Mean cross-entropy (nats per scored target token) of `model` over the loader."""
        device = self._device_for(model)
        total, count = 0.0, 0
        with torch.no_grad():
            for index, (inputs, targets) in enumerate(self._batches()):
                logits = first_tensor(call_model(model, to_device(inputs, device)))
                targets = torch.as_tensor(targets).to(logits.device).reshape(-1)
                logits = logits.reshape(-1, logits.shape[-1])
                if logits.shape[0] != targets.shape[0]:
                    raise ModelError(
                        f"batch {index}: the model returned {logits.shape[0]} positions of "
                        f"logits for {targets.shape[0]} targets; expected logits of shape "
                        "(batch, time, vocab) matching targets (batch, time)"
                    )
                total += float(F.cross_entropy(logits.float(), targets, reduction="sum",
                                               ignore_index=self.ignore_index))
                count += int((targets != self.ignore_index).sum())
        if count == 0:
            raise ConfigError("the loader yielded no scored target token; perplexity is "
                              "undefined")
        return total / count

    def evaluate(self, model: nn.Module) -> float:
        """Perplexity ``exp(mean cross-entropy)`` of `model` over every batch (>= 1)."""
        return math.exp(self.cross_entropy(model))
