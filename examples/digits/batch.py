"""Factories for running the digits example as a batch job (``examples/digits/job.yaml``).

The job file names these by import path: `trained_model` (trains and caches the checkpoint
on first use) and `DigitsEvaluator` (top-1 accuracy on the held-out split, calibrated on
its first batches).
"""

from __future__ import annotations

from pathlib import Path

from autoquant.evaluators import ClassificationEvaluator
from examples.digits.model import DigitsCNN, make_loaders
from examples.digits.train import CHECKPOINT, get_trained_model

__all__ = ["DigitsEvaluator", "trained_model"]


def trained_model(checkpoint: str | Path = CHECKPOINT) -> DigitsCNN:
    """The trained digits CNN: loaded from `checkpoint`, trained and saved there if missing."""
    return get_trained_model(checkpoint)


class DigitsEvaluator(ClassificationEvaluator):
    """Validation accuracy of the digits CNN; the first batches double as calibration data.

    Args:
        batch_size: samples per batch of the validation loader.
        calibration_batches: how many leading batches calibrate.
    """

    def __init__(self, batch_size: int = 64, calibration_batches: int = 4) -> None:
        _, val_loader = make_loaders(batch_size=batch_size)
        super().__init__(val_loader, calibration_batches=calibration_batches)
