"""`QuantEmbedding`: weight-only fake quantization of `nn.Embedding` / `nn.EmbeddingBag`.

The input is integer indices, which are never quantized: the layer is always weight-only,
whatever ``mode`` its config says. The table is quantized per row (one scale per token
vector, the weight's axis 0), which is what a deployed int8 embedding lookup stores.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from autoquant.config import LayerConfig
from autoquant.quant.layers import QuantLayer

__all__ = ["QuantEmbedding", "LOOKUP_NOTE"]

# why an embedding runs no integer kernel: a lookup has no product to compute in integers
LOOKUP_NOTE = "an embedding lookup (integer rows gathered, then dequantized)"


class QuantEmbedding(QuantLayer):
    """`QuantLayer` for embedding tables: per-row weight quantization, float indices path.

    The scheme label stays ``"w<b>a<b>"`` (plans are uniform); its activation bits are
    ignored.
    """

    def __init__(self, module: nn.Module, name: str, config: LayerConfig, weight_axis: int):
        super().__init__(module, name, dataclasses.replace(config, mode="weight_only"),
                         weight_axis)

    def kernel_note(self) -> str | None:
        """A lookup, no integer kernel: the export gathers the integer rows, then scales them."""
        return "float" if self._weight_q is None else LOOKUP_NOTE
