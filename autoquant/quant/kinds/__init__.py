"""Layer kinds beyond Linear/Conv, each with its own wrapper, registered at import.

=====================  ==================================  ===========================
module type            wrapper                             what is quantized
=====================  ==================================  ===========================
nn.Embedding(Bag)      `QuantEmbedding`                    table per row; weight-only
nn.RNN/LSTM/GRU        `QuantRNN`                          every weight per gate row;
                                                           input (static/dynamic)
nn.MultiheadAttention  `QuantMultiheadAttention`           projections + both matmuls
`QuantMatMul`          `QuantMatMulLayer`                  both matmul operands
=====================  ==================================  ===========================

`convert_matmuls` rewrites a traceable model's ``torch.matmul``/``@`` between activations
into `QuantMatMul` units. `autoquant.quant.qmodel` imports this package, so the kinds are
always registered before any model is wrapped. Register more with
`autoquant.quant.layers.register_layer_kind`.
"""

from __future__ import annotations

from torch import nn

from autoquant.quant.kind_registry import register_layer_kind
from autoquant.quant.kinds.attention import QuantMatMul, QuantMatMulLayer, QuantMultiheadAttention
from autoquant.quant.kinds.base import MultiQuantLayer, primary_tensor
from autoquant.quant.kinds.embedding import QuantEmbedding
from autoquant.quant.kinds.fx_matmul import convert_matmuls
from autoquant.quant.kinds.rnn import QuantRNN

__all__ = [
    "MultiQuantLayer",
    "QuantEmbedding",
    "QuantMatMul",
    "QuantMatMulLayer",
    "QuantMultiheadAttention",
    "QuantRNN",
    "convert_matmuls",
    "primary_tensor",
]

register_layer_kind(nn.Embedding, 0, QuantEmbedding)
register_layer_kind(nn.EmbeddingBag, 0, QuantEmbedding)
register_layer_kind(nn.RNN, 0, QuantRNN)
register_layer_kind(nn.LSTM, 0, QuantRNN)
register_layer_kind(nn.GRU, 0, QuantRNN)
register_layer_kind(nn.MultiheadAttention, 0, QuantMultiheadAttention)
register_layer_kind(QuantMatMul, 0, QuantMatMulLayer)
