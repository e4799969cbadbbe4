"""Range-clipping algorithms beyond min-max: histogram entropy (KL) for activations and
per-channel MSE-optimal clipping for weights.

Both return a clipped ``(lo, hi)`` range; `autoquant.quant.quantizer.compute_qparams` turns it into
scale and zero point, so every algorithm shares one quantization grid definition.

- `entropy_range` follows the TensorRT calibrator: build a histogram of ``|x|``, and for each
  candidate threshold compare the clipped reference distribution P (outliers folded into the
  last bin) with its quantized version Q (the same bins merged into as many groups as the
  integer grid has levels); keep the threshold with the smallest KL(P || Q). It favours the
  shape of the bulk of the distribution over rare outliers.
- `mse_weight_range` grid-searches, independently per output channel, the clip fraction of
  the channel's min/max whose quantize-dequantize MSE is smallest (fraction 1.0 is min-max,
  so it is never worse than min-max on the weight itself).
"""

from __future__ import annotations

import torch

__all__ = ["entropy_range", "mse_weight_range", "CLIP_FRACTIONS"]

# Clip fractions tried by the MSE searches, largest (= min-max) first so ties keep min-max.
CLIP_FRACTIONS = torch.linspace(1.0, 0.05, 96)


def entropy_range(
    sample: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    symmetric: bool,
    num_bins: int | None = None,
    max_candidates: int = 96,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL-optimal clip range of `sample` for a `bits`-bit grid.

    Args:
        sample: observed values (any shape; flattened).
        lo, hi: the exact observed minimum and maximum (one element each); the result never
            widens them.
        bits: bit width of the grid.
        symmetric: the quantizer's mode. One-sided data (all >= 0 or all <= 0) on an affine
            grid uses all ``2**bits`` levels on one side; otherwise each side gets
            ``2**(bits-1)``.
        num_bins: histogram resolution; default ``32 * levels`` (at least 2048, at most
            32768), so a threshold down to 1/32 of the observed maximum can be found.
        max_candidates: thresholds tried (evenly spaced bin edges, the full range included).

    Returns:
        ``(lo, hi)`` clipped to ``[-t, t]`` for the chosen threshold ``t``.
    """
    x = sample.detach().reshape(-1).float().abs()
    amax = float(x.max()) if x.numel() else 0.0
    if amax == 0.0:
        return lo, hi
    one_sided = not symmetric and (bool((lo >= 0).all()) or bool((hi <= 0).all()))
    levels = 2**bits if one_sided else 2 ** (bits - 1)
    if num_bins is None:
        num_bins = min(max(2048, 32 * levels), 1 << 15)
    levels = min(levels, num_bins)
    hist = torch.histc(x, bins=num_bins, min=0.0, max=amax).double()
    step = max(1, (num_bins - levels) // max_candidates)
    candidates = list(range(levels, num_bins + 1, step))
    if candidates[-1] != num_bins:
        candidates.append(num_bins)
    best_kl, best_i = None, num_bins
    for i in candidates:
        kl = _kl_for_threshold(hist, i, levels)
        # candidates grow, so `<=` keeps the widest threshold among equal divergences
        if best_kl is None or kl <= best_kl:
            best_kl, best_i = kl, i
    threshold = torch.tensor(best_i * amax / num_bins, dtype=torch.float32, device=lo.device)
    return torch.maximum(lo, -threshold), torch.minimum(hi, threshold)


def _kl_for_threshold(hist: torch.Tensor, i: int, levels: int) -> float:
    ref = hist[:i].clone()
    ref[i - 1] += hist[i:].sum()
    kept = hist[:i]
    group = torch.arange(i, device=hist.device) * levels // i
    nonzero = (kept > 0).double()
    group_sum = torch.zeros(levels, dtype=torch.float64, device=hist.device).index_add_(
        0, group, kept)
    group_nz = torch.zeros(levels, dtype=torch.float64, device=hist.device).index_add_(
        0, group, nonzero)
    expanded = torch.where(
        kept > 0, group_sum[group] / group_nz[group].clamp(min=1.0), torch.zeros_like(kept))
    p = ref / ref.sum()
    q_total = expanded.sum()
    if q_total <= 0:
        return float("inf")
    q = expanded / q_total
    mask = p > 0
    q_masked = q[mask].clamp(min=1e-12)
    return float((p[mask] * torch.log(p[mask] / q_masked)).sum())


def mse_weight_range(
    flat: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row MSE-optimal clip range of a ``(channels, values)`` weight matrix.

    Each row is quantized with its own scale (per output channel); a single row is the
    per-tensor case. Returns ``(lo, hi)`` with one element per row.
    """
    from autoquant.quant.qmath import compute_qparams, fake_quantize, qrange

    flat = flat.detach().float()
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for frac in CLIP_FRACTIONS.tolist():
        c_lo, c_hi = lo * frac, hi * frac
        scale, zp = compute_qparams(c_lo, c_hi, bits, symmetric)
        quant = fake_quantize(flat, scale, zp, qmin, qmax, axis=0)
        err = ((quant - flat) ** 2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi
