"""Tracing the export copy with `torch.export` and translating it to ONNX with the dynamo
exporter and the QDQ ops' translation table, naming the layer and the op when either
refuses; the graph signature (names, dynamic axes) is applied here."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoquant.errors import ConfigError, ExportError
from autoquant.export.movement import fold_weight_movement
from autoquant.export.qdq import QDQLayer, QDQMultiLayer
from autoquant.export.qdq_ops import translation_table
from autoquant.export.signature import (
    DynamicAxes,
    dynamic_shapes,
    input_names_of,
    rename_graph,
    split_inputs,
)

__all__ = ["DEFAULT_OPSET", "Signature", "to_onnx_bytes", "check_opset"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 21  # the first opset with int16/uint16 QuantizeLinear/DequantizeLinear
_MIN_OPSET = 18  # the dynamo exporter's lowest supported opset (per-axis QDQ needs 13)
_INT16_OPSET = 21


@dataclass(frozen=True)
class Signature:
    """The graph signature the user asks for (see `autoquant.export.signature`)."""

    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    dynamic_axes: DynamicAxes | None = None
    dynamic_batch: bool = True
    varying: tuple[set[int], ...] = ()  # input axes other inputs vary (signature.varying_axes)


# -- tracing, translation and error naming -----------------------------------------------------
def _module_names(model: nn.Module) -> dict[int, str]:
    names = {}
    for name, module in model.named_modules():
        names[id(module)] = name
    for name, module in model.named_modules():
        if isinstance(module, (QDQLayer, QDQMultiLayer)):  # the searched layer, not its child
            names[id(module.module)] = name
    return names


def _layer_from_traceback(err: BaseException, model: nn.Module) -> str | None:
    """The innermost module of `model` whose forward was running when `err` was raised."""
    names = _module_names(model)
    found = None
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def _layer_from_node(err: BaseException, program: Any) -> tuple[str | None, str | None]:
    """(module path, op) of the graph node the ONNX translation failed on, if named."""
    text = str(err)
    node_match = re.search(r"translating node %(\w+)", text)
    op_match = re.search(r"target=torch\.ops\.([\w.]+)", text) or re.search(
        r"OpOverload\(op='([\w.]+)'", text)
    op = op_match.group(1) if op_match else None
    candidates = []
    for node in program.graph.nodes:
        if node_match and node.name == node_match.group(1):
            candidates.insert(0, node)
        elif op and op.split(".")[min(1, op.count("."))].lstrip("_") in str(node.target):
            candidates.append(node)
    for node in candidates:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            return (path or "<top-level forward>"), op
    return None, op


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    summary = [ln for ln in lines if "Error" in ln and ":" in ln and "translating" not in ln]
    return (summary[-1] if summary else (lines[0] if lines else type(err).__name__))[:300]


# loggers of the exporter whose warnings no user can act on, silenced during an export
_QUIET_LOGGERS = (
    "torch.onnx._internal.exporter._registration",  # "torchvision is not installed ..."
    "onnxscript.optimizer._constant_folding",  # "Skipping constant folding for op Split ..."
    # a data-dependent branch: "Unable to find user code ...", before the ExportError that
    # names the layer and the fix (torch still prints the partial graph to stderr itself)
    "torch.fx.experimental.symbolic_shapes",
)


@contextlib.contextmanager
def _quiet_exporter() -> Any:
    """Silence torch's exporter notes that no user can act on, for this export only.

    They are: the registry's "torchvision is not installed. Skipping torchvision::nms"
    warnings, onnxscript's "Skipping constant folding for op Split with multiple outputs"
    (one per attention block), torch's "Unable to find user code" before it refuses a
    data-dependent branch, a pytree ``LeafSpec`` FutureWarning raised inside torch, and
    the ``_flat_weights`` note of an RNN traced through ``functional_call`` (QDQMultiLayer
    swaps in the dequantized weights while tracing and restores them).
    """
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"The tensor attributes .*_flat_weights.* assigned during")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def to_onnx_bytes(work: nn.Module, example_inputs: Any, opset: int,
                   sig: Signature) -> bytes:
    with _quiet_exporter():
        return _trace_and_translate(work, example_inputs, opset, sig)


def _trace_error(err: Exception, work: nn.Module) -> ExportError:
    """The ExportError of a failed `torch.export`: where (the layer, from the traceback)
    and the fix."""
    layer = _layer_from_traceback(err, work)
    where, hint = "", ""
    if layer:
        sub = work.get_submodule(layer)
        where = f" in layer {layer!r} ({getattr(sub, 'kind', type(sub).__name__)})"
        if isinstance(sub, (QDQLayer, QDQMultiLayer)):
            hint = (f", or keep {layer!r} float (list it in the config's skip_layers, "
                    "or give it the plan entry 'float')")
    found = re.search(r"Found <class '([\w.]+)'> in output", str(err))
    fix = (f"return tensors only: the model's output holds a {found.group(1)} (a "
           "Hugging Face model: config.use_cache=False)" if found else
           "make that forward traceable (no data-dependent Python control flow, "
           "inputs as tensors)")
    return ExportError(
        f"torch.export could not trace the model{where}: {type(err).__name__}: "
        f"{_first_line(err)}. To export, {fix}{hint}; the search result is unchanged."
    )


def _trace_and_translate(work: nn.Module, example_inputs: Any, opset: int,
                         sig: Signature) -> bytes:
    args, kwargs = split_inputs(example_inputs, work)
    names = list(sig.input_names) if sig.input_names is not None else \
        input_names_of(work, args, kwargs)
    try:
        dynamic, labels = dynamic_shapes(work, args, kwargs, names, sig.dynamic_axes,
                                         sig.dynamic_batch, sig.varying)
    except TypeError:
        dynamic, labels = None, {}
    if sig.dynamic_axes is None and sig.dynamic_batch and any(
            isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == 1
            for t in (*args, *kwargs.values())):
        logger.info("an example input has batch size 1, so the exported batch size is fixed "
                    "at 1; pass a batch of 2 or more for a dynamic batch dimension")
    try:
        program = torch.export.export(work, args, kwargs, dynamic_shapes=dynamic,
                                      strict=False)
    except Exception as err:
        raise _trace_error(err, work) from err
    try:
        onnx_program = torch.onnx.export(
            program, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
            custom_translation_table=translation_table(opset), verbose=False, optimize=True,
        )
    except ExportError:
        raise
    except Exception as err:
        layer, op = _layer_from_node(err, program)
        what = f"op {op}" if op else "an op"
        where, hint = (f" in layer {layer!r}", f", or keep {layer!r} float (skip_layers)") \
            if layer else ("", "")
        raise ExportError(
            f"the ONNX exporter refused {what}{where}: {_first_line(err)}. Rewrite that "
            f"forward with ops ONNX supports, or export with another opset{hint}; the search "
            "result is unchanged."
        ) from err
    proto = onnx_program.model_proto
    rename_graph(proto, names, sig.input_names, sig.output_names, labels, sig.dynamic_axes)
    folded = fold_weight_movement(proto)
    if folded:
        logger.info("moved %d integer weight(s) into their reader's layout before their "
                    "DequantizeLinear", folded)
    # the intermediate values' shapes: onnxruntime infers them; a quarter of a small file
    del proto.graph.value_info[:]
    for node in proto.graph.node:
        # keep the layer path of each node; drop the exporter's debug records (source stack
        # traces with local file paths, FX node dumps), which would double a small file
        keep = [(p.key, p.value) for p in node.metadata_props if p.key == "namespace"]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)
    try:
        return proto.SerializeToString()
    except ValueError as err:  # protobuf's 2 GB limit
        raise ExportError(f"the ONNX model is too large to serialize: {err}") from err


def check_opset(opset: int | None, layers: dict[str, int]) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < _MIN_OPSET:
        raise ConfigError(f"opset must be an int >= {_MIN_OPSET}, got {opset!r}; use "
                          f"{DEFAULT_OPSET}")
    wide = [name for name, bits in layers.items() if bits > 8]
    if wide and opset < _INT16_OPSET:
        raise ExportError(
            f"layer {wide[0]!r} runs with more than 8 bits, which needs int16 QDQ from opset "
            f"{_INT16_OPSET}; pass opset={_INT16_OPSET} (or higher), got {opset}"
        )
    return opset
