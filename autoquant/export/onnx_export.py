"""ONNX export of a fake-quant model as a QDQ graph that computes what the searched model does.

Each quantized layer becomes, in the ONNX graph::

    x ─[Clip]─► QuantizeLinear ─► DequantizeLinear ─┐
    int8/int16 weight initializer ─► DequantizeLinear ─┴─► Gemm / Conv / ConvTranspose ...

with the layer's own scales and zero points (per-channel ``axis`` where the weight is
per-channel); a layer that fell back stays float, a 16-bit layer gets int16 QDQ (opset 21).
A ``dynamic``-mode layer computes its activation qparams in the graph (ReduceMin/ReduceMax,
the formula of `autoquant.quant.quantizer.compute_qparams`); a ``weight_only`` layer (and every
embedding, a DequantizeLinear on its integer table feeding Gather) keeps a float input; a
bias correction is an Add after the layer. LSTM/GRU/RNN, MultiheadAttention and QuantMatMul
wrappers export their own quantized forward with the QDQ ops (`autoquant.export.qdq.QDQMultiLayer`:
an ONNX LSTM/GRU on dequantized weights, attention as its MatMuls). A part the exporter
cannot trace raises `ExportError` naming the layer, its kind and the fix.

Why this design (custom ops traced by the dynamo exporter, not a rewrite of a float graph):
the searched model quantizes at module boundaries (`autoquant.quant.layers.QuantLayer`), so on a
copy of the model each active wrapper is swapped for a module that calls two `torch.library`
custom ops, ``autoquant::quantize_linear`` and ``autoquant::dequantize_linear``, around the
original module's computation. `torch.onnx.export(..., dynamo=True)` traces that with
`torch.export` and translates the two ops to ONNX QuantizeLinear/DequantizeLinear through a
``custom_translation_table``. This works for any `nn.Module` the exporter can trace, with no
guessing of which Gemm/MatMul/Conv node (possibly transposed or fused by the exporter's
optimizer) belongs to which layer, which a graph rewrite would have to do. The TorchScript
exporter (``dynamo=False``) is deprecated and is not used. The integer weights are buffers of
the swapped module, so they become integer initializers and the float weights disappear.

Exactness: the weight integers are recovered from the fake-quantized weight itself, so the
dequantized weight is bit-identical to the one the searched model used. Activations are
quantized with QuantizeLinear, round half to even like `torch.fake_quantize_*`; the only
difference is that ONNX divides by the scale where torch multiplies by its reciprocal, which
can move a value lying within a float rounding error of a .5 tie by one step. QuantizeLinear
saturates to its storage type (int8/uint8/int16), so a narrower range (e.g. 4-bit
activations stored in uint8) gets a float Clip to ``[(qmin - zp) * s, (qmax - zp) * s]``
first, which gives exactly the fake-quant clamp. Unsigned 16-bit ranges are stored as int16
with the zero point shifted by -32768 (the same dequantized values).
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoquant.errors import ConfigError, ExportError, InternalError, ModelError
from autoquant.export.qdq import QDQLayer, QDQMultiLayer, translation_table
from autoquant.export.signature import (
    DynamicAxes,
    dynamic_shapes,
    input_names_of,
    rename_graph,
    split_inputs,
    varying_axes,
)
from autoquant.io.atomic import atomic_write_bytes
from autoquant.io.names import REPORT_FILE
from autoquant.quant.kinds.base import MultiQuantLayer
from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.qmodel import copy_model
from autoquant.quant.target import TARGETS, host_target, runs_exactly_on

__all__ = ["DEFAULT_OPSET", "export_onnx", "export_checked", "export_measured",
           "export_float_onnx", "export_saved", "kernel_notes", "model_target"]

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


def _export_copy(model: nn.Module, quantized: bool) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `model` with every QuantLayer swapped for a `QDQLayer` (if active and
    `quantized`) or for its float module; returns it and ``{layer: storage bits}``."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy_model(model)  # export works on a copy: the search result never changes
    work.eval()
    _refuse_unexportable(work)
    layers: dict[str, int] = {}
    for name, module in list(work.named_modules()):
        if not isinstance(module, QuantLayer):
            continue
        active = (quantized and module.state is QuantState.QUANTIZE
                  and module._weight_q is not None)
        new: nn.Module = module.module
        if active:
            new = QDQMultiLayer(module) if isinstance(module, MultiQuantLayer) \
                else QDQLayer(module)
        if active:
            layers[name] = new.storage_bits  # type: ignore[assignment]
        parent_name, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent_name) if parent_name else work, child, new)
    return work, layers


def _refuse_unexportable(work: nn.Module) -> None:
    """Raise ExportError for a module ONNX cannot express, before a broken file is made.

    An ``nn.LSTM`` with ``proj_size`` has no ONNX counterpart (the LSTM op has no
    projection); torch.onnx writes a graph onnxruntime cannot run, even for a float model.
    """
    for name, module in work.named_modules():
        if isinstance(module, nn.LSTM) and module.proj_size > 0:
            layer = name.removesuffix(".module")
            raise ExportError(
                f"layer {layer!r} is an nn.LSTM with proj_size={module.proj_size}, which ONNX "
                "cannot express (its LSTM op has no projection; torch.onnx writes a graph "
                "onnxruntime refuses, even in float). Use proj_size=0 with an nn.Linear after "
                "the LSTM, or deploy the fake-quant model with torch; the search result is "
                "unchanged."
            )


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


@contextlib.contextmanager
def _quiet_exporter() -> Any:
    """Silence torch's exporter notes that no user can act on, for this export only.

    They are: the registry's "torchvision is not installed. Skipping torchvision::nms"
    warnings, a pytree ``LeafSpec`` FutureWarning raised inside torch, and the
    ``_flat_weights`` note of an RNN traced through ``functional_call`` (QDQMultiLayer
    swaps in the dequantized weights while tracing and restores them).
    """
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"The tensor attributes .*_flat_weights.* assigned during")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            yield
    finally:
        registry.setLevel(level)


def _to_onnx_bytes(work: nn.Module, example_inputs: Any, opset: int,
                   sig: Signature) -> bytes:
    with _quiet_exporter():
        return _trace_and_translate(work, example_inputs, opset, sig)


def _trace_and_translate(work: nn.Module, example_inputs: Any, opset: int,
                         sig: Signature) -> bytes:
    args, kwargs = split_inputs(example_inputs)
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
        layer = _layer_from_traceback(err, work)
        where, hint = "", ""
        if layer:
            sub = work.get_submodule(layer)
            where = f" in layer {layer!r} ({getattr(sub, 'kind', type(sub).__name__)})"
            if isinstance(sub, (QDQLayer, QDQMultiLayer)):
                hint = (f", or keep {layer!r} float (list it in the config's skip_layers, "
                        "or give it the plan entry 'float')")
        raise ExportError(
            f"torch.export could not trace the model{where}: {type(err).__name__}: "
            f"{_first_line(err)}. Make that forward traceable (no data-dependent Python "
            f"control flow, inputs as tensors){hint}; the search result is unchanged."
        ) from err
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


def _check_opset(opset: int | None, layers: dict[str, int]) -> int:
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


# -- public API ------------------------------------------------------------------------------
def kernel_notes(model: nn.Module) -> dict[str, str | None]:
    """``{layer: None or why it cannot run an integer kernel}`` of every active quantized
    layer of the fake-quant `model` (see `QuantLayer.kernel_note`)."""
    notes: dict[str, str | None] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer) and module._weight_q is not None and \
                id(module) not in seen:
            seen.add(id(module))
            notes[name] = module.kernel_note()
    return notes


def model_target(model: nn.Module) -> str | None:
    """The deploy target the fake-quant `model` was quantized for (None: no layer)."""
    targets = {m.target for m in model.modules() if isinstance(m, QuantLayer)}
    if len(targets) > 1:
        raise InternalError(f"the model's layers were quantized for several targets: "
                            f"{sorted(targets)}")
    return next(iter(targets), None)


def _check_target(searched: str | None, target: str | None, allow_mismatch: bool) -> None:
    if target is None or searched is None:
        return
    if target not in TARGETS or target == "auto":
        raise ConfigError(f"target must be one of {', '.join(t for t in TARGETS if t != 'auto')}"
                          f", got {target!r}")
    if not runs_exactly_on(searched, target) and not allow_mismatch:
        raise ExportError(
            f"the model was searched for target {searched!r}, whose 8-bit weights saturate "
            f"onnxruntime's kernels on {target!r}: what you would deploy is not what was "
            "searched. Search again with QuantConfig.target 'x86_avx2' (exact on every CPU) "
            "or the deploy CPU's target, or pass allow_target_mismatch=True to export anyway"
        )


def export_checked(model: nn.Module, path: str | Path, example_inputs: Any,
                   opset: int | None = None, *, dynamic_batch: bool = True,
                   input_names: Sequence[str] | None = None,
                   output_names: Sequence[str] | None = None,
                   dynamic_axes: DynamicAxes | None = None, check: bool = True,
                   strict: bool = True, check_inputs: Sequence[Any] = (),
                   target: str | None = None, allow_target_mismatch: bool = False,
                   ) -> tuple[Path, dict[str, Any]]:
    """`export_onnx`, returning the path and the check's figures: ``target``, ``host``,
    ``integer_kernels`` (`autoquant.export.runtime.kernel_coverage`) and the parity figures
    (`autoquant.export.runtime.check_parity`), or ``parity: "not checked: ..."``."""
    work, layers = _export_copy(model, quantized=True)
    searched = model_target(model)
    _check_target(searched, target, allow_target_mismatch)
    opset = _check_opset(opset, layers)
    if not layers:
        logger.warning("the model has no quantized layer; exporting a float graph")
    sig = Signature(input_names, output_names, dynamic_axes, dynamic_batch,
                    tuple(varying_axes(example_inputs, check_inputs)))
    data = _to_onnx_bytes(work, example_inputs, opset, sig)
    figures: dict[str, Any] = {"target": searched, "host": host_target()}
    if check:
        from autoquant.export.runtime import check_parity, kernel_coverage

        with tempfile.TemporaryDirectory() as tmp:  # check first: no bad file at `path`
            trial = atomic_write_bytes(Path(tmp) / "model.onnx", data)
            coverage = kernel_coverage(trial, kernel_notes(model)) if layers else None
            if searched is not None and not runs_exactly_on(searched):
                figures["parity"] = (f"not checked: this CPU ({host_target()}) does not "
                                     f"compute a model searched for {searched!r} exactly")
                logger.warning("the parity check is skipped: %s", figures["parity"][13:])
            else:
                figures.update(check_parity(model, trial, [example_inputs, *check_inputs],
                                            strict))
        if coverage is not None:
            figures["integer_kernels"] = coverage
            logger.info("%s", coverage["summary"])
            if coverage["float"]:
                shown = "; ".join(f"{n}: {r}" for n, r in list(coverage["float"].items())[:5])
                more = len(coverage["float"]) - 5
                logger.warning("%d quantized layer(s) run in float in onnxruntime: %s%s",
                               len(coverage["float"]), shown,
                               f" (and {more} more)" if more > 0 else "")
    out = atomic_write_bytes(path, data)
    logger.info("exported %d QDQ layer(s) to %s (%d bytes, opset %d)", len(layers), out,
                len(data), opset)
    return out, figures


def export_onnx(model: nn.Module, path: str | Path, example_inputs: Any,
                opset: int | None = None, *, dynamic_batch: bool = True,
                input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None,
                dynamic_axes: DynamicAxes | None = None, check: bool = True,
                strict: bool = True, check_inputs: Sequence[Any] = (),
                target: str | None = None, allow_target_mismatch: bool = False) -> Path:
    """Export a fake-quant model as an ONNX QDQ graph that runtimes run as integer kernels
    and that computes what the searched model computes.

    Every active `QuantLayer` becomes QuantizeLinear/DequantizeLinear on its input and a
    DequantizeLinear on its integer weight; a Linear/Conv with a static 8-bit input gets
    its int32 bias inside the op and, for a convolution nothing else quantizes, a Q/DQ on
    its output: the patterns onnxruntime fuses into QGemm / QLinearConv. Float layers stay
    float. The model is copied first: `model` is never changed, also on error. Unless
    ``check=False``, the file is run in onnxruntime with default session options on
    `example_inputs` (and `check_inputs`) before it is written; outputs beyond the parity
    tolerance are an ExportError naming the first diverging layer (a warning with
    ``strict=False``), and the layers that run in float are logged with the reason.

    Args:
        model: a fake-quant model: ``SearchResult.model``, or the output of
            `autoquant.quantize` or `autoquant.load_quantized`.
        path: the ``.onnx`` file to write (atomically).
        example_inputs: a tuple of positional inputs (or a dict of keyword inputs) the
            model runs on; they fix the graph's input signature.
        opset: the ONNX opset, at least 18; default 21 (needed for 16-bit layers).
        dynamic_batch: without `dynamic_axes`, make dimension 0 of every tensor input
            dynamic where the model allows it (an example batch of 1 fixes it at 1).
        input_names: names of the graph inputs, in order (default: the forward's
            parameter names).
        output_names: names of the graph outputs, in order.
        dynamic_axes: ``{input or output name: {axis: label}}`` or ``{name: [axes]}``, as
            `torch.onnx.export` takes it (e.g. ``{"x": {0: "batch", 2: "height", 3:
            "width"}}``); replaces `dynamic_batch`.
        check: run the parity check and the integer-kernel count (needs onnxruntime).
        strict: a failed parity check raises (True) or warns (False).
        check_inputs: more inputs (each like `example_inputs`) for the parity check, e.g.
            calibration batches.
        target: the CPU the file is deployed on (see `autoquant.quant.target`); one on which the
            searched model's integer arithmetic is not exact is an ExportError unless
            `allow_target_mismatch`.
        allow_target_mismatch: export for such a `target` anyway.

    Returns:
        The path written.

    Raises:
        ExportError: the exporter cannot trace or translate part of the model (the message
            names the layer and the op), or the parity check failed.
        ConfigError: bad arguments, or the check needs onnxruntime (the ``onnx`` extra).

    Example:
        >>> qmodel = autoquant.quantize(model, evaluator)
        >>> export_onnx(qmodel, "model_qdq.onnx", (x,), dynamic_axes={"x": {0: "batch"}})
    """
    return export_checked(
        model, path, example_inputs, opset, dynamic_batch=dynamic_batch,
        input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        check=check, strict=strict, check_inputs=check_inputs, target=target,
        allow_target_mismatch=allow_target_mismatch)[0]


def export_float_onnx(model: nn.Module, path: str | Path, example_inputs: Any,
                      opset: int | None = None, *, dynamic_batch: bool = True,
                      input_names: Sequence[str] | None = None,
                      output_names: Sequence[str] | None = None,
                      dynamic_axes: DynamicAxes | None = None) -> Path:
    """Export the float counterpart of `model` (every `QuantLayer` unwrapped) to ONNX.

    The baseline for sizes and speed: the same graph as `export_onnx` without QDQ.
    """
    work, _ = _export_copy(model, quantized=False)
    opset = _check_opset(opset, {})
    sig = Signature(input_names, output_names, dynamic_axes, dynamic_batch)
    data = _to_onnx_bytes(work, example_inputs, opset, sig)
    return atomic_write_bytes(path, data)


def export_measured(model: nn.Module, path: str | Path, example_inputs: Any,
                    opset: int | None = None, measure: bool = True, **options: Any
                    ) -> tuple[Path, dict[str, Any]]:
    """`export_checked`, plus with `measure` the deployment figures of
    `autoquant.export.runtime.deployment_figures`: size and latency, both also as ratios to the
    float export of the same model (timed interleaved, default session options)."""
    out, checked = export_checked(model, path, example_inputs, opset, **options)
    opset = opset or DEFAULT_OPSET
    figures: dict[str, Any] = {"onnx_path": str(out), "opset": opset,
                               "file_bytes": out.stat().st_size}
    if measure:
        from autoquant.export.runtime import deployment_figures

        signature = {k: options[k] for k in ("input_names", "output_names", "dynamic_axes",
                                             "dynamic_batch") if k in options}
        with tempfile.TemporaryDirectory() as tmp:
            baseline = export_float_onnx(model, Path(tmp) / "float.onnx", example_inputs,
                                         opset, **signature)
            figures = deployment_figures(model, out, example_inputs, opset,
                                         float_onnx=baseline)
    figures.update(checked)
    return out, figures


def export_saved(directory: str | Path, onnx_path: str | Path, model: nn.Module | None = None,
                 example_inputs: Any = None, opset: int | None = None, **options: Any) -> Path:
    """Export the result `SearchResult.save` wrote to `directory` to `onnx_path`.

    The fake-quant model is rebuilt with `autoquant.load_quantized` on `model` (the float
    architecture the search ran on). `options` are `export_onnx`'s keyword options (names,
    dynamic axes, ``strict``, ``target``). When ``directory/report.json`` exists, its
    ``deployment.export`` entry gets the export's figures (see `export_measured`). For a
    run directory of ``autoquant run``, ``autoquant export DIR --onnx PATH`` rebuilds the
    model and inputs from its job file.

    Example:
        >>> export_saved("out/search", "model_qdq.onnx", DigitsCNN(), (x,))
    """
    from autoquant.quant.saved import load_quantized

    if model is None:
        raise ConfigError(
            "export_saved needs model= (the float model the search ran on) and "
            "example_inputs=; for the output directory of `autoquant run`, `autoquant export "
            "DIR --onnx PATH` rebuilds both from its job.yaml")
    directory = Path(directory)
    qmodel = load_quantized(model, directory)
    report = directory / REPORT_FILE
    out, figures = export_measured(qmodel, onnx_path, example_inputs, opset,
                                   measure=report.is_file(), **options)
    if report.is_file():
        from autoquant.report.saving import record_deployment

        record_deployment(report, figures)
    return out
