"""A small pre-LayerNorm transformer encoder on sklearn digits, rows as tokens.

Each 8x8 digit is a sequence of 8 tokens (its rows, 8 features each). Two encoder blocks
(explicit Q/K/V/out projections, LayerNorm, GELU MLP), mean pooling and a linear head: 14
quantizable Linear layers, with the LayerNorm -> Linear structure smoothing works on.
Trains in well under a minute on two CPU cores to ~97% validation accuracy.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyTransformer", "train_transformer", "token_loaders"]

logger = logging.getLogger(__name__)


class EncoderBlock(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)), with separate Q, K, V projections."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``(batch, tokens, dim)``."""
        b, t, d = x.shape
        h = self.ln1(x)
        q = self.q(h).reshape(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(h).reshape(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(h).reshape(b, t, self.heads, -1).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(att)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token embedding + position embedding, `depth` encoder blocks, LN, mean pool, head.

    Input: ``(N, 1, 8, 8)`` digit images in [0, 1] (the digits example's format). Output:
    logits ``(N, 10)``.
    """

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        x = self.embed(images.reshape(images.shape[0], 8, 8)) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def train_transformer(epochs: int = 40, seed: int = 0, lr: float = 3e-3) -> TinyTransformer:
    """Train a `TinyTransformer` on the digits example's fixed training split (seeded)."""
    from examples.digits.model import load_data

    data = load_data(seed)
    images, labels = data.train
    torch.manual_seed(seed)
    model = TinyTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(labels) + 63) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            optimizer.step()
            scheduler.step()
        logger.debug("transformer epoch %d done", epoch + 1)
    return model.eval()


def token_loaders(batch_size: int = 64) -> tuple[list, list]:
    """The digits example's ``(train, val)`` loaders (images; the model tokenizes rows)."""
    from examples.digits.model import make_loaders

    return make_loaders(batch_size=batch_size)
