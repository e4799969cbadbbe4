"""The digits example's model and data: a small Conv-BN-ReLU CNN on sklearn's 8x8 digits.

Small enough to train in seconds on a CPU, yet with five quantizable layers (three convs, two
linears) so the search has real choices to make.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autoquant.errors import ConfigError

__all__ = ["DigitsCNN", "DigitsData", "build_model", "load_data", "make_loaders"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 Conv (no bias: BN follows) + BatchNorm + ReLU, keeping the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x3 with one max-pool, then Linear(512, 64) + ReLU + Linear(64, 10).

    Why: a realistic conv-net layout (BN to fold, a pool, a classifier head) at toy size.

    Input: float images of shape ``(N, 1, 8, 8)`` in [0, 1]. Output: logits ``(N, 10)``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(1, 16),
            _conv_block(16, 32),
            nn.MaxPool2d(2),
            _conv_block(32, 32),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of 8x8 single-channel images."""
        return self.classifier(self.features(x))


def build_model(checkpoint: str | Path | None = None) -> DigitsCNN:
    """Return a `DigitsCNN` in eval mode, loaded from `checkpoint` (a state dict) if given.

    Why: one place that knows how to rebuild the trained example model.

    Args:
        checkpoint: path of a state dict saved by `examples.digits.train`; None for a
            freshly initialised model.
    """
    model = DigitsCNN()
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


@dataclass(frozen=True)
class DigitsData:
    """The fixed digits split: images ``(N, 1, 8, 8)`` float32 in [0, 1], int64 labels.

    Attributes:
        train: ``(images, labels)`` used for training (1,438 samples).
        val: ``(images, labels)`` held out for accuracy (359 samples).
        calibration: ``(images, labels)``, 128 samples drawn from the training split.
    """

    train: Batch
    val: Batch
    calibration: Batch


def load_data(seed: int = 0, val_fraction: float = 0.2, calibration_size: int = 128) -> DigitsData:
    """Load sklearn's digits and split them deterministically (same `seed`, same split).

    Why: the example, its test and the search must all see exactly the same samples.

    Args:
        seed: seed of the permutation that assigns samples to splits.
        val_fraction: share of the 1,797 samples held out for validation.
        calibration_size: how many training samples form the calibration set.
    """
    from sklearn.datasets import load_digits  # optional dependency: autoquant[examples]

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(labels) * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    calib_idx = train_idx[:calibration_size]
    return DigitsData(
        train=(images[train_idx].contiguous(), labels[train_idx].contiguous()),
        val=(images[val_idx].contiguous(), labels[val_idx].contiguous()),
        calibration=(images[calib_idx].contiguous(), labels[calib_idx].contiguous()),
    )


def _batches(data: Batch, batch_size: int) -> list[Batch]:
    """Split ``(images, labels)`` into a list of consecutive batches."""
    images, labels = data
    return [
        (images[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]


def make_loaders(batch_size: int = 64, seed: int = 0) -> tuple[list[Batch], list[Batch]]:
    """Return ``(train_loader, val_loader)`` as fixed, re-iterable lists of batches.

    Why: lists are deterministic and re-iterable, which is what an `Evaluator` needs.

    Args:
        batch_size: samples per batch (the last batch may be smaller).
        seed: passed to `load_data`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}; use e.g. 64.")
    data = load_data(seed)
    return _batches(data.train, batch_size), _batches(data.val, batch_size)
