"""Hand-written fake-quant references (explicit formulas, independent of autoquant but for
the deploy target's weight range: 8-bit weights are 7-bit on x86 CPUs without VNNI)."""

from __future__ import annotations

import torch

from autoquant.quant.target import deploy_weight_bits, host_target


def weight_bits(bits: int = 8) -> int:
    """The bit width a signed `bits`-bit weight has on this machine's deploy target."""
    return deploy_weight_bits(bits, True, host_target())


def row_scales(w: torch.Tensor, bits: int = 8, axis: int = 0) -> torch.Tensor:
    """The symmetric per-row scales of `w` (one per output channel on `axis`)."""
    qmax = 2 ** (weight_bits(bits) - 1) - 1
    wt = w.detach().transpose(0, axis)
    return wt.reshape(wt.shape[0], -1).abs().max(dim=1).values / qmax


def fq_rows(w: torch.Tensor, bits: int = 8, axis: int = 0) -> torch.Tensor:
    """Symmetric per-row (per output channel on `axis`) fake quantization of a weight."""
    qmax = 2 ** (weight_bits(bits) - 1) - 1
    wt = w.detach().transpose(0, axis)
    scale = row_scales(w, bits, axis).reshape(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(wt * (1.0 / scale)), -qmax - 1, qmax)
    return (q * scale).transpose(0, axis)


def affine_scale(lo: float, hi: float, bits: int = 8) -> torch.Tensor:
    """The scale of an asymmetric per-tensor activation quantizer over [lo, hi]."""
    lo = min(float(torch.as_tensor(lo).detach()), 0.0)
    hi = max(float(torch.as_tensor(hi).detach()), 0.0)
    return torch.tensor((hi - lo) / (2**bits - 1), dtype=torch.float32)


def int32_bias(bias: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor
               ) -> torch.Tensor:
    """The bias an integer kernel adds: rounded to int32 at scale ``a_scale * w_scale``."""
    scale = a_scale * w_scale
    return torch.round(bias.detach() / scale) * scale


def fq_affine(x: torch.Tensor, lo: float, hi: float, bits: int = 8) -> torch.Tensor:
    """Asymmetric per-tensor fake quantization of an activation with range [lo, hi]."""
    lo = min(float(torch.as_tensor(lo).detach()), 0.0)
    hi = max(float(torch.as_tensor(hi).detach()), 0.0)
    x = x.detach()
    qmax = 2**bits - 1
    scale = torch.tensor((hi - lo) / qmax, dtype=torch.float32)
    zp = torch.clamp(-torch.round(torch.tensor(lo, dtype=torch.float32) / scale), 0, qmax)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zp, 0, qmax)
    return (q - zp) * scale


def fq_batch(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic fake quantization: the range is the tensor's own min/max."""
    return fq_affine(x, float(x.min()), float(x.max()), bits)
