"""Fold the data movement the exporter puts between an integer weight's DequantizeLinear
and the op that reads it, so that onnxruntime does not dequantize and reshuffle the
weight on every run.

torch.onnx writes an LSTM/GRU/RNN's weights in ONNX's gate order and direction layout
with Slice/Concat/Unsqueeze nodes on the weight. On a float weight (an initializer)
onnxruntime folds them once at load; on ``DequantizeLinear(int8 initializer)`` it does
not (it keeps every DequantizeLinear for its QDQ fusions), so each run repeats them: on a
small bidirectional GRU that made the INT8 file 1.5x slower than float. Moving data is
value-agnostic, so the same nodes applied to the integers, to the broadcast scales and to
the broadcast zero points give the weight's integers and qparams in the reader's layout;
one DequantizeLinear (plus a Reshape when the scales vary along several axes, e.g. per
direction and per row) then feeds the reader. The dequantized values are bit-identical.

Weights read by an op onnxruntime fuses with its DequantizeLinear (MatMul, Gemm, Conv,
Gather...) are left as exported: folding could turn a float op into an integer kernel,
which the parity check measured on the graph as exported.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["fold_weight_movement"]

# value-agnostic ops: each output element is a copy of an input element
_MOVEMENT = frozenset({"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose",
                       "Split", "Identity", "Flatten", "Gather", "Expand", "Tile"})
# readers that onnxruntime fuses with a DequantizeLinear into integer kernels
_FUSED = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Einsum",
                    "Attention", "MultiHeadAttention"})


class _Constants:
    """The graph's constant tensors by name, read into numpy on first use only (a large
    model's other weights are never copied)."""

    def __init__(self, protos: dict[str, Any]) -> None:
        self.protos = protos
        self._arrays: dict[str, np.ndarray] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.protos

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            from onnx import numpy_helper

            self._arrays[name] = numpy_helper.to_array(self.protos[name])
        return self._arrays[name]


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _leaf_tensors(node: Any, consts: _Constants) -> tuple[np.ndarray, ...] | None:
    """A DequantizeLinear of initializers as (integers, scale, zero point), the qparams
    broadcast to the integers' shape; None for a form this pass does not take apart."""
    if len(node.input) < 2 or any(name not in consts for name in node.input if name) or \
            _attr(node, "block_size", 0):
        return None
    q, scale = consts[node.input[0]], consts[node.input[1]]
    zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else \
        np.zeros((), dtype=q.dtype)
    if not np.issubdtype(q.dtype, np.integer) or q.ndim == 0 or q.size == 0:
        return None
    shape = [1] * q.ndim
    if scale.size > 1:
        axis = _attr(node, "axis", 1) % q.ndim
        if scale.size != q.shape[axis]:
            return None
        shape[axis] = -1
    return (q, np.broadcast_to(scale.reshape(shape), q.shape).copy(),
            np.broadcast_to(zp.reshape(shape), q.shape).astype(q.dtype))


def _dequantize_form(scale: np.ndarray, zp: np.ndarray) -> tuple[int, int] | None:
    """The block of axes ``(first, last)`` along which the qparams vary, so that one
    DequantizeLinear on the integers with that block flattened expresses them (``(0, -1)``:
    per tensor); None when they vary along axes that are not contiguous."""
    varying = [ax for ax in range(scale.ndim) if not (
        np.all(scale == np.take(scale, [0], axis=ax)) and
        np.all(zp == np.take(zp, [0], axis=ax)))]
    if not varying:
        return 0, -1
    if varying != list(range(varying[0], varying[-1] + 1)):
        return None
    return varying[0], varying[-1]


def _run_chain(proto: Any, nodes: list[Any], feeds: dict[str, np.ndarray],
               outputs: list[str], consts: _Constants) -> list[np.ndarray]:
    """The values of `outputs` of the movement `nodes` on `feeds` (ONNX reference
    semantics of each op, at the model's opset)."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    needed = {name for node in nodes for name in node.input if name in consts}
    graph = helper.make_graph(
        nodes, "movement",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for name, v in feeds.items()],
        [helper.make_tensor_value_info(name, 0, None) for name in outputs],
        [numpy_helper.from_array(consts[name], name) for name in needed])
    model = helper.make_model(graph, opset_imports=list(proto.opset_import))
    return ReferenceEvaluator(model).run(outputs, feeds)


def _chain(graph: Any, consts: _Constants
           ) -> tuple[dict[str, tuple[Any, ...]], list[Any], dict[str, Any]]:
    """The foldable part of `graph`: {output of a DequantizeLinear of initializers: (its
    integer initializer's name, its tensors)}, the movement nodes computed from those
    outputs and constants alone (in graph order), and the producer of each of their
    outputs."""
    leaves: dict[str, tuple[Any, ...]] = {}
    nodes: list[Any] = []
    producer: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            tensors = _leaf_tensors(node, consts)
            if tensors is not None:
                leaves[node.output[0]] = (node.input[0], tensors)
            continue
        inputs = [name for name in node.input if name]
        if node.op_type in _MOVEMENT and inputs and \
                any(name in leaves or name in producer for name in inputs) and \
                all(name in leaves or name in producer or name in consts for name in inputs):
            nodes.append(node)
            producer.update(dict.fromkeys(node.output, node))
    return leaves, nodes, producer


def _origin(name: str, leaves: dict[str, tuple[Any, ...]], producer: dict[str, Any]) -> str:
    """The integer initializer of the first weight value `name` is moved from (its name
    keeps the layer path in front, which the kernel count reads)."""
    while name not in leaves:
        name = next(i for i in producer[name].input if i in leaves or i in producer)
    return leaves[name][0]


def _folded_nodes(base: str, name: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray
                  ) -> tuple[list[Any], list[Any]] | None:
    """The initializers and nodes that compute `name` from the moved integers `q` and
    their broadcast qparams; None when one DequantizeLinear cannot express the qparams."""
    from onnx import helper, numpy_helper

    form = _dequantize_form(scale, zp)
    if form is None:
        return None
    first, last = form
    if last < 0:  # per tensor
        flat, axis, pick = q.shape, {}, (lambda t: np.asarray(t.reshape(-1)[0]))
    else:
        flat = (*q.shape[:first], math.prod(q.shape[first:last + 1]), *q.shape[last + 1:])
        index = tuple(slice(None) if ax == first else 0 for ax in range(len(flat)))
        axis, pick = {"axis": first}, (lambda t: np.ascontiguousarray(t.reshape(flat)[index]))
    target = name if tuple(flat) == q.shape else f"{base}_flat"
    tensors = [numpy_helper.from_array(np.ascontiguousarray(q.reshape(flat)), f"{base}_int"),
               numpy_helper.from_array(pick(scale), f"{base}_scale"),
               numpy_helper.from_array(pick(zp), f"{base}_zp")]
    nodes = [helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale",
                              f"{base}_zp"], [target], f"{base}_dq", **axis)]
    if target != name:
        tensors.append(numpy_helper.from_array(np.asarray(q.shape, dtype=np.int64),
                                               f"{base}_shape"))
        nodes.append(helper.make_node("Reshape", [target, f"{base}_shape"], [name],
                                      f"{base}_reshape"))
    return tensors, nodes


def fold_weight_movement(proto: Any) -> int:
    """Rewrite ``DequantizeLinear(integer initializer) -> data movement -> reader`` as
    ``DequantizeLinear(moved integers) [-> Reshape] -> reader`` in `proto` (in place) for
    readers onnxruntime does not fuse; returns how many weights were folded."""
    graph = proto.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # values read inside a subgraph are not in the node inputs
    consts = _Constants({t.name: t for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and _attr(node, "value", None) is not None:
            consts.protos[node.output[0]] = _attr(node, "value", None)
    leaves, nodes, producer = _chain(graph, consts)
    readers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    moved = set(map(id, nodes))
    outputs = {o.name for o in graph.output}
    frontier = [name for name in producer if name not in outputs and
                any(id(r) not in moved for r in readers[name]) and
                not any(r.op_type in _FUSED for r in readers[name])]
    if not frontier:
        return 0
    try:
        values = [_run_chain(proto, nodes, {k: v[1][i] for k, v in leaves.items()}, frontier,
                             consts) for i in range(3)]
    except Exception as err:  # e.g. weights of two integer types concatenated
        logger.debug("weight movement left as exported: %s", err)
        return 0
    added, folded = [], 0
    for name, q, scale, zp in zip(frontier, *values, strict=True):
        built = _folded_nodes(f"{_origin(name, leaves, producer)}_folded{folded}", name,
                              q, scale, zp) if q.size else None
        if built is None:
            continue
        graph.initializer.extend(built[0])
        for new in built[1]:
            new.metadata_props.extend(p for p in producer[name].metadata_props
                                      if p.key == "namespace")
        added += built[1]
        outs = producer[name].output
        outs[list(outs).index(name)] = f"{name}_unfolded"
        folded += 1
    for node in reversed(added):  # they read initializers only
        graph.node.insert(0, node)
    if folded:
        _drop_dead(graph)
    return folded


def _drop_dead(graph: Any) -> None:
    """Remove the nodes and initializers nothing reads any more."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [i for i, node in enumerate(graph.node) if not any(o in read for o in node.output)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    read = {name for node in graph.node for name in node.input} | outputs
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    values = {name for node in graph.node for name in node.output} | read
    kept = [v for v in graph.value_info if v.name in values]
    del graph.value_info[:]
    graph.value_info.extend(kept)
