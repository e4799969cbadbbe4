"""The model: Embedding -> LSTM -> LSTM -> Linear decoder, over characters.

Why this shape: it is the classic word-language-model layout that PyTorch's dynamic
quantization tutorial uses (embedding, recurrent stack, linear decoder), at a size that
trains in about two minutes on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from examples.lstm_lm.data import VOCAB

__all__ = ["CharLSTM", "build_model"]


class CharLSTM(nn.Module):
    """A two-LSTM character language model.

    Input: character ids ``(batch, time)``. Output: ``(logits, hidden)`` with logits of
    shape ``(batch, time, vocab)`` and the final ``(h, c)`` state of each LSTM.
    """

    def __init__(self, vocab: int = len(VOCAB), embed: int = 32, hidden: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, embed)
        self.lstm1 = nn.LSTM(embed, hidden, batch_first=True)
        self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, idx: torch.Tensor, hidden: tuple | None = None) -> tuple:
        """Return ``(logits, (state1, state2))`` for a batch of character ids."""
        h1, h2 = hidden if hidden is not None else (None, None)
        x = self.drop(self.encoder(idx))
        x, s1 = self.lstm1(x, h1)
        x, s2 = self.lstm2(self.drop(x), h2)
        return self.decoder(self.drop(x)), (s1, s2)


def build_model(checkpoint: str | Path | None = None, **kwargs: int) -> CharLSTM:
    """A `CharLSTM` in eval mode, loaded from `checkpoint` (a state dict) if given.

    Args:
        checkpoint: a state dict saved by `examples.lstm_lm.train`; None for a fresh model.
        **kwargs: `CharLSTM` sizes (embed, hidden) for tiny test models.
    """
    model = CharLSTM(**kwargs)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()
