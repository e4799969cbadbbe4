"""The QDQ math, on core torch ops only: integer ranges, qparams covering a value range,
and quantize-then-dequantize with ONNX QuantizeLinear/DequantizeLinear semantics (divide by
the scale, round half to even, clamp to [qmin, qmax]), also with qparams of each batch's
own range (dynamic quantization)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["qrange", "compute_qparams", "fake_quantize", "dynamic_fake_quantize", "QParams"]

_EPS = torch.finfo(torch.float32).eps
QParams = tuple[torch.Tensor, torch.Tensor, int, int, "int | None"]  # scale, zp, qmin, qmax, axis


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a quantizer: signed for symmetric, unsigned for affine."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def compute_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) covering [min_val, max_val] (per element).

    The range always includes 0 so that zero (padding, ReLU outputs) is exact.
    Symmetric: ``scale = max|x| / qmax``, zero point 0. Affine:
    ``scale = (max - min) / (qmax - qmin)``, ``zp = qmin - round(min / scale)``.
    """
    qmin, qmax = qrange(bits, symmetric)
    min_val = torch.clamp(min_val.detach().float(), max=0.0)
    max_val = torch.clamp(max_val.detach().float(), min=0.0)
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = torch.clamp(amax / qmax, min=_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=_EPS)
        zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Quantize then dequantize `x`: ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s``.

    Per-tensor when `axis` is None (scale/zero_point with one element), else per-channel
    along `axis`. Works for any float dtype (computed in float32) and any device.

    Why not ``torch.fake_quantize_per_*_affine``: they multiply by the reciprocal of the
    scale where ONNX QuantizeLinear (and so the deployed runtime) divides by it; values on
    a rounding tie (a saturated tanh at exactly 1.0 with scale 2/255 lands on 127.5) then
    round to the other integer, and in a deep network those flips add up.
    """
    dtype = x.dtype
    xf = x if dtype == torch.float32 else x.float()
    s = scale.detach().to(device=xf.device, dtype=torch.float32)
    z = zero_point.detach().to(device=xf.device, dtype=torch.float32)
    if axis is None:
        s, z = s.reshape(()), z.reshape(())
    else:
        shape = [1] * xf.dim()
        shape[axis % xf.dim()] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    if torch.is_grad_enabled() and xf.requires_grad:
        out = (torch.clamp(torch.round(xf / s) + z, qmin, qmax) - z) * s
    else:  # in place on the one new tensor: 2.5x faster than five temporaries
        out = xf / s
        out.round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
    return out if dtype == torch.float32 else out.to(dtype)


def dynamic_fake_quantize(
    x: torch.Tensor, qmin: int, qmax: int, cfg: Any
) -> torch.Tensor:
    """Fake-quantize `x` with qparams from its own min/max (dynamic quantization).

    Per tensor, or per channel on axis 1 when ``cfg.per_channel`` and `x` has that axis.
    The range always includes 0, as for calibrated qparams.
    """
    xd = x.detach()
    if cfg.per_channel and x.dim() >= 2:
        flat = xd.transpose(0, 1).reshape(x.shape[1], -1).float()
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        axis: int | None = 1
    else:
        lo, hi = xd.min().float().reshape(1), xd.max().float().reshape(1)
        axis = None
    bits = (qmax + 1).bit_length() if qmin < 0 else qmax.bit_length()  # from the int range
    scale, zp = compute_qparams(lo, hi, bits, cfg.symmetric)
    return fake_quantize(x, scale, zp, qmin, qmax, axis)
