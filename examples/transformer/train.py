"""Train the digits transformer and cache its checkpoint.

Usage: ``python examples/transformer/train.py`` writes
``examples/transformer/out/digits_transformer.pt`` and prints the validation accuracy.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn

from examples.checkpoints import load_or_train, train_and_save
from examples.digits.model import load_data
from examples.digits.train import accuracy
from examples.transformer.model import DigitsTransformer, build_model

__all__ = ["CHECKPOINT", "get_trained_model", "main", "train"]

logger = logging.getLogger(__name__)

CHECKPOINT = Path(__file__).resolve().parent / "out" / "digits_transformer.pt"


def train(epochs: int = 40, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
          threads: int = 1, **sizes: int) -> DigitsTransformer:
    """Train on the fixed digits split (the digits example's); eval mode on return.

    Deterministic for a given `seed`. About a minute on two CPU cores with the defaults.

    Args:
        epochs: passes over the 1,438 training images.
        seed: seeds the weights and the batch order.
        batch_size: images per step.
        lr: peak learning rate of AdamW under a one-cycle schedule.
        threads: torch CPU threads while training (restored after); one thread is the
            fastest for a model this small, much faster on a busy machine.
        **sizes: `DigitsTransformer` sizes (dim, heads), e.g. tiny ones for tests.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        images, labels = load_data(seed=0).train
        torch.manual_seed(seed)
        model = DigitsTransformer(**sizes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        loss_fn = nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), batch_size):
                idx = order[start:start + batch_size]
                loss = loss_fn(model(images[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            if epoch % 10 == 0 or epoch == epochs - 1:
                logger.info("epoch %d: last batch loss %.4f", epoch + 1, loss.item())
        return model.eval()
    finally:
        torch.set_num_threads(previous)


def get_trained_model(path: str | Path = CHECKPOINT) -> DigitsTransformer:
    """Load the checkpoint at `path`, or train with the defaults and save it there."""
    return load_or_train(path, build_model, train)


def main() -> None:
    """Train with the defaults, save the checkpoint, print the validation accuracy."""
    model, elapsed = train_and_save(CHECKPOINT, train)
    images, labels = load_data(seed=0).val
    print(f"val accuracy: {accuracy(model, images, labels):.4f} (trained in {elapsed:.1f} s)")
    print(f"saved {CHECKPOINT}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
