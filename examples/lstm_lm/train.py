"""Train the character LSTM language model and cache its checkpoint.

Usage: ``python examples/lstm_lm/train.py`` writes ``examples/lstm_lm/out/char_lstm.pt`` and
prints the validation perplexity. `get_trained_model` reuses the checkpoint when present.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F

from examples.checkpoints import load_or_train, train_and_save
from examples.lstm_lm.data import load_corpus, make_batches
from examples.lstm_lm.model import CharLSTM, build_model

__all__ = ["CHECKPOINT", "get_trained_model", "main", "perplexity", "train"]

logger = logging.getLogger(__name__)

CHECKPOINT = Path(__file__).resolve().parent / "out" / "char_lstm.pt"


def perplexity(model: torch.nn.Module, batches: list) -> float:
    """exp(mean cross-entropy) of `model` over ``(inputs, targets)`` batches, eval mode."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)[0]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                           reduction="sum"))
            count += y.numel()
    return math.exp(total / count)


def train(steps: int = 1200, seed: int = 0, batch_size: int = 32, seq_len: int = 48,
          lr: float = 5e-3, threads: int = 1, **sizes: int) -> CharLSTM:
    """Train a `CharLSTM` on the training split for `steps` Adam steps; eval mode on return.

    Deterministic for a given `seed` and Python version (the corpus is the stdlib's text).
    With the defaults it takes one to two minutes on two CPU cores.

    Args:
        steps: optimisation steps (batches of `batch_size` random windows of `seq_len`).
        seed: seeds the weights and the window sampling.
        batch_size: windows per step.
        seq_len: characters per window (truncated back-propagation length).
        lr: peak learning rate of the one-cycle schedule.
        threads: torch CPU threads while training (restored after); one thread is the
            fastest for a model this small, much faster on a busy machine.
        **sizes: `CharLSTM` sizes (embed, hidden), e.g. tiny ones for tests.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ids = load_corpus().train
        torch.manual_seed(seed)
        model = CharLSTM(**sizes)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seq_len + 1)
        model.train()
        for step in range(steps):
            starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
            window = ids[starts[:, None] + offsets]
            logits = model(window[:, :-1])[0]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if step % 50 == 0 or step == steps - 1:
                logger.info("step %d: train loss %.3f", step, loss.item())
        return model.eval()
    finally:
        torch.set_num_threads(previous)


def get_trained_model(path: str | Path = CHECKPOINT) -> CharLSTM:
    """Load the checkpoint at `path`, or train with the defaults and save it there."""
    return load_or_train(path, build_model, train)


def main() -> None:
    """Train with the defaults, save the checkpoint, print validation perplexity."""
    model, elapsed = train_and_save(CHECKPOINT, train)
    val = make_batches(load_corpus().val, 32, 64)
    print(f"val perplexity: {perplexity(model, val):.3f} (trained in {elapsed:.1f} s)")
    print(f"saved {CHECKPOINT}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
