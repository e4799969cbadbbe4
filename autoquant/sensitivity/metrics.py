"""More sensitivity metrics beside cosine: SQNR (from the MSE) and KL divergence.

Both follow the `SensitivityMetric` contract (higher score = closer to float) and are
registered in `autoquant.sensitivity.ranking.SENSITIVITY_METRICS` as ``"mse"`` and ``"kl"``.
"""

from __future__ import annotations

import math

import torch

from autoquant.sensitivity.ranking import SensitivityMetric

__all__ = ["SQNR", "SQNRMetric", "KLMetric", "MAX_SQNR_DB"]

MAX_SQNR_DB = 200.0  # the score of an exact match (no noise), kept finite for JSON reports


class SQNR:
    """Signal-to-quantization-noise ratio in dB, accumulated over calls:
    ``10 log10(sum y^2 / sum (y - y_q)^2)`` (infinite when the outputs are identical)."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def update(self, y_float: torch.Tensor, y_quant: torch.Tensor) -> None:
        """Fold one call's outputs into the running sums."""
        # float32 norms (a cascade sum, accurate to about 1e-6), squared in Python floats: a
        # float64 sum converts every element and costs about 6x more
        y = y_float.detach().float()
        diff = y_quant.detach().float() - y
        self.signal += float(torch.linalg.vector_norm(y)) ** 2
        self.noise += float(torch.linalg.vector_norm(diff)) ** 2

    def score(self) -> float:
        """The SQNR in dB (higher = closer to float)."""
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


class SQNRMetric(SensitivityMetric):
    """Signal-to-quantization-noise ratio in dB, from the MSE of the quantized output.

    ``10 * log10(sum(y_float^2) / sum((y_float - y_quant)^2))`` over every call of the
    layer (energies are summed before the ratio, so large batches weigh more). Unlike
    cosine it sees a pure scale error. An exact match scores `MAX_SQNR_DB`; an all-zero
    float output with a non-zero error scores ``-MAX_SQNR_DB``.
    """

    name = "mse"

    def __init__(self) -> None:
        self.sqnr = SQNR()

    def update(self, y_float: torch.Tensor, y_quant: torch.Tensor) -> None:
        self.sqnr.update(y_float, y_quant)

    def score(self) -> float:
        return max(-MAX_SQNR_DB, min(MAX_SQNR_DB, self.sqnr.score()))


class KLMetric(SensitivityMetric):
    """Negative KL divergence ``KL(softmax(y_float) || softmax(y_quant))``, mean per sample.

    Each output is flattened per sample (the first dimension is the batch; a 0-d or 1-d
    output is one sample) and turned into a distribution with a softmax over its features,
    so the score compares where the output puts its mass, element by element (a
    histogram of values would ignore which element holds which value). The score is
    ``-mean KL`` in nats: 0 for an exact match, more negative for a worse layer. Best
    suited to layers whose outputs act like logits (classifier heads, attention scores).
    """

    name = "kl"

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, y_float: torch.Tensor, y_quant: torch.Tensor) -> None:
        rows = y_float.shape[0] if y_float.dim() >= 2 else 1
        p_log = torch.log_softmax(y_float.double().reshape(rows, -1), dim=1)
        q_log = torch.log_softmax(y_quant.double().reshape(rows, -1), dim=1)
        kl = torch.sum(p_log.exp() * (p_log - q_log), dim=1)
        self.total += float(kl.clamp_min(0).sum())
        self.count += rows

    def score(self) -> float:
        return -self.total / self.count if self.count else 0.0
