"""ONNX export of a fake-quant model as a QDQ graph that computes what the searched model does.

Each quantized layer becomes, in the ONNX graph::

    x ─[Clip]─► QuantizeLinear ─► DequantizeLinear ─┐
    int8/int16 weight initializer ─► DequantizeLinear ─┴─► Gemm / Conv / ConvTranspose ...

with the layer's own scales and zero points (per-channel ``axis`` where the weight is
per-channel); a layer that fell back stays float, a 16-bit layer gets int16 QDQ (opset 21).

Why this design (custom ops traced by the dynamo exporter, not a rewrite of a float graph):
the searched model quantizes at module boundaries (`autoquant.layers.QuantLayer`), so on a
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

import copy
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from autoquant.errors import ConfigError, ExportError, InternalError, ModelError
from autoquant.io import atomic_write_bytes
from autoquant.layers import QuantLayer, QuantState

__all__ = ["DEFAULT_OPSET", "export_onnx", "export_float_onnx", "export_saved"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 21  # the first opset with int16/uint16 QuantizeLinear/DequantizeLinear
_MIN_OPSET = 18  # the dynamo exporter's lowest supported opset (per-axis QDQ needs 13)
_INT16_OPSET = 21


# -- the two custom ops (eager semantics = ONNX semantics) ------------------------------------
def _broadcast(t: torch.Tensor, dim: int, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t.reshape(())
    shape = [1] * dim
    shape[axis] = -1
    return t.reshape(shape)


@torch.library.custom_op("autoquant::quantize_linear", mutates_args=())
def quantize_linear(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None
) -> torch.Tensor:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)`` in the
    dtype of `zero_point`."""
    info = torch.iinfo(zero_point.dtype)
    s = _broadcast(scale, x.dim(), axis)
    z = _broadcast(zero_point, x.dim(), axis).to(torch.float32)
    q = torch.round(x.float() / s) + z
    return q.clamp(info.min, info.max).to(zero_point.dtype)


@quantize_linear.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None):
    return torch.empty_like(x, dtype=zero_point.dtype)


@torch.library.custom_op("autoquant::dequantize_linear", mutates_args=())
def dequantize_linear(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None
) -> torch.Tensor:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` as float32."""
    s = _broadcast(scale, q.dim(), axis)
    z = _broadcast(zero_point, q.dim(), axis).to(torch.int32)
    return (q.to(torch.int32) - z).to(torch.float32) * s


@dequantize_linear.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None):
    return torch.empty_like(q, dtype=torch.float32)


def _translation_table(opset: int) -> dict[Any, Any]:
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}", None)
    if op is None:
        raise ExportError(
            f"opset {opset} is not known to the installed onnxscript "
            f"{onnxscript.__version__}; pass opset={DEFAULT_OPSET} or upgrade onnxscript"
        )

    def onnx_quantize(x: Any, scale: Any, zero_point: Any, axis: int | None = None) -> Any:
        if axis is None:
            return op.QuantizeLinear(x, scale, zero_point)
        return op.QuantizeLinear(x, scale, zero_point, axis=axis)

    def onnx_dequantize(q: Any, scale: Any, zero_point: Any, axis: int | None = None) -> Any:
        if axis is None:
            return op.DequantizeLinear(q, scale, zero_point)
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {
        torch.ops.autoquant.quantize_linear.default: onnx_quantize,
        torch.ops.autoquant.dequantize_linear.default: onnx_dequantize,
    }


# -- the export-time replacement of an active QuantLayer ---------------------------------------
def _storage(qmin: int, qmax: int) -> tuple[torch.dtype, int]:
    """The ONNX integer type holding [qmin, qmax] and the offset added to fit it."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8, 0
    if qmin >= -128 and qmax <= 127:
        return torch.int8, 0
    if qmin >= -32768 and qmax <= 32767:
        return torch.int16, 0
    if qmin >= 0 and qmax <= 65535:
        return torch.int16, -32768  # unsigned 16-bit: same values as int16, shifted
    raise InternalError(f"no ONNX integer type holds the range [{qmin}, {qmax}]")


class _QDQLayer(nn.Module):
    """What an active `QuantLayer` computes, written with the QDQ custom ops."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        assert layer._weight_q is not None and layer._act_q is not None
        self.layer_name = layer.layer_name
        self.module = layer.module
        w_qmin, w_qmax, self.weight_axis = layer._weight_q
        a_qmin, a_qmax, self.act_axis = layer._act_q
        self.weight_dtype = layer.module.weight.dtype
        self.storage_bits = max(_storage(w_qmin, w_qmax)[0].itemsize,
                                _storage(a_qmin, a_qmax)[0].itemsize) * 8

        w_fq = layer.quantized_weight().detach().float()
        w_dtype, w_off = _storage(w_qmin, w_qmax)
        w_scale = layer.weight_scale.detach().float().cpu()
        w_zp = layer.weight_zero_point.detach().to(torch.int32).cpu()
        if self.weight_axis is None:
            w_scale, w_zp = w_scale.reshape(()), w_zp.reshape(())
        s = _broadcast(w_scale, w_fq.dim(), self.weight_axis).to(w_fq.device)
        z = _broadcast(w_zp, w_fq.dim(), self.weight_axis).to(w_fq.device)
        q = torch.round(w_fq / s).to(torch.int32) + z
        if int(q.min()) < w_qmin or int(q.max()) > w_qmax or \
                not torch.equal((q - z).float() * s, w_fq):
            raise InternalError(
                f"layer {self.layer_name!r}: the fake-quantized weight does not map back to "
                f"integers in [{w_qmin}, {w_qmax}]; please report this"
            )
        self.register_buffer("weight_int", (q + w_off).to(w_dtype))
        self.register_buffer("weight_scale", w_scale.to(w_fq.device))
        self.register_buffer("weight_zero_point", (w_zp + w_off).to(w_dtype).to(w_fq.device))

        a_dtype, a_off = _storage(a_qmin, a_qmax)
        a_scale = layer.act_scale.detach().float()
        a_zp = layer.act_zero_point.detach().to(torch.int32)
        if self.act_axis is None:
            a_scale, a_zp = a_scale.reshape(()), a_zp.reshape(())
        self.register_buffer("act_scale", a_scale)
        self.register_buffer("act_zero_point", (a_zp + a_off).to(a_dtype))
        info = torch.iinfo(a_dtype)
        self.clip = (a_qmin + a_off, a_qmax + a_off) != (info.min, info.max)
        # QuantizeLinear saturates to the storage type only: clamp to the layer's own range
        low, high = (a_qmin - a_zp).float() * a_scale, (a_qmax - a_zp).float() * a_scale
        self.register_buffer("act_low", low)
        self.register_buffer("act_high", high)
        # per-tensor bounds as Python floats: a scalar Clip, no data-dependent tensor reads
        self.clip_range = (float(low), float(high)) if self.act_axis is None else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dtype = x.dtype
        x = x.float()
        if self.clip:
            if self.clip_range is not None:
                x = torch.clamp(x, *self.clip_range)
            else:
                x = torch.clamp(x, _broadcast(self.act_low, x.dim(), self.act_axis),
                                _broadcast(self.act_high, x.dim(), self.act_axis))
        axis = None if self.act_axis is None else self.act_axis % x.dim()
        q = quantize_linear(x, self.act_scale, self.act_zero_point, axis)
        x = dequantize_linear(q, self.act_scale, self.act_zero_point, axis).to(dtype)
        w = dequantize_linear(self.weight_int, self.weight_scale, self.weight_zero_point,
                              self.weight_axis).to(self.weight_dtype)
        module = self.module
        bias = getattr(module, "bias", None)
        channel = _channel_axis(module, x.dim())
        if isinstance(bias, torch.Tensor) and channel is not None:
            # The bias is added after the Gemm/Conv, not as its third input: onnxruntime's
            # WeightBiasQuantization optimizer would otherwise round a float bias fed to a
            # QDQ Conv/Gemm to int32 at scale act_scale * weight_scale, which is not what the
            # searched model computes (and overflows at 16 bits).
            y = functional_call(module, {"weight": w, "bias": torch.zeros_like(bias)},
                                (x, *args), kwargs)
            return y + _broadcast(bias, y.dim(), channel % y.dim())
        return functional_call(module, {"weight": w}, (x, *args), kwargs)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)


def _channel_axis(module: nn.Module, input_dim: int) -> int | None:
    """The output-channel axis of a Linear/Conv output (the bias axis); None otherwise."""
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, _CONVS):
        return input_dim - len(module.kernel_size) - 1  # batched or unbatched input
    return None


def _export_copy(model: nn.Module, quantized: bool) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `model` with every QuantLayer swapped for a `_QDQLayer` (if active and
    `quantized`) or for its float module; returns it and ``{layer: storage bits}``."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        work = copy.deepcopy(model)
    except Exception as err:
        raise ModelError(
            f"cannot deep-copy the model ({type(err).__name__}: {err}); export works on a "
            "copy so the search result is never changed. Make the model deep-copyable."
        ) from err
    work.eval()
    layers: dict[str, int] = {}
    for name, module in list(work.named_modules()):
        if not isinstance(module, QuantLayer):
            continue
        active = (quantized and module.state is QuantState.QUANTIZE
                  and module._weight_q is not None and module._act_q is not None)
        new: nn.Module = _QDQLayer(module) if active else module.module
        if active:
            layers[name] = new.storage_bits  # type: ignore[assignment]
        parent_name, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent_name) if parent_name else work, child, new)
    return work, layers


# -- tracing, translation and error naming -----------------------------------------------------
def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example_inputs is None:
        raise ConfigError(
            "export needs example_inputs: a tuple of positional inputs (e.g. (x,)) or a dict "
            "of keyword inputs that the model runs on"
        )
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _dynamic_batch(args: tuple, kwargs: dict, model: nn.Module) -> Any:
    from torch.export import Dim
    from torch.utils._pytree import tree_map

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return {0: Dim.AUTO}
        return None

    if not kwargs:
        return tree_map(spec, args, is_leaf=lambda v: isinstance(v, torch.Tensor))
    import inspect

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {k: tree_map(spec, v, is_leaf=lambda v: isinstance(v, torch.Tensor))
            for k, v in bound.arguments.items()}


def _module_names(model: nn.Module) -> dict[int, str]:
    names = {}
    for name, module in model.named_modules():
        names[id(module)] = name
    for name, module in model.named_modules():
        if isinstance(module, _QDQLayer):  # report the searched layer, not its child
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
        elif op and op.split(".")[1].lstrip("_") in str(node.target):
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


def _to_onnx_bytes(work: nn.Module, example_inputs: Any, opset: int,
                   dynamic_batch: bool) -> bytes:
    args, kwargs = _split_inputs(example_inputs)
    try:
        dynamic = _dynamic_batch(args, kwargs, work) if dynamic_batch else None
    except TypeError:
        dynamic = None
    try:
        program = torch.export.export(work, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as err:
        layer = _layer_from_traceback(err, work)
        where = f" in layer {layer!r} ({type(work.get_submodule(layer)).__name__})" \
            if layer else ""
        raise ExportError(
            f"torch.export could not trace the model{where}: {type(err).__name__}: "
            f"{_first_line(err)}. Make that forward traceable (no data-dependent Python "
            "control flow, inputs as tensors); the search result is unchanged."
        ) from err
    try:
        onnx_program = torch.onnx.export(
            program, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
            custom_translation_table=_translation_table(opset), verbose=False, optimize=True,
        )
    except ExportError:
        raise
    except Exception as err:
        layer, op = _layer_from_node(err, program)
        what = f"op {op}" if op else "an op"
        where = f" in layer {layer!r}" if layer else ""
        raise ExportError(
            f"the ONNX exporter refused {what}{where}: {_first_line(err)}. Rewrite that "
            "forward with ops ONNX supports, or export with another opset; the search "
            "result is unchanged."
        ) from err
    proto = onnx_program.model_proto
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
def export_onnx(model: nn.Module, path: str | Path, example_inputs: Any,
                opset: int | None = None, *, dynamic_batch: bool = True) -> Path:
    """Export a fake-quant model as an ONNX QDQ graph computing what the model computes.

    Every active `QuantLayer` becomes QuantizeLinear/DequantizeLinear on its input and a
    DequantizeLinear on its integer weight initializer; float layers stay float. The model
    is copied first: `model` (e.g. ``SearchResult.model``) is never changed, also on error.

    Args:
        model: a fake-quant model: ``SearchResult.model``, or the output of
            `autoquant.quantize` or `autoquant.load_quantized`.
        path: the ``.onnx`` file to write (atomically).
        example_inputs: a tuple of positional inputs (or a dict of keyword inputs) the
            model runs on; they fix the graph's input signature.
        opset: the ONNX opset, at least 18; default 21 (needed for 16-bit layers).
        dynamic_batch: make dimension 0 of every tensor input dynamic where the model
            allows it (an example batch of 1 gives a fixed batch of 1).

    Returns:
        The path written.

    Raises:
        ExportError: the exporter cannot trace or translate part of the model; the message
            names the layer and the op.

    Example:
        >>> qmodel = autoquant.quantize(model, evaluator)
        >>> export_onnx(qmodel, "model_qdq.onnx", (x,))
    """
    work, layers = _export_copy(model, quantized=True)
    opset = _check_opset(opset, layers)
    if not layers:
        logger.warning("the model has no quantized layer; exporting a float graph")
    data = _to_onnx_bytes(work, example_inputs, opset, dynamic_batch)
    out = atomic_write_bytes(path, data)
    logger.info("exported %d QDQ layer(s) to %s (%d bytes, opset %d)", len(layers), out,
                len(data), opset)
    return out


def export_float_onnx(model: nn.Module, path: str | Path, example_inputs: Any,
                      opset: int | None = None, *, dynamic_batch: bool = True) -> Path:
    """Export the float counterpart of `model` (every `QuantLayer` unwrapped) to ONNX.

    The baseline for sizes and speed: the same graph as `export_onnx` without QDQ.
    """
    work, _ = _export_copy(model, quantized=False)
    opset = _check_opset(opset, {})
    data = _to_onnx_bytes(work, example_inputs, opset, dynamic_batch)
    return atomic_write_bytes(path, data)


def export_saved(directory: str | Path, onnx_path: str | Path, model: nn.Module | None = None,
                 example_inputs: Any = None, opset: int | None = None) -> Path:
    """Export the result saved by `SearchResult.save` in `directory` to `onnx_path`.

    The fake-quant model is rebuilt with `autoquant.load_quantized` on `model` (the float
    architecture the search ran on). Without `model`, the float model and its example
    inputs come from ``directory/job.yaml`` through `autoquant.job.load_job`. When
    ``directory/report.json`` exists, its ``settings.deployment`` entry is updated with the
    export's figures (see `autoquant.deploy.deployment_figures`).

    Example:
        >>> export_saved("out/search", "model_qdq.onnx", model=DigitsCNN(), example_inputs=(x,))
    """
    from autoquant.api import load_quantized

    directory = Path(directory)
    if model is None:
        job_file = directory / "job.yaml"
        if not job_file.is_file():
            raise ConfigError(
                f"{job_file} does not exist: pass model= (the float model the search ran on) "
                "and example_inputs=, or save the search with its job file"
            )
        try:
            from autoquant.job import load_job
        except ImportError as err:
            raise ConfigError(
                "this autoquant has no job files (autoquant.job is missing); pass model= and "
                "example_inputs= to export_saved"
            ) from err
        job = load_job(job_file)
        model = job.build_model()
        if example_inputs is None:
            example_inputs = job.example_inputs()
    qmodel = load_quantized(model, directory)
    out = export_onnx(qmodel, onnx_path, example_inputs, opset)
    report = directory / "report.json"
    if report.is_file():
        from autoquant.deploy import deployment_figures, record_deployment

        figures = deployment_figures(qmodel, out, example_inputs, opset or DEFAULT_OPSET)
        record_deployment(report, figures)
    return out
