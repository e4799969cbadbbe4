"""Hand-written fake-quant references (explicit formulas, independent of autoquant)."""

from __future__ import annotations

import torch


def fq_rows(w: torch.Tensor, bits: int = 8, axis: int = 0) -> torch.Tensor:
    """Symmetric per-row (per output channel on `axis`) fake quantization of a weight."""
    qmax = 2 ** (bits - 1) - 1
    wt = w.detach().transpose(0, axis)
    amax = wt.reshape(wt.shape[0], -1).abs().max(dim=1).values
    scale = (amax / qmax).reshape(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(wt * (1.0 / scale)), -qmax - 1, qmax)
    return (q * scale).transpose(0, axis)


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
