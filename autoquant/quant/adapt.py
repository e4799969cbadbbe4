"""Modules of other libraries rewritten, in the working copy, to what they compute, so that
they quantize as the layers autoquant knows: Hugging Face's GPT-2-style ``Conv1D`` (a
Linear whose weight is stored (in, out)) becomes an `nn.Linear`, and
`nn.TransformerEncoder` stops packing padded batches into nested tensors, which the
quantized attention cannot read. Classes are matched by name: nothing is imported."""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["Conv1DLinear", "adapt_library_modules"]

logger = logging.getLogger(__name__)

_CONV1D = "transformers.pytorch_utils.Conv1D"


class Conv1DLinear(nn.Linear):
    """transformers' ``Conv1D`` as the `nn.Linear` it computes (``x @ W + b`` with ``W``
    stored (in, out) is ``F.linear(x, W.T, b)``); keeps its ``nf`` and ``nx``."""

    @classmethod
    def from_conv1d(cls, module: nn.Module) -> Conv1DLinear:
        weight = module.weight.detach()
        linear = cls(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                     device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias.detach())
        linear.nf, linear.nx = weight.shape[1], weight.shape[0]
        return linear


def adapt_library_modules(model: nn.Module) -> None:
    """Rewrite `model` (our copy) in place; see the module docstring. Only the ``Conv1D``
    class itself is rewritten: a subclass may compute something else."""
    swapped: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in swapped:
                setattr(parent, name, swapped[id(child)])
            elif f"{type(child).__module__}.{type(child).__qualname__}" == _CONV1D and \
                    isinstance(getattr(child, "weight", None), torch.Tensor) and \
                    child.weight.dim() == 2:
                swapped[id(child)] = Conv1DLinear.from_conv1d(child)
                setattr(parent, name, swapped[id(child)])
        if isinstance(parent, nn.TransformerEncoder) and getattr(
                parent, "use_nested_tensor", False):
            parent.use_nested_tensor = False
            logger.info("nn.TransformerEncoder: nested tensors off in autoquant's copy (its "
                        "quantized attention reads padded batches; padded positions are "
                        "computed instead of zeroed)")
    if swapped:
        logger.info("%d transformers Conv1D module(s) quantize as nn.Linear", len(swapped))
