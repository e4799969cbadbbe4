"""Shared by the examples: load a cached checkpoint, or train once and cache it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch import nn

from autoquant.io import atomic_torch_save

__all__ = ["load_or_train"]

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
    model = train()
    atomic_torch_save(path, model.state_dict())
    return model
