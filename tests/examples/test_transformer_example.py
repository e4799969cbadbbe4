"""The transformer example: both attention styles are searchable units; a tiny model's
search meets its accuracy budget."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from autoquant.quant.qmodel import find_quantizable_layers  # noqa: E402
from examples.digits.model import load_data, make_loaders  # noqa: E402
from examples.digits.train import accuracy  # noqa: E402
from examples.transformer.model import DigitsTransformer  # noqa: E402
from examples.transformer.run_search import search  # noqa: E402
from examples.transformer.train import train  # noqa: E402


def test_units_cover_mha_and_quantmatmul_attention() -> None:
    names = find_quantizable_layers(DigitsTransformer())
    assert "blocks.0.attn" in names  # nn.MultiheadAttention as one unit
    assert {"blocks.1.attn.scores", "blocks.1.attn.mix", "pos"} <= set(names)
    assert not any(n.startswith("blocks.0.attn.") for n in names)




@pytest.mark.slow
def test_tiny_transformer_trains_and_its_search_meets_the_threshold() -> None:
    model = train(epochs=8, lr=5e-3, dim=24, heads=2)
    images, labels = load_data(seed=0).val
    assert accuracy(model, images, labels) >= 0.85
    _, val_loader = make_loaders(batch_size=128)
    result = search(model, val_loader, max_loss=0.02)
    assert result.met and result.loss <= 0.02
    assert "blocks.0.attn" in {r.name for r in result.sensitivity}
    with torch.no_grad():
        assert accuracy(result.model, images, labels) >= accuracy(model, images, labels) - 0.02
