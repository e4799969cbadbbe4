"""`PerplexityEvaluator`: language-model perplexity over batches of token ids.

Perplexity is ``exp(mean cross-entropy per target token)``; lower is better, so the search
reads ``higher_is_better = False`` and a relative ``max_loss`` of 0.02 means "at most 2%
higher perplexity than the float model".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoquant.errors import ConfigError, ModelError
from evaluators.base import Evaluator
from evaluators.classification import _call, _first_tensor, _model_device, _to_device

__all__ = ["PerplexityEvaluator"]


class PerplexityEvaluator(Evaluator):
    """Perplexity of a language model, calibrated on the first batches of the same loader.

    Each batch is ``(inputs, targets)``: ``inputs`` the model's input (token ids, or a tuple
    passed as ``model(*inputs)``), ``targets`` the next-token ids, shape ``(batch, time)``.
    The model returns logits ``(batch, time, vocab)`` (or a tuple whose first tensor is
    that, as an LSTM language model returning ``(logits, hidden)`` does). Batches are
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

    def __init__(
        self,
        loader: Iterable[Any],
        calibration_batches: int = 2,
        ignore_index: int = -100,
        device: str | torch.device | None = None,
    ) -> None:
        if isinstance(loader, Iterator) or not isinstance(loader, Iterable):
            raise ConfigError(
                f"loader must be a re-iterable of (inputs, targets) batches, got "
                f"{type(loader).__name__}; pass a list of batches or a DataLoader"
            )
        if isinstance(calibration_batches, bool) or not isinstance(
                calibration_batches, numbers.Integral) or calibration_batches < 1:
            raise ConfigError(
                f"calibration_batches must be an int >= 1, got {calibration_batches!r}"
            )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise ConfigError(f"ignore_index must be an int, got {ignore_index!r}")
        self.loader = loader
        self.calibration_batches = int(calibration_batches)
        self.ignore_index = int(ignore_index)
        self.device = None if device is None else torch.device(device)

    def _batches(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for index, batch in enumerate(self.loader):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ConfigError(
                    f"batch {index} is {type(batch).__name__} {batch!r:.60}; expected an "
                    "(inputs, targets) pair of token-id tensors"
                )
            yield batch[0], torch.as_tensor(batch[1])

    def calibration(self, model: nn.Module) -> None:
        """Run `model` on the first `calibration_batches` batches."""
        device = self.device or _model_device(model)
        seen = 0
        with torch.no_grad():
            for inputs, _ in self._batches():
                if seen >= self.calibration_batches:
                    break
                _call(model, _to_device(inputs, device))
                seen += 1
        if seen == 0:
            raise ConfigError("the loader yielded no batch, so nothing was calibrated")

    def cross_entropy(self, model: nn.Module) -> float:
        """Mean cross-entropy (nats per scored target token) of `model` over the loader."""
        device = self.device or _model_device(model)
        total, count = 0.0, 0
        with torch.no_grad():
            for index, (inputs, targets) in enumerate(self._batches()):
                logits = _first_tensor(_call(model, _to_device(inputs, device)))
                targets = targets.to(logits.device).reshape(-1)
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
