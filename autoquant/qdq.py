"""The QDQ building blocks of the ONNX export: two custom ops and the export-time layer.

``autoquant::quantize_linear`` and ``autoquant::dequantize_linear`` are `torch.library`
custom ops whose eager semantics are ONNX QuantizeLinear/DequantizeLinear (divide by the
scale, round half to even, saturate to the zero point's integer type); `translation_table`
maps them to those ONNX ops for `torch.onnx.export(..., dynamo=True)`. `QDQLayer` is what an
active `autoquant.layers.QuantLayer` becomes in the exported copy (see `autoquant.export`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from autoquant.errors import ExportError, InternalError
from autoquant.layers import QuantLayer

__all__ = ["quantize_linear", "dequantize_linear", "translation_table", "QDQLayer",
           "storage_type"]

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


class QDQLayer(nn.Module):
    """What an active `QuantLayer` computes, written with the QDQ custom ops."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        assert layer._weight_q is not None and layer._act_q is not None
        self.layer_name = layer.layer_name
        self.module = layer.module
        w_qmin, w_qmax, self.weight_axis = layer._weight_q
        a_qmin, a_qmax, self.act_axis = layer._act_q
        self.weight_dtype = layer.module.weight.dtype
        self.storage_bits = max(storage_type(w_qmin, w_qmax)[0].itemsize,
                                storage_type(a_qmin, a_qmax)[0].itemsize) * 8

        w_fq = layer.quantized_weight().detach().float()
        w_dtype, w_off = storage_type(w_qmin, w_qmax)
        w_scale = layer.weight_scale.detach().float().cpu()
        w_zp = layer.weight_zero_point.detach().to(torch.int32).cpu()
        if self.weight_axis is None:
            w_scale, w_zp = w_scale.reshape(()), w_zp.reshape(())
        s = _broadcast(w_scale, w_fq.dim(), self.weight_axis).to(w_fq.device)
        z = _broadcast(w_zp, w_fq.dim(), self.weight_axis).to(w_fq.device)
        q = torch.round(w_fq / s).to(torch.int32) + z
        # DequantizeLinear gives (q - z) * s, the very product fake_quantize returned; allow
        # float rounding only (a real mismatch would be a quarter step or more)
        if int(q.min()) < w_qmin or int(q.max()) > w_qmax or \
                bool(((q - z).float() * s - w_fq).abs().gt(0.25 * s).any()):
            raise InternalError(
                f"layer {self.layer_name!r}: the fake-quantized weight does not map back to "
                f"integers in [{w_qmin}, {w_qmax}]; please report this"
            )
        self.register_buffer("weight_int", (q + w_off).to(w_dtype))
        self.register_buffer("weight_scale", w_scale.to(w_fq.device))
        self.register_buffer("weight_zero_point", (w_zp + w_off).to(w_dtype).to(w_fq.device))

        a_dtype, a_off = storage_type(a_qmin, a_qmax)
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
