"""Where each quantizable layer's output goes: the consumers that quantize it.

A runtime turns ``DequantizeLinear → Conv → QuantizeLinear`` into one integer kernel
(QLinearConv) only when a QuantizeLinear follows the convolution, and that Q is the input
quantizer of the layer the output feeds. onnxruntime looks through ops that commute with
quantization (ReLU when the zero point is the range minimum, max pooling, reshapes and
transposes) to find it. `output_uses` finds, per layer, which quantizable layers read its
output through such ops only, and what else reads it (an ``add``, a ``BatchNorm2d``, the
graph output): a convolution whose output is not read by exactly one quantizing layer
then gets a quantizer of its own (`autoquant.quant.layers.QuantLayer.requant`), so the deployed
graph still runs an integer kernel and the search sees that requantization.

The same graph shows a model that reads a layer's parameters outside the layer's forward
(a tied head ``h @ embed.weight.T``) or calls ``F.scaled_dot_product_attention``: those
products are no layer and run float, which a warning says with the fix.

The graph comes from `torch.fx` with every wrapper as a leaf. A model fx cannot trace gets
no answer (None) here; its uses are then read off one real forward pass
(`autoquant.quant.dynflow`). Tracing is a help, never a requirement.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["OutputUse", "output_uses", "trace_layers", "MOVES", "RELUS", "METADATA"]

logger = logging.getLogger(__name__)

# ops that commute with a per-tensor quantizer (the runtime moves a Q across them)
MOVES = frozenset({"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze",
                   "contiguous", "max_pool1d", "max_pool2d", "max_pool3d"})
RELUS = frozenset({"relu", "relu_"})
_FUNCTIONS: dict[Any, str] = {
    torch.flatten: "flatten", torch.reshape: "reshape", torch.transpose: "transpose",
    torch.permute: "permute", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
    F.max_pool1d: "max_pool1d", F.max_pool2d: "max_pool2d", F.max_pool3d: "max_pool3d",
    torch.max_pool1d: "max_pool1d", torch.max_pool2d: "max_pool2d",
    torch.max_pool3d: "max_pool3d", F.relu: "relu", torch.relu: "relu", torch.relu_: "relu",
    F.relu_: "relu",
}
_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU, "relu"), (nn.MaxPool1d, "max_pool1d"), (nn.MaxPool2d, "max_pool2d"),
    (nn.MaxPool3d, "max_pool3d"), (nn.Flatten, "flatten"), (nn.Identity, "view"),
    (nn.Dropout, "view"),  # eval mode: an identity
)


@dataclass(frozen=True)
class OutputUse:
    """Who reads one layer's output.

    Attributes:
        consumers: quantizable layers that take it (as their first input) through
            quantization-commuting ops only.
        others: what else reads it, e.g. ``"add"``, ``"BatchNorm2d"``, ``"output"``.
        through_relu: every path passes a ReLU first (an output quantizer may then be
            calibrated on the rectified values: its zero point clamps what ReLU clamps).
    """

    consumers: tuple[str, ...]
    others: tuple[str, ...]
    through_relu: bool


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, module_qualified_name)


def _kind(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """``"relu"``/a move op name when `node` commutes with quantization, else None."""
    if node.op == "call_method":
        name = str(node.target)
        return name if name in MOVES or name in RELUS else None
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_module":
        module = modules.get(str(node.target))
        for cls, name in _MODULES:
            if type(module) is cls:
                return name
    return None


def _describe(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules.get(str(node.target))).__name__
    if node.op == "call_function":
        if node.target in (operator.add, operator.iadd, torch.add):
            return "add"
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target) if node.op == "call_method" else node.op


METADATA = frozenset({"shape", "dtype", "device", "size", "dim", "ndim", "numel"})


def _warn_direct_reads(graph: torch.fx.Graph, layers: Mapping[str, nn.Module],
                       modules: Mapping[str, nn.Module]) -> None:
    """Name the layers whose parameters the model also reads outside their own forward (a
    tied head ``h @ embed.weight.T``): that computation is no layer, so it runs float."""
    reads: dict[str, set[str]] = {}
    for node in graph.nodes:
        owner = next((n for n in layers if node.op == "get_attr" and
                      str(node.target).startswith(f"{n}.")), None)
        if owner is None:
            continue
        users, uses = list(node.users), set()
        while users:
            user = users.pop()
            attr = user.args[1] if user.target is getattr and len(user.args) > 1 else \
                user.target if user.op == "call_method" else None
            if attr in METADATA:
                continue
            if attr in ("T", "t", "transpose", "permute", "contiguous"):
                users += list(user.users)
                continue
            uses.add(_describe(user, modules))
        if uses:
            reads.setdefault(owner, set()).update(uses)
    for owner, uses in reads.items():
        logger.warning(
            "the model reads the parameters of layer %r outside its forward (by %s; e.g. a tied "
            "head h @ %s.weight.T): that product is no layer, so it computes in float with "
            "the float weight, unsearched, and the export stores that weight in float too; "
            "to quantize it, compute it with a module (an nn.Linear whose weight is the "
            "same Parameter)", owner, ", ".join(sorted(uses)), owner)


def trace_layers(model: nn.Module, layers: Mapping[str, nn.Module]) -> torch.fx.Graph | None:
    """The `torch.fx` graph of `model` with every wrapper in `layers` as a leaf, or None
    when fx cannot trace it; warns about products the graph shows running float."""
    by_id = {id(m) for m in layers.values()}
    try:
        graph = _LeafTracer(by_id).trace(model)
    except Exception as err:  # any user code may fail symbolic tracing
        logger.info("torch.fx cannot trace %s (%s: %s); the readers of each layer's output "
                    "are found on a forward pass instead", type(model).__name__, type(err).__name__,
                    str(err).splitlines()[0][:120] if str(err) else "")
        return None
    modules = dict(model.named_modules(remove_duplicate=False))
    _warn_direct_reads(graph, layers, modules)
    fused = sum(node.op == "call_function" and node.target is F.scaled_dot_product_attention
                for node in graph.nodes)
    if fused:
        logger.warning(
            "the model calls F.scaled_dot_product_attention %d time(s): its two activation "
            "products (q @ k^T and attention @ v) are no layer, so they run float; to "
            "quantize them, write the attention with aq.QuantMatMul (docs/layer-kinds.md)",
            fused)
    return graph


def output_uses(model: nn.Module, layers: Mapping[str, nn.Module],
                graph: torch.fx.Graph | None = None,
                sources: Mapping[torch.fx.Node, str] | None = None
                ) -> dict[str, OutputUse] | None:
    """`OutputUse` of every layer in `layers` (``{name: wrapper module}``), or of the
    module calls `sources` names (``{call node: name}``) when given, on `graph` (traced by
    `trace_layers` when not given); None when `model` cannot be traced by `torch.fx` (see
    the module docstring)."""
    graph = trace_layers(model, layers) if graph is None else graph
    if graph is None:
        return None
    by_id = {id(m): name for name, m in layers.items()}
    modules = dict(model.named_modules(remove_duplicate=False))
    out: dict[str, OutputUse] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name = by_id.get(id(modules.get(str(node.target)))) if sources is None \
            else sources.get(node)
        if name is None or name in out:
            continue
        consumers: list[str] = []
        others: list[str] = []
        relu_paths: list[bool] = []
        stack = [(node, False)]
        while stack:
            current, relu = stack.pop()
            if not current.users:
                others.append("unused")
            for user in current.users:
                kind = _kind(user, modules)
                if kind is not None and user.args and user.args[0] is current:
                    stack.append((user, relu or kind in RELUS))
                    continue
                reader = by_id.get(id(modules.get(str(user.target)))) \
                    if user.op == "call_module" else None
                if reader is not None and user.args and user.args[0] is current:
                    consumers.append(reader)
                    relu_paths.append(relu)
                else:
                    others.append(_describe(user, modules))
                    relu_paths.append(relu)
        out[name] = OutputUse(tuple(consumers), tuple(others),
                              bool(relu_paths) and all(relu_paths))
    return out
