"""The model: a two-block pre-norm transformer encoder over the 8 pixel rows of a digit.

Block 0 uses `nn.MultiheadAttention`; block 1 a hand-written attention whose two
activation matmuls are `autoquant.QuantMatMul` modules, so both ways of writing attention
are searched. Each block: LayerNorm -> self-attention -> residual, LayerNorm -> MLP
(Linear, GELU, Linear) -> residual. Then LayerNorm, mean over tokens, a linear head.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import autoquant as aq

__all__ = ["DigitsTransformer", "MatMulSelfAttention", "build_model"]


class MatMulSelfAttention(nn.Module):
    """Multi-head self-attention written with `autoquant.QuantMatMul` for q·kᵀ and attn·v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.scores = aq.QuantMatMul()
        self.mix = aq.QuantMatMul()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over ``x`` of shape ``(batch, tokens, dim)``."""
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        attn = self.scores(q / math.sqrt(d // self.heads), k.transpose(-2, -1)).softmax(-1)
        return self.proj(self.mix(attn, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm encoder block; `kind` is ``"mha"`` or ``"matmul"`` attention."""

    def __init__(self, dim: int, heads: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(dim)
        if kind == "mha":
            self.attn: nn.Module = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            self.attn = MatMulSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block over ``(batch, tokens, dim)``."""
        h = self.norm1(x)
        h = self.attn(h, h, h, need_weights=False)[0] if self.kind == "mha" else self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class DigitsTransformer(nn.Module):
    """Classify 8x8 digits read as 8 tokens (rows) of 8 pixels.

    Input: images ``(N, 1, 8, 8)`` or ``(N, 8, 8)`` in [0, 1]. Output: logits ``(N, 10)``.
    """

    def __init__(self, dim: int = 48, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Embedding(8, dim)
        self.blocks = nn.Sequential(Block(dim, heads, "mha"), Block(dim, heads, "matmul"))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.register_buffer("positions", torch.arange(8), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        x = self.embed(images.reshape(images.shape[0], 8, 8)) + self.pos(self.positions)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def build_model(checkpoint: str | Path | None = None, **kwargs: int) -> DigitsTransformer:
    """A `DigitsTransformer` in eval mode, loaded from `checkpoint` (a state dict) if given."""
    model = DigitsTransformer(**kwargs)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()
