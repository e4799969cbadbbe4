"""Shared by the examples: train and save a checkpoint, or load the cached one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch import nn

from autoquant.io.atomic import atomic_torch_save

__all__ = ["load_or_train", "train_and_save"]

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)


def load_or_train(path: str | Path, build: Callable[[Path], M], train: Callable[[], M]) -> M:
    """`build(path)` if the checkpoint loads, else `train()` and save its state dict at `path`.

    Why: the examples' searches should not retrain on every run; a stale or corrupt
    checkpoint is retrained rather than fatal.
    """
    path = Path(path)
    if path.exists():
        try:
            return build(path)
        except (RuntimeError, OSError) as exc:
            logger.warning("could not load %s (%s); retraining", path, exc)
    return train_and_save(path, train)[0]


def train_and_save(path: str | Path, train: Callable[[], M]) -> tuple[M, float]:
    """`train()`, then save its state dict at `path` atomically (folders created).

    Returns the model and the training time in seconds (the save not included).
    """
    start = time.perf_counter()
    model = train()
    elapsed = time.perf_counter() - start
    atomic_torch_save(path, model.state_dict())
    return model, elapsed
