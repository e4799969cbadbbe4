"""`StdlibTextPerplexity`: the example's evaluator, constructible from plain keyword
arguments (so a YAML job can name it by import path)."""

from __future__ import annotations

from autoquant.evaluators import PerplexityEvaluator
from examples.lstm_lm.data import load_corpus, make_batches

__all__ = ["StdlibTextPerplexity"]


class StdlibTextPerplexity(PerplexityEvaluator):
    """Perplexity on a split of the docstring corpus; calibrates on its first batches.

    Args:
        split: ``"val"`` or ``"test"``.
        batch_size: windows per batch.
        seq_len: characters per window.
        max_batches: cap on the number of batches (None: the whole split).
        calibration_batches: leading batches used for calibration.
    """

    def __init__(self, split: str = "val", batch_size: int = 32, seq_len: int = 64,
                 max_batches: int | None = None, calibration_batches: int = 2) -> None:
        corpus = load_corpus()
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        batches = make_batches(getattr(corpus, split), batch_size, seq_len, max_batches)
        super().__init__(batches, calibration_batches=calibration_batches)
