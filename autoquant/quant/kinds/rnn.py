"""`QuantRNN`: fake quantization of `nn.LSTM` and `nn.GRU` (any layers, directions, proj).

Every weight matrix (``weight_ih_l<k>[_reverse]``, ``weight_hh_l<k>[_reverse]`` and
``weight_hr_l<k>`` with ``proj_size``) is quantized per output row. A row belongs to one
gate of one hidden unit (PyTorch stacks the gates i|f|g|o or r|z|n along axis 0), so
per-row is per gate, per channel. Biases stay float. The input sequence is fake-quantized
as an activation (static or dynamic mode); the recurrent state is left float.

The quantized forward is the module's own forward run through `torch.func.functional_call`
with the fake-quant weights, so it is correct for every RNN option and device (on CUDA the
weights are then not one flattened cuDNN buffer, which costs speed, not correctness).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence

from autoquant.config import LayerConfig
from autoquant.quant.kinds.base import MultiQuantLayer

__all__ = ["QuantRNN", "rnn_weight_names"]


def rnn_weight_names(module: nn.RNNBase) -> tuple[str, ...]:
    """The weight matrices of an RNN module, every layer and direction (no biases)."""
    return tuple(n for n in module._flat_weights_names if n.startswith("weight_"))


class QuantRNN(MultiQuantLayer):
    """Wrapper of an `nn.LSTM`/`nn.GRU` (see the module docstring); one activation point,
    ``input``."""

    def __init__(self, module: nn.Module, name: str, config: LayerConfig, weight_axis: int):
        super().__init__(module, name, config, weight_axis, rnn_weight_names(module),
                         ("input",))

    def compute(self, args: tuple, kwargs: dict) -> Any:
        x, rest = args[0], args[1:]
        if isinstance(x, PackedSequence):
            x = x._replace(data=self.qa("input", x.data))
        else:
            x = self.qa("input", x)
        if not self.quantizing:
            return self.module(x, *rest, **kwargs)
        params = {n: self.qw(n) for n in self.weight_names}
        with warnings.catch_warnings():
            # cuDNN warns that the swapped-in weights are not one contiguous chunk
            warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
            return functional_call(self.module, params, (x, *rest), kwargs)

    def kernel_note(self) -> str | None:
        """onnxruntime runs ONNX LSTM/GRU/RNN in float on the dequantized weights (its
        integer DynamicQuantizeLSTM is not emitted)."""
        if self._weight_q is None:
            return "float"
        return ("onnxruntime runs the ONNX recurrent op in float on dequantized weights (its "
                "integer DynamicQuantizeLSTM is not emitted)")
