"""`convert_matmuls`: turn activation matmuls of a traceable model into `QuantMatMul` units.

For models whose attention calls ``torch.matmul`` / ``@`` / ``torch.bmm`` directly, this
rewrites a copy of the model with `torch.fx` so that every matmul between two activations
becomes a `QuantMatMul` submodule (``matmul_0``, ``matmul_1``, ... in graph order), which the
search then treats as a named unit. A matmul with a parameter or buffer operand is left
alone (a weight, also transposed or reshaped, is not an activation). Models that do not
trace are a clear `ModelError`; using `QuantMatMul` in the model's code works for every
model.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import nn

from autoquant.errors import ModelError
from autoquant.quant.copying import copy_model
from autoquant.quant.kinds.attention import QuantMatMul

__all__ = ["convert_matmuls"]

logger = logging.getLogger(__name__)

_FUNCTIONS = (torch.matmul, operator.matmul, torch.bmm)
_METHODS = ("matmul", "bmm", "__matmul__")


def convert_matmuls(model: nn.Module, concrete_args: dict[str, Any] | None = None
                    ) -> torch.fx.GraphModule:
    """A traced copy of `model` with activation matmuls as `QuantMatMul` submodules.

    Args:
        model: the float model (not modified).
        concrete_args: passed to `torch.fx.symbolic_trace` (to fix non-tensor arguments).

    Returns:
        A `torch.fx.GraphModule` computing the same function; pass it to
        `autoquant.auto_quantize` in place of `model`.

    Raises:
        ModelError: if the model does not trace with `torch.fx`.

    Example:
        >>> traced = convert_matmuls(model)
        >>> [n for n, m in traced.named_modules() if isinstance(m, autoquant.QuantMatMul)]
        ['matmul_0', 'matmul_1']
    """
    import torch.fx


    work = copy_model(model)
    try:
        gm = torch.fx.symbolic_trace(work, concrete_args=concrete_args)
    except Exception as err:
        raise ModelError(
            f"{type(model).__name__} does not trace with torch.fx ({type(err).__name__}: "
            f"{err}); put autoquant.QuantMatMul modules in its attention code instead"
        ) from err
    # activations: values that depend on a model input (a weight, even transposed, does not)
    activations: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(n in activations for n in node.all_input_nodes):
            activations.add(node)
    count = 0
    for node in list(gm.graph.nodes):
        is_matmul = (node.op == "call_function" and node.target in _FUNCTIONS) or (
            node.op == "call_method" and node.target in _METHODS)
        if not is_matmul or len(node.args) != 2 or node.kwargs:
            continue
        if not all(isinstance(a, torch.fx.Node) and a in activations for a in node.args):
            continue
        name = f"matmul_{count}"
        gm.add_submodule(name, QuantMatMul())
        with gm.graph.inserting_after(node):
            replacement = gm.graph.call_module(name, tuple(node.args))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.lint()
    gm.recompile()
    logger.info("converted %d activation matmul(s) of %s to QuantMatMul", count,
                type(model).__name__)
    return gm
