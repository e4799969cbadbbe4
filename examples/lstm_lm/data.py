"""The corpus: docstrings of a fixed list of standard-library modules, as characters.

Why docstrings: they are English prose and ship with every Python, so the example needs no
download. The module list and the walk order are fixed, so a given Python version always
yields the same text. Characters outside printable ASCII map to one unknown id.
"""

from __future__ import annotations

import functools
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from examples.lstm_lm.corpus import MODULES

__all__ = [
    "MODULES",
    "VOCAB",
    "Corpus",
    "collect_docstrings",
    "encode",
    "example_inputs",
    "load_corpus",
    "make_batches",
]

VOCAB = "\x00\n" + "".join(c for c in string.printable if c not in "\n\r\x0b\x0c")
_INDEX = {c: i for i, c in enumerate(VOCAB)}  # id 0 is "unknown"


def collect_docstrings() -> str:
    """The docstrings of `MODULES` and of their public classes, functions and methods.

    Why: a deterministic English corpus of about 330,000 characters from Python itself,
    collected in a fresh interpreter (`examples.lstm_lm.corpus`) so that what this process
    imported cannot change it.
    """
    script = Path(__file__).with_name("corpus.py")
    out = subprocess.run([sys.executable, "-I", str(script)], capture_output=True, check=True)
    return out.stdout.decode("utf-8")


def encode(text: str) -> torch.Tensor:
    """Character ids (int64) of `text`; unknown characters map to 0."""
    return torch.tensor([_INDEX.get(c, 0) for c in text], dtype=torch.int64)


@dataclass(frozen=True)
class Corpus:
    """The encoded corpus split by position: 90% train, 5% validation, 5% test."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """Collect, encode and split the corpus (the same for a given Python version; cached)."""
    ids = encode(collect_docstrings())
    n = len(ids)
    a, b = int(n * 0.9), int(n * 0.95)
    return Corpus(ids[:a], ids[a:b], ids[b:])


def make_batches(ids: torch.Tensor, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut `ids` into ``(inputs, targets)`` batches of shape ``(batch_size, seq_len)``.

    Each row is a contiguous window; targets are the inputs shifted by one character.
    """
    window = seq_len + 1
    rows = (len(ids) - 1) // seq_len
    starts = [i * seq_len for i in range(rows) if i * seq_len + window <= len(ids)]
    batches = []
    for i in range(0, len(starts) - batch_size + 1, batch_size):
        chunk = torch.stack([ids[s:s + window] for s in starts[i:i + batch_size]])
        batches.append((chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()))
        if max_batches is not None and len(batches) >= max_batches:
            break
    return batches


def example_inputs(batch_size: int = 2, seq_len: int = 16) -> tuple[torch.Tensor]:
    """A tuple with one batch of character ids, to check that the model runs."""
    return (torch.zeros(batch_size, seq_len, dtype=torch.int64),)
