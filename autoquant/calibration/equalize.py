"""Per-layer input smoothing: SmoothQuant's migration for any ``nn.Linear``, whatever feeds it.

A few input channels of a transformer's Linear layers carry outliers (the LayerNorm outputs
of BERT-style encoders, the GELU outputs the FFN down-projection reads) and force a coarse
per-tensor activation scale. Smoothing multiplies the layer's input channel ``j`` by
``1 / s_j`` and the weight's column ``j`` by ``s_j``, with
``s_j = max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)`` (normalized to a geometric mean
of 1): the float function is unchanged, the activation range flattens and the weight,
quantized per output channel, absorbs the outliers.

Unlike the LayerNorm fold (`autoquant.calibration.smoothing`, exact only where a LayerNorm
feeds nothing but Linear layers, which a post-LN encoder's residual breaks), the scales live
in the wrapper (`QuantLayer.set_input_scale`): the exported graph computes the same product
with one elementwise Mul ahead of the QuantizeLinear that onnxruntime fuses into QGemm, so
what is searched is what is deployed. A layer that falls back to float runs unsmoothed.

``smoothing: auto`` scores, per layer, no smoothing and every strength of `STRENGTHS` by the
SQNR of the layer's output against its float output over all calibration batches (at most
`SCORE_ROWS` strided rows of each): the input
quantized with the min-max range of the scaled input (known exactly from per-channel minima
and maxima), the weight at the layer's scheme in the deploy target's range. Ties keep no
smoothing, so the choice is never locally worse than none. Two passes over
``Evaluator.calibration`` run before the observers calibrate (statistics, then scores); a
fixed strength needs only the first, and none for a layer with per-tensor min-max ranges:
its statistics are taken during the observer pass (`ObserverPassSmoothing`), which then
sets the observer's range to that of the scaled input. None calls ``evaluate``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoquant.calibration.smoothing import smoothing_scales as fold_scales
from autoquant.plan import parse_scheme
from autoquant.quant.integer import runs_torch_forward
from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.qmath import compute_qparams, fake_quantize, qrange
from autoquant.quant.qmodel import Calibrate, QuantModel
from autoquant.quant.quantizer import weight_qparams
from autoquant.quant.target import deploy_weight_bits
from autoquant.sensitivity.metrics import SQNR

__all__ = ["STRENGTHS", "SCORE_ROWS", "strided_rows", "smoothing_scales", "smooth_layers",
           "smoothing_overrides", "ObserverPassSmoothing"]

logger = logging.getLogger(__name__)

STRENGTHS: tuple[float, ...] = (0.5, 0.65, 0.75, 0.85, 0.95)
# Candidates are scored on at most this many rows (tokens, samples) of each calibration
# batch, evenly strided: the scoring then costs about one float pass of the layer whatever
# the batch size, while the statistics and ranges still see every value.
SCORE_ROWS = 256


def strided_rows(*tensors: torch.Tensor, rows_of_x: bool) -> tuple[torch.Tensor, ...]:
    """At most `SCORE_ROWS` evenly strided rows of each of `tensors` (a layer's input and,
    often, its output): rows of the last axis (a Linear: every token is a row) when
    `rows_of_x`, else samples (axis 0). The stride comes from the first tensor."""
    if rows_of_x:
        tensors = tuple(t.reshape(-1, t.shape[-1]) for t in tensors)
    stride = -(-tensors[0].shape[0] // SCORE_ROWS)
    return tuple(t[::stride] for t in tensors) if stride > 1 else tensors


def _in_observer_pass(layer: QuantLayer) -> bool:
    """A fixed strength on a per-tensor min-max input range: the observer pass can take the
    statistics, since that range of the scaled input follows from them exactly."""
    act = layer.config.activation
    return layer.config.smoothing != "auto" and act.algorithm == "minmax" \
        and not act.per_channel


def _smoothable(layer: QuantLayer) -> bool:
    """A static, plain ``nn.Linear`` wrapper (its own forward, one weight)."""
    from autoquant.quant.kinds.base import MultiQuantLayer

    return (not isinstance(layer, MultiQuantLayer) and isinstance(layer.module, nn.Linear)
            and runs_torch_forward(layer.module) and layer.config.mode == "static")


def smoothing_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """The per-input-channel ``s`` of strength `alpha`: the LayerNorm fold's formula
    (`autoquant.calibration.smoothing.smoothing_scales`), bounded to [1e-4, 1e4] and
    normalized to a geometric mean of 1, float32."""
    s = fold_scales(act_max, [weight], alpha).float().clamp(1e-4, 1e4)
    return s / s.log().mean().exp()


class _Stats:
    """Per-input-channel minimum and maximum of a layer's float input."""

    def __init__(self) -> None:
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        low, high = x.amin(dim=0), x.amax(dim=0)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)


class _Scorer:
    """The output SQNR of each candidate strength (None = no smoothing) on one layer."""

    def __init__(self, layer: QuantLayer, stats: _Stats) -> None:
        assert stats.low is not None and stats.high is not None
        bits = parse_scheme(layer.config.scheme)
        assert bits is not None
        w_bits = deploy_weight_bits(bits[0], layer.config.weight.symmetric, layer.target)
        act = layer.config.activation
        weight = layer.module.weight.detach().float()
        amax = torch.maximum(stats.low.abs(), stats.high.abs())
        self.candidates: dict[float | None, tuple] = {}
        for alpha in (None, *STRENGTHS):
            s = torch.ones_like(amax) if alpha is None else smoothing_scales(amax, weight, alpha)
            inv = s.reciprocal()
            scale, zp = compute_qparams((stats.low * inv).min(), (stats.high * inv).max(),
                                        act.bits, act.symmetric)
            w_s = weight * s
            ws, wz, wmin, wmax, axis = weight_qparams(w_s, w_bits, layer.config.weight,
                                                        layer.weight_axis)
            self.candidates[alpha] = (inv, (scale, zp, *qrange(act.bits, act.symmetric)),
                                      fake_quantize(w_s, ws, wz, wmin, wmax, axis))
        self.scores = {alpha: SQNR() for alpha in self.candidates}

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(
                output, torch.Tensor):
            return
        x, y = strided_rows(args[0].detach().float(), output.detach().float(), rows_of_x=True)
        bias = module.module.bias
        for alpha, (inv, (scale, zp, qmin, qmax), weight_q) in self.candidates.items():
            x_q = fake_quantize(x * inv, scale, zp, qmin, qmax)
            self.scores[alpha].update(y, F.linear(x_q, weight_q, None if bias is None
                                                  else bias.detach().float()))

    def best(self) -> float | None:
        """The strength with the best SQNR; ties (and a NaN) keep no smoothing."""
        ranked = [(self.scores[a].score(), -i, a) for i, a in enumerate(self.candidates)]
        if any(math.isnan(r[0]) for r in ranked):
            return None
        return max(ranked)[2]


def smooth_layers(qmodel: QuantModel, calibrate: Calibrate) -> None:
    """Choose and set the input smoothing of every layer whose config asks for it.

    Runs before `QuantModel.calibrate`, so the observers see the smoothed inputs. A layer
    that cannot be smoothed (not a static plain Linear) is logged and left as is.
    """
    wanted = {n: layer for n, layer in qmodel.layers.items()
              if layer.config.smoothing is not None}
    if not wanted:
        return
    skipped = [n for n, layer in wanted.items() if not _smoothable(layer)]
    if skipped:
        logger.info("smoothing applies to static nn.Linear layers only; not smoothed: %s",
                    ", ".join(skipped))
    wanted = {n: layer for n, layer in wanted.items()
              if n not in skipped and not _in_observer_pass(layer)}
    if not wanted:
        return
    stats = {n: _Stats() for n in wanted}
    handles = [wanted[n].register_forward_hook(hook) for n, hook in stats.items()]
    qmodel.calibration_pass(calibrate, QuantState.FLOAT, "(smoothing statistics pass)", handles)
    seen = {n: s for n, s in stats.items() if s.low is not None}
    scorers = {n: _Scorer(wanted[n], seen[n]) for n in seen
               if wanted[n].config.smoothing == "auto"}
    if scorers:
        handles = [wanted[n].register_forward_hook(hook) for n, hook in scorers.items()]
        qmodel.calibration_pass(calibrate, QuantState.FLOAT, "(smoothing choice pass)", handles)
    for name, stat in seen.items():
        layer = wanted[name]
        scorer = scorers.get(name)
        if scorer is not None:  # its candidates hold the scales already
            alpha = scorer.best()
            inv = scorer.candidates[alpha][0]
            layer.smoothing_scores = {str(a): s.score() for a, s in scorer.scores.items()}
        else:
            alpha = float(layer.config.smoothing)
            inv = _fixed_scales(layer, stat, alpha)
        layer.smoothing_alpha = alpha
        layer.set_input_scale(None if alpha is None else inv)
    _log_chosen([wanted[n] for n in seen])


def _fixed_scales(layer: QuantLayer, stat: _Stats, alpha: float) -> torch.Tensor:
    """``1 / s`` of strength `alpha` from the layer's input statistics."""
    assert stat.low is not None and stat.high is not None
    amax = torch.maximum(stat.low.abs(), stat.high.abs())
    return smoothing_scales(amax, layer.module.weight, alpha).reciprocal()


def _log_chosen(layers: list[QuantLayer]) -> None:
    if layers:
        chosen = [getattr(layer, "smoothing_alpha", None) for layer in layers]
        logger.info("input smoothing: %s",
                    {str(a): chosen.count(a) for a in dict.fromkeys(chosen)})


class ObserverPassSmoothing:
    """Fixed-strength smoothing of layers with per-tensor min-max input ranges, measured in
    the observer pass: `hooks` collect each layer's per-channel input extremes while its
    observer runs (on the unsmoothed input, which the float model computes either way),
    `finish` sets the scales and replaces the observer's range by the scaled input's
    (``min_j(low_j / s_j)``, ``max_j(high_j / s_j)``: exact, as ``s > 0``)."""

    def __init__(self, qmodel: QuantModel) -> None:
        self.layers = {n: layer for n, layer in qmodel.layers.items()
                       if layer.config.smoothing is not None and _smoothable(layer)
                       and _in_observer_pass(layer)}
        self.stats = {n: _Stats() for n in self.layers}

    def hooks(self) -> list[Any]:
        """Register the statistics hooks; the caller removes the handles after the pass."""
        return [self.layers[n].register_forward_hook(hook) for n, hook in self.stats.items()]

    def finish(self) -> None:
        """Set the scales and the observers' ranges of every layer the pass reached."""
        seen = [n for n, stat in self.stats.items() if stat.low is not None]
        for name in seen:
            layer, stat = self.layers[name], self.stats[name]
            alpha = float(layer.config.smoothing)
            inv = _fixed_scales(layer, stat, alpha)
            layer.smoothing_alpha = alpha
            layer.set_input_scale(inv)
            assert stat.low is not None and stat.high is not None
            layer.observer.set_range((stat.low * inv).min(), (stat.high * inv).max())
        _log_chosen([self.layers[n] for n in seen])


def smoothing_overrides(qmodel: QuantModel) -> dict[str, dict[str, Any]]:
    """Per-layer overrides that pin each ``smoothing: auto`` layer's chosen strength (null
    for none), so re-applying the final config reproduces the choice without scoring."""
    return {name: {"smoothing": layer.smoothing_alpha}
            for name, layer in qmodel.layers.items()
            if layer.config.smoothing == "auto" and hasattr(layer, "smoothing_alpha")}
