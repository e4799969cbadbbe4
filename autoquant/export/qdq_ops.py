"""The QDQ building blocks of the ONNX export: two custom ops and the helpers that turn a
layer's qparams into the graph's integer initializers and Q/DQ nodes.

``autoquant::quantize_linear`` and ``autoquant::dequantize_linear`` are `torch.library`
custom ops whose eager semantics are ONNX QuantizeLinear/DequantizeLinear (divide by the
scale, round half to even, saturate to the zero point's integer type); `translation_table`
maps them to those ONNX ops for `torch.onnx.export(..., dynamo=True)`. A ``dynamic`` layer's
qparams are computed in the graph with `compute_qparams`'s own formula (`dynamic_qdq`; ONNX
DynamicQuantizeLinear is not used: it covers only 8-bit affine per-tensor uint8, and an
all-zero input gives it a zero scale where `compute_qparams` clamps the scale to eps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoquant.errors import ExportError, InternalError

__all__ = ["quantize_linear", "dequantize_linear", "dynamic_qdq", "translation_table",
           "storage_type", "weight_ints", "static_act", "static_qdq", "broadcast"]


# -- the two custom ops (eager semantics = ONNX semantics) ------------------------------------
def broadcast(t: torch.Tensor, dim: int, axis: int | None) -> torch.Tensor:
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
    s = broadcast(scale, x.dim(), axis)
    z = broadcast(zero_point, x.dim(), axis).to(torch.float32)
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
    s = broadcast(scale, q.dim(), axis)
    z = broadcast(zero_point, q.dim(), axis).to(torch.int32)
    return (q.to(torch.int32) - z).to(torch.float32) * s


@dequantize_linear.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None):
    return torch.empty_like(q, dtype=torch.float32)


def translation_table(opset: int) -> dict[Any, Any]:
    """The ``custom_translation_table`` of the two ops for `torch.onnx.export` at `opset`."""
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}", None)
    if op is None:
        raise ExportError(
            f"opset {opset} is not known to the installed onnxscript "
            f"{onnxscript.__version__}; pass opset=21 or upgrade onnxscript"
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
def storage_type(qmin: int, qmax: int) -> tuple[torch.dtype, int]:
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


def weight_ints(layer_name: str, w_fq: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None,
                 signed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integer weight, scale, zero point) in the storage type whose DequantizeLinear gives
    back the fake-quantized weight `w_fq`; with `signed`, an unsigned 8-bit range is stored
    as int8, weight and zero point shifted by -128 (the same dequantized values)."""
    w_fq = w_fq.detach().float()
    dtype, off = storage_type(qmin, qmax)
    if signed and dtype == torch.uint8:
        dtype, off = torch.int8, -128
    w_scale = scale.detach().float().to(w_fq.device)
    w_zp = zero_point.detach().to(torch.int32).to(w_fq.device)
    if axis is None:
        w_scale, w_zp = w_scale.reshape(()), w_zp.reshape(())
    s = broadcast(w_scale, w_fq.dim(), axis)
    z = broadcast(w_zp, w_fq.dim(), axis)
    q = torch.round(w_fq / s).to(torch.int32) + z
    # DequantizeLinear gives (q - z) * s, the very product fake_quantize returned; allow
    # float rounding only (a real mismatch would be a quarter step or more)
    if int(q.min()) < qmin or int(q.max()) > qmax or \
            bool(((q - z).float() * s - w_fq).abs().gt(0.25 * s).any()):
        raise InternalError(
            f"layer {layer_name!r}: the fake-quantized weight does not map back to "
            f"integers in [{qmin}, {qmax}]; please report this"
        )
    return (q + off).to(dtype), w_scale, (w_zp + off).to(dtype)


def static_act(owner: nn.Module, names: tuple[str, str, str, str], scale: torch.Tensor,
                zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None
                ) -> tuple[tuple[str, str, str, str], int | None, bool,
                           tuple[float, float] | None]:
    """Register the buffers of a calibrated activation quantizer on `owner` under `names`
    (scale, zero point, low, high); returns the spec `static_qdq` runs with."""
    dtype, off = storage_type(qmin, qmax)
    a_scale = scale.detach().float()
    a_zp = zero_point.detach().to(torch.int32)
    if axis is None:
        a_scale, a_zp = a_scale.reshape(()), a_zp.reshape(())
    owner.register_buffer(names[0], a_scale)
    owner.register_buffer(names[1], (a_zp + off).to(dtype))
    info = torch.iinfo(dtype)
    clip = (qmin + off, qmax + off) != (info.min, info.max)
    # QuantizeLinear saturates to the storage type only: clamp to the layer's own range
    low, high = (qmin - a_zp).float() * a_scale, (qmax - a_zp).float() * a_scale
    owner.register_buffer(names[2], low)
    owner.register_buffer(names[3], high)
    # per-tensor bounds as Python floats: a scalar Clip, no data-dependent tensor reads
    clip_range = (float(low), float(high)) if axis is None else None
    return names, axis, clip, clip_range


def static_qdq(owner: nn.Module, spec: tuple, x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize `x` with the calibrated quantizer `spec` of `owner`, as QDQ ops."""
    (scale_name, zp_name, low_name, high_name), axis, clip, clip_range = spec
    scale, zero_point = getattr(owner, scale_name), getattr(owner, zp_name)
    dtype = x.dtype
    x = x.float()
    if clip:
        if clip_range is not None:
            x = torch.clamp(x, *clip_range)
        else:
            x = torch.clamp(x, broadcast(getattr(owner, low_name), x.dim(), axis),
                            broadcast(getattr(owner, high_name), x.dim(), axis))
    axis = None if axis is None else axis % x.dim()
    q = quantize_linear(x, scale, zero_point, axis)
    return dequantize_linear(q, scale, zero_point, axis).to(dtype)


def dynamic_qdq(x: torch.Tensor, qmin: int, qmax: int, cfg: Any) -> torch.Tensor:
    """`autoquant.quant.qmath.dynamic_fake_quantize` as graph ops: min/max of `x` (per
    tensor, or per channel on axis 1), the qparams by `compute_qparams` itself, then
    QuantizeLinear/DequantizeLinear (after a Clip where [qmin, qmax] is narrower than the
    storage type)."""
    from autoquant.quant.quantizer import compute_qparams

    dtype = x.dtype
    xf = x.float()
    if cfg.per_channel and x.dim() >= 2:
        flat = xf.transpose(0, 1).reshape(x.shape[1], -1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        axis: int | None = 1
    else:
        lo, hi = xf.min().reshape(1), xf.max().reshape(1)
        axis = None
    bits = (qmax + 1).bit_length() if qmin < 0 else qmax.bit_length()
    scale, zp = compute_qparams(lo, hi, bits, cfg.symmetric)
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    store, off = storage_type(qmin, qmax)
    info = torch.iinfo(store)
    if (qmin + off, qmax + off) != (info.min, info.max):
        zf = zp.float()
        xf = torch.clamp(xf, broadcast((qmin - zf) * scale, xf.dim(), axis),
                         broadcast((qmax - zf) * scale, xf.dim(), axis))
    zq = (zp + off).to(store)
    q = quantize_linear(xf, scale, zq, axis)
    return dequantize_linear(q, scale, zq, axis).to(dtype)
