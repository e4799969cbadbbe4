"""Range observers and weight qparams (the QDQ math itself is `autoquant.quant.qmath`,
re-exported here).

Observers keep bounded statistics (exact min/max plus a fixed-size uniform sample), so
calibration memory does not grow with the number of batches, and qparams for any bit width
can be derived later from the same statistics (calibrate once, apply many).
"""

from __future__ import annotations

import torch

from autoquant.config import QuantizerConfig
from autoquant.errors import InternalError, ModelError
from autoquant.quant.clipping import entropy_range, mse_weight_range
from autoquant.quant.qmath import QParams, compute_qparams, fake_quantize, qrange

__all__ = [
    "qrange",
    "compute_qparams",
    "fake_quantize",
    "QParams",
    "ActivationObserver",
    "weight_qparams",
]



def weight_qparams(
    weight: torch.Tensor, bits: int, cfg: QuantizerConfig, axis: int
) -> tuple[torch.Tensor, torch.Tensor, int, int, int | None]:
    """Qparams of a weight: per output channel along `axis`, or per tensor.

    ``cfg.algorithm`` ``"minmax"`` covers the full range; ``"mse"`` clips each channel to
    its MSE-optimal range (`autoquant.quant.clipping.mse_weight_range`).
    """
    w = weight.detach().float()
    if cfg.per_channel:
        flat = w.transpose(0, axis).reshape(w.shape[axis], -1)
        channel_axis: int | None = axis
    else:
        flat = w.reshape(1, -1)
        channel_axis = None
    if cfg.algorithm == "mse":
        lo, hi = mse_weight_range(flat, bits, cfg.symmetric)
    else:
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    scale, zp = compute_qparams(lo, hi, bits, cfg.symmetric)
    qmin, qmax = qrange(bits, cfg.symmetric)
    return scale, zp, qmin, qmax, channel_axis


def _quantile(ordered: torch.Tensor, q: float) -> torch.Tensor:
    """`torch.quantile` (linear interpolation) of an already sorted 1-D tensor."""
    pos = q * (ordered.numel() - 1)
    low = int(pos)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (pos - low) * (ordered[high] - ordered[low])


class ActivationObserver:
    """Streams activation statistics and derives qparams for any bit width.

    Keeps the exact running min/max (per tensor, or per channel on axis 1) and a uniform
    random sample of at most `sample_size` values over all batches seen (for the
    `percentile`, `mse`, `entropy` and `auto` algorithms). Deterministic for a given `seed`.
    With algorithm ``auto``, `choice` (set by `autoquant.calibration.refine.choose_calibration`)
    names the algorithm used; min-max until it is set.
    """

    def __init__(self, cfg: QuantizerConfig, sample_size: int = 1 << 16, seed: int = 0) -> None:
        self.cfg = cfg
        self.sample_size = sample_size
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None
        self.seen = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, int, int, int | None]] = {}
        self.choice: tuple[str, float] | None = None  # (algorithm, percentile) for "auto"
        self.owner = ""  # the layer it observes, for messages
        self._sorted_cache: tuple[bool, torch.Tensor] | None = None  # cleared by update

    @property
    def has_data(self) -> bool:
        """True once at least one tensor was observed."""
        return self.min_val is not None

    def update(self, x: torch.Tensor) -> None:
        """Fold one activation tensor into the statistics."""
        x = x.detach()
        if x.numel() == 0:
            return
        if not x.is_floating_point():
            x = x.float()
        if self.cfg.per_channel and x.dim() >= 2:
            flat = x.transpose(0, 1).reshape(x.shape[1], -1).float()
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        else:
            lo, hi = x.min().float().reshape(1), x.max().float().reshape(1)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        elif self.min_val.shape != lo.shape:  # would silently restart the statistics
            owner = f" of layer {self.owner!r}" if self.owner else ""
            raise ModelError(
                f"the per-channel activation statistics{owner} need the same size of axis 1 "
                f"in every calibration batch, got {self.min_val.numel()} then {lo.numel()}; "
                "set activation per_channel: false for this layer (or calibrate on batches "
                "of one shape)")
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        if self.cfg.algorithm != "minmax":
            self._update_sample(x.reshape(-1).float())
        self._cache.clear()
        self._sorted_cache = None

    def _update_sample(self, values: torch.Tensor) -> None:
        # Keep a uniform sample of the union of all batches: the new batch contributes in
        # proportion to its share of everything seen so far.
        n = values.numel()
        total = self.seen + n
        size = self.sample_size
        take_new = min(n, round(size * n / total)) if total > size else n
        new = values[self._draw(n, take_new).to(values.device)]
        if self.sample is None:
            self.sample = new
        else:
            keep_old = min(self.sample.numel(), size - take_new)
            old_idx = self._draw(self.sample.numel(), keep_old)
            self.sample = torch.cat([self.sample[old_idx.to(self.sample.device)], new])
        self.seen = total

    def _draw(self, n: int, k: int) -> torch.Tensor:
        """`k` seeded indices into `n`: without replacement when `k` is a large share of
        `n`, else with replacement (a permutation of a 12M-element activation to keep 4096
        of its values cost 28 ms per call, most of the ``auto`` calibration's observer
        pass; repeats among 4096 of millions are rare and harmless to a quantile)."""
        if k * 8 >= n:
            return torch.randperm(n, generator=self._generator)[:k]
        return torch.randint(n, (k,), generator=self._generator)

    def qparams(self, bits: int) -> tuple[torch.Tensor, torch.Tensor, int, int, int | None]:
        """(scale, zero_point, qmin, qmax, axis) for `bits`; cached per bit width."""
        if bits in self._cache:
            return self._cache[bits]
        algorithm, percentile = self.effective_algorithm()
        self._cache[bits] = self.qparams_for(bits, algorithm, percentile)
        return self._cache[bits]

    def clip_range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (low, high) range the effective algorithm clips to at `bits`."""
        if self.min_val is None or self.max_val is None:
            raise InternalError("observer has no data: calibrate before quantizing")
        return self._range(bits, *self.effective_algorithm())

    def effective_algorithm(self) -> tuple[str, float]:
        """The (algorithm, percentile) `qparams` uses: the configured one, or for ``auto``
        the chosen one (min-max until chosen)."""
        if self.cfg.algorithm == "auto":
            return self.choice or ("minmax", self.cfg.percentile)
        return self.cfg.algorithm, self.cfg.percentile

    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Replace the running min/max of a per-tensor min-max observer by a range known
        exactly from other statistics (a smoothed input's per-channel extremes)."""
        if self.cfg.algorithm != "minmax" or self.cfg.per_channel:
            raise InternalError("set_range needs a per-tensor min-max observer")
        self.min_val = low.detach().float().reshape(1)
        self.max_val = high.detach().float().reshape(1)
        self._cache.clear()

    def set_choice(self, algorithm: str, percentile: float) -> None:
        """Fix the algorithm an ``auto`` observer uses from now on."""
        self.choice = (algorithm, float(percentile))
        self._cache.clear()

    def qparams_for(
        self, bits: int, algorithm: str, percentile: float
    ) -> tuple[torch.Tensor, torch.Tensor, int, int, int | None]:
        """Qparams for `bits` with an explicit `algorithm` (uncached; for comparisons)."""
        if self.min_val is None or self.max_val is None:
            raise InternalError("observer has no data: calibrate before quantizing")
        lo, hi = self._range(bits, algorithm, percentile)
        scale, zp = compute_qparams(lo, hi, bits, self.cfg.symmetric)
        qmin, qmax = qrange(bits, self.cfg.symmetric)
        axis = 1 if (self.cfg.per_channel and lo.numel() > 1) else None
        return scale, zp, qmin, qmax, axis

    def _range(
        self, bits: int, algorithm: str, percentile: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.min_val, self.max_val
        assert lo is not None and hi is not None
        if algorithm == "minmax" or self.sample is None:
            return lo, hi
        if algorithm == "percentile":
            return self._percentile_range(self.sample, lo, hi, percentile)
        if algorithm == "entropy":
            return entropy_range(self.sample, lo, hi, bits, self.cfg.symmetric)
        return self._mse_range(self.sample, lo, hi, bits)

    def _percentile_range(
        self, sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, percentile: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = percentile / 100.0
        if self.cfg.symmetric:
            amax = _quantile(self._sorted(sample, True), q).reshape(1)
            return torch.maximum(-amax, lo), torch.minimum(amax, hi)
        ordered = self._sorted(sample, False)
        low = _quantile(ordered, 1.0 - q).reshape(1)
        high = _quantile(ordered, q).reshape(1)
        return torch.maximum(low, lo), torch.minimum(high, hi)

    def _sorted(self, sample: torch.Tensor, absolute: bool) -> torch.Tensor:
        # one sort serves every percentile level (the "auto" choice tries several)
        if self._sorted_cache is None or self._sorted_cache[0] != absolute:
            values = sample.abs() if absolute else sample
            self._sorted_cache = (absolute, torch.sort(values).values)
        return self._sorted_cache[1]

    def _mse_range(
        self, sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Grid search over clip fractions of the observed range; the candidate with the
        # lowest quantize-dequantize MSE on the sample wins (min-max is the fraction 1.0,
        # tried first, so ties keep it). A block of fractions at a time, one row each.
        fractions = torch.linspace(0.05, 1.0, 96, device=sample.device).flip(0)
        qmin, qmax = qrange(bits, self.cfg.symmetric)
        errors = []
        block = max(1, (1 << 20) // max(1, sample.numel()))
        for part in fractions.split(block):
            scale, zp = compute_qparams(lo * part, hi * part, bits, self.cfg.symmetric)
            rows = sample.reshape(1, -1).expand(part.numel(), -1)
            quant = fake_quantize(rows, scale, zp, qmin, qmax, axis=0)
            errors.append(torch.mean((quant - rows) ** 2, dim=1))
        best = int(torch.argmin(torch.cat(errors)))  # the first minimum: the widest range
        return lo * fractions[best], hi * fractions[best]
