"""ONNX export of a fake-quant model as a QDQ graph that computes what the searched model does.

Each quantized layer becomes, in the ONNX graph::

    x ─[Clip]─► QuantizeLinear ─► DequantizeLinear ─┐
    int8/int16 weight initializer ─► DequantizeLinear ─┴─► Gemm / Conv / ConvTranspose ...

with the layer's own scales and zero points (per-channel ``axis`` where the weight is
per-channel); a layer that fell back stays float, a 16-bit layer gets int16 QDQ (opset 21).
A ``dynamic``-mode layer computes its activation qparams in the graph (ReduceMin/ReduceMax,
the formula of `autoquant.quant.quantizer.compute_qparams`); a ``weight_only`` layer keeps a
float input, and an ``nn.Embedding`` gathers its integer rows and scales them (the values of
a DequantizeLinear of the whole table, without dequantizing it on every run); a
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

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from autoquant.errors import ConfigError, ExportError
from autoquant.export.ortmodule import CPU_UNSUPPORTED, DTYPE_FIX
from autoquant.export.prepare import check_target, export_copy, kernel_notes, model_target
from autoquant.export.signature import DynamicAxes, varying_axes
from autoquant.export.trace import DEFAULT_OPSET, Signature, check_opset, to_onnx_bytes
from autoquant.io.atomic import atomic_write_bytes
from autoquant.io.names import REPORT_FILE
from autoquant.quant.kinds.embedding import LOOKUP_NOTE
from autoquant.quant.target import host_target, runs_exactly_on

__all__ = ["DEFAULT_OPSET", "export_onnx", "export_checked", "export_measured",
           "export_float_onnx", "export_saved"]

logger = logging.getLogger(__name__)
_SLOWER = 1.1  # a latency ratio above this is reported: below, timing noise on small models


def _check_runtime_dtype(model: nn.Module) -> None:
    """onnxruntime's CPU kernels run float32 and float16 graphs, not bfloat16 or float64
    convolutions: refuse before tracing, naming the fix."""
    odd = {p.dtype for p in model.parameters()} & set(CPU_UNSUPPORTED)
    if odd:
        raise ExportError(
            f"the model computes in {', '.join(sorted(str(d)[6:] for d in odd))}, which "
            f"onnxruntime's CPU kernels do not run; {DTYPE_FIX}, or export with check=False "
            "for another runtime")


def export_checked(model: nn.Module, path: str | Path, example_inputs: Any,
                   opset: int | None = None, *, dynamic_batch: bool = True,
                   input_names: Sequence[str] | None = None,
                   output_names: Sequence[str] | None = None,
                   dynamic_axes: DynamicAxes | None = None, check: bool = True,
                   strict: bool = True, check_inputs: Sequence[Any] = (),
                   target: str | None = None, allow_target_mismatch: bool = False,
                   ) -> tuple[Path, dict[str, Any]]:
    """`export_onnx`, returning the path and the check's figures: ``target``, ``host``,
    ``integer_kernels`` (`autoquant.export.measure.kernel_coverage`) and the parity figures
    (`autoquant.export.runtime.check_parity`), or ``parity: "not checked: ..."``."""
    if check:
        _check_runtime_dtype(model)
    work, layers = export_copy(model, quantized=True)
    searched = model_target(model)
    check_target(searched, target, allow_target_mismatch)
    opset = check_opset(opset, layers)
    if not layers:
        logger.warning("the model has no quantized layer; exporting a float graph")
    sig = Signature(input_names, output_names, dynamic_axes, dynamic_batch,
                    tuple(varying_axes(example_inputs, check_inputs)))
    data = to_onnx_bytes(work, example_inputs, opset, sig)
    figures: dict[str, Any] = {"target": searched, "host": host_target()}
    if check:
        from autoquant.export.measure import kernel_coverage
        from autoquant.export.runtime import check_parity

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
            floats = _float_layers(coverage)
            if floats:
                shown = "; ".join(f"{n}: {r}" for n, r in list(floats.items())[:5])
                more = len(floats) - 5
                logger.warning("%d quantized layer(s) run in float in onnxruntime: %s%s",
                               len(floats), shown, f" (and {more} more)" if more > 0 else "")
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
    work, _ = export_copy(model, quantized=False)
    opset = check_opset(opset, {})
    sig = Signature(input_names, output_names, dynamic_axes, dynamic_batch)
    data = to_onnx_bytes(work, example_inputs, opset, sig)
    return atomic_write_bytes(path, data)


def export_measured(model: nn.Module, path: str | Path, example_inputs: Any,
                    opset: int | None = None, measure: bool = True, **options: Any
                    ) -> tuple[Path, dict[str, Any]]:
    """`export_checked`, plus with `measure` the deployment figures of
    `autoquant.export.measure.deployment_figures`: size and latency, both also as ratios to the
    float export of the same model (timed interleaved, default session options)."""
    out, checked = export_checked(model, path, example_inputs, opset, **options)
    opset = opset or DEFAULT_OPSET
    figures: dict[str, Any] = {"onnx_path": str(out), "opset": opset,
                               "file_bytes": out.stat().st_size}
    if measure:
        from autoquant.export.measure import deployment_figures

        signature = {k: options[k] for k in ("input_names", "output_names", "dynamic_axes",
                                             "dynamic_batch") if k in options}
        with tempfile.TemporaryDirectory() as tmp:
            baseline = export_float_onnx(model, Path(tmp) / "float.onnx", example_inputs,
                                         opset, **signature)
            figures = deployment_figures(model, out, example_inputs, opset,
                                         float_onnx=baseline)
    figures.update(checked)
    _warn_if_slower(figures)
    return out, figures


def _float_layers(coverage: dict[str, Any]) -> dict[str, str]:
    """The quantized layers of a kernel count that run float, with why, but for embedding
    lookups: a lookup has no product to run in integers, nothing to act on."""
    return {n: r for n, r in coverage.get("float", {}).items() if r != LOOKUP_NOTE}


def _warn_if_slower(figures: dict[str, Any]) -> None:
    """Say so when the INT8 file runs slower than the float one (what a user ships it for):
    what costs the time, and which quantized layers run float."""
    ratio = figures.get("latency_ratio")
    if ratio is None or ratio <= _SLOWER:
        return
    floats = list(_float_layers(figures.get("integer_kernels", {})))
    host = figures.get("host", host_target())
    logger.warning(
        "the INT8 file runs at %.2fx the float file's latency in onnxruntime on this CPU "
        "(%s): the QuantizeLinear/DequantizeLinear pairs around float ops between integer "
        "kernels (activations such as SiLU or GELU, gates, resizes) cost more than those "
        "kernels save%s. Layers kept float (skip_layers) trade size for speed%s", ratio, host,
        f"; {len(floats)} quantized layer(s) run float: {', '.join(floats[:5])}"
        if floats else "",
        "; this CPU has no VNNI, on which integer kernels gain less" if host == "x86_avx2"
        else "")


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
