"""Calibration quality: the per-layer automatic choice of the activation calibration, bias
correction, and the order in which they run with smoothing and the observers.

`calibrate_model` is what the public API calls instead of `QuantModel.calibrate`. Passes over
``Evaluator.calibration`` (each one forward pass per calibration batch, no evaluation):

1. smoothing statistics (only with ``smoothing_alpha`` set): per-input-channel max |x| of
   the Linear layers a LayerNorm feeds (`autoquant.calibration.smoothing`);
1b. per-layer input smoothing (only for layers with ``smoothing`` set): input statistics,
   then (for ``auto``) the choice of strength (`autoquant.calibration.equalize`);
2. the observer pass (always): activation statistics, collected once per run;
3. the refinement pass (only for ``bias_correction`` on a layer other than a plain
   ``nn.Linear``, or an ``auto`` layer whose rows pass 2 could not keep): every layer sees
   its float input; for each ``auto`` layer every candidate calibration quantizes that
   input (at most ``SCORE_ROWS`` strided rows of each batch; and the weight, at the layer's
   scheme) and the output SQNR against the float output is accumulated; for bias
   correction the mean output shift of the quantized weight is accumulated per output
   channel.

An ``auto`` layer called with one tensor keeps those strided input rows during pass 2 (at
most `KEPT_VALUES` values, thinned evenly beyond), and its choice scores them after the
pass, its float output recomputed from them: the same rows, no pass of its own. The first
`KEPT_LAYERS` such layers do (memory stays bounded in the model's size); any other scores
in pass 3.

A Linear layer's output is linear in its input, so its mean shift is exactly
``(W - W_q) @ mean(x)``: pass 2 also sums each such layer's input per channel, and its bias
correction needs no pass of its own (a Linear-only model with ``bias_correction``,
fixed-strength ``smoothing`` and min-max ranges calibrates in pass 2 alone).

The sensitivity pass then runs as before, on the chosen calibration, so the ranking and the
search see exactly what the final model computes. None of this calls ``evaluate``: zero full
evaluations.

Why SQNR for the choice: it is the local output MSE in decibels, so it punishes both
rounding noise (too wide a range) and clipping (too narrow), and unlike cosine it also sees
a scale error. The choice is among fixed `CANDIDATES` and ties keep the earlier (min-max
first), so ``auto`` is never locally worse than min-max on the calibration data.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from autoquant.calibration.equalize import (
    ObserverPassSmoothing,
    smooth_layers,
    smoothing_overrides,
    strided_rows,
)
from autoquant.plan import FLOAT, parse_scheme
from autoquant.quant.integer import runs_torch_forward
from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.qmodel import Calibrate, QuantModel
from autoquant.quant.quantizer import fake_quantize
from autoquant.sensitivity.metrics import SQNR

__all__ = [
    "CANDIDATES",
    "KEPT_LAYERS",
    "KEPT_VALUES",
    "SQNR",
    "calibrate_model",
    "refine_calibration",
    "calibration_overrides",
    "calibration_rows",
    "candidate_label",
]

logger = logging.getLogger(__name__)

# (algorithm, percentile) tried by "auto", min-max first (ties keep it).
CANDIDATES: tuple[tuple[str, float], ...] = (
    ("minmax", 100.0),
    ("percentile", 99.9),
    ("percentile", 99.99),
    ("percentile", 99.999),
    ("mse", 100.0),
    ("entropy", 100.0),
)

_BIAS_KINDS = (nn.Linear, nn.modules.conv._ConvNd)
# the input values an ``auto`` layer keeps from the observer pass for its choice (4 MiB in
# float32): beyond it the kept rows are thinned evenly, every other one
KEPT_VALUES = 1 << 20
KEPT_LAYERS = 64  # auto layers that keep rows: at most 256 MiB of them in float32


def candidate_label(algorithm: str, percentile: float) -> str:
    """A short name of a calibration, e.g. ``"minmax"`` or ``"percentile:99.9"``."""
    return f"percentile:{percentile:g}" if algorithm == "percentile" else algorithm


def calibrate_model(qmodel: QuantModel, calibrate: Calibrate) -> None:
    """Smooth (if configured), calibrate the observers once, then refine (if configured).

    See the module docstring for the passes. Leaves every layer at scheme float in state
    QUANTIZE, as `QuantModel.calibrate` does.
    """
    alpha = qmodel.config.smoothing_alpha
    if alpha is not None:
        from autoquant.calibration.smoothing import smooth_model

        smooth_model(qmodel, calibrate, alpha)
    smooth_layers(qmodel, calibrate)
    deferred = ObserverPassSmoothing(qmodel)
    means = {name: _InputMean() for name in qmodel.searchable
             if _mean_corrected(qmodel.layers[name], qmodel.config.bias_correction)}
    auto = [n for n in qmodel.searchable
            if _refinable(qmodel.layers[n]) and _auto_choice(qmodel.layers[n])]
    stores = {name: _RowStore(isinstance(qmodel.layers[name].module, nn.Linear))
              for name in auto[:KEPT_LAYERS]}
    handles = [qmodel.layers[n].register_forward_pre_hook(m) for n, m in means.items()]
    handles += [qmodel.layers[n].register_forward_hook(store, with_kwargs=True)
                for n, store in stores.items()]
    handles += deferred.hooks()
    qmodel.calibrate(calibrate, handles)  # removed before its watched pass, if it runs one
    deferred.finish()
    kept = {name: store.parts for name, store in stores.items() if store.parts}
    refine_calibration(qmodel, calibrate, means, kept)


class _RowStore:
    """Forward hook keeping an ``auto`` layer's scored input rows during the observer pass
    (`strided_rows` of each call, copied), so that its choice needs no pass of its own.
    Gives up (``parts`` None) on a call it could not replay: extra arguments, a non-tensor
    input or output, or one row over `KEPT_VALUES` values."""

    def __init__(self, rows_of_x: bool) -> None:
        self.rows_of_x = rows_of_x
        self.parts: list[torch.Tensor] | None = []
        self.step = 1  # keep every step-th strided row: doubles each time the store fills

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.parts is None:
            return
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or \
                not args[0].is_floating_point() or not isinstance(output, torch.Tensor):
            self.parts = None
            return
        (rows,) = strided_rows(args[0].detach(), rows_of_x=self.rows_of_x)
        self.parts.append(rows[::self.step].clone())
        while sum(p.numel() for p in self.parts) > KEPT_VALUES:
            if all(p.shape[0] < 2 for p in self.parts):
                self.parts = None
                return
            self.parts = [p[::2] for p in self.parts]
            self.step *= 2


class _InputMean:
    """Forward pre-hook summing a Linear layer's input per channel (over every row)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.rows = 0

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or \
                not args[0].is_floating_point() or args[0].dim() == 0:
            return
        flat = args[0].detach().reshape(-1, args[0].shape[-1])
        total = flat.sum(dim=0).double()
        self.total = total if self.total is None else self.total + total
        self.rows += flat.shape[0]


def _mean_corrected(layer: QuantLayer, bias_on: bool) -> bool:
    """A layer whose bias correction comes from its input mean: a plain, refinable
    ``nn.Linear`` with bias correction on (its activation calibration plays no part)."""
    return bias_on and _refinable(layer) and isinstance(layer.module, nn.Linear) \
        and runs_torch_forward(layer.module)


def _auto_choice(layer: QuantLayer) -> bool:
    # only a static layer has calibrated activation ranges to choose from (dynamic
    # ranges come from each batch, weight-only layers and embeddings have none)
    return layer.config.activation.algorithm == "auto" and layer.config.mode == "static"


def _quantized_weights(layer: QuantLayer) -> dict[str, torch.Tensor]:
    """The layer's fake-quantized effective weight at each of its quantized schemes."""
    weight = layer.effective_weight().detach()
    out = {}
    for scheme in sorted({layer.config.scheme, layer.config.fallback_scheme} - {FLOAT}):
        wb = parse_scheme(scheme)
        assert wb is not None
        scale, zp, qmin, qmax, axis = layer.weight_qparams(wb[0])
        out[scheme] = fake_quantize(weight, scale, zp, qmin, qmax, axis)
    return out


def _mean_corrections(layer: QuantLayer, mean: _InputMean) -> dict[str, torch.Tensor]:
    """``(W - W_q) @ mean(x)`` per quantized scheme, ``x`` the (smoothed) input: what the
    refinement pass would measure for a Linear layer, without the pass."""
    if mean.total is None or not mean.rows:
        return {}
    x_mean = mean.total / mean.rows
    if layer.input_inv.numel():
        x_mean = x_mean * layer.input_inv.double()
    weight = layer.effective_weight().detach()
    return {scheme: ((weight.double() - weight_q.double()) @ x_mean).to(weight.dtype)
            for scheme, weight_q in _quantized_weights(layer).items()}


def _output_dim(module: nn.Module, out: torch.Tensor) -> int:
    return out.dim() - 1 if isinstance(module, nn.Linear) else 1


class _LayerRefiner:
    """What the refinement pass accumulates for one layer."""

    def __init__(self, layer: QuantLayer, auto: bool, bias: bool) -> None:
        self.layer = layer
        bits = parse_scheme(layer.config.scheme)
        assert bits is not None
        w_bits, a_bits = bits
        self.candidates: dict[tuple[str, float], tuple] = {}
        self.scores: dict[tuple[str, float], SQNR] = {}
        if auto:
            for cand in CANDIDATES:
                self.candidates[cand] = layer.observer.qparams_for(a_bits, *cand)
                self.scores[cand] = SQNR()
        self.weights: dict[str, torch.Tensor] = _quantized_weights(layer) if bias else {}
        self.shift_sum: dict[str, torch.Tensor] = {}
        self.shift_count: dict[str, int] = dict.fromkeys(self.weights, 0)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(
                output, torch.Tensor) or not args[0].is_floating_point():
            return
        layer = self.layer
        x, rest = layer.scale_input(args[0].detach()), args[1:]
        y = output.detach()
        if self.candidates:
            xs, ys = x, y
            if not rest and not kwargs:  # score on strided rows: bounded cost per batch
                xs, ys = strided_rows(x, y, rows_of_x=isinstance(layer.module, nn.Linear))
            self.score(xs, ys, rest, kwargs)
        for scheme, weight_q in self.weights.items():
            diff = y - layer._run_module(x, weight_q, rest, kwargs)
            dim = _output_dim(layer.module, diff)
            # float32 sums over every axis but the channel's, accumulated in float64: a
            # float64 copy of the whole output (and its transpose) cost more than the op
            total = diff.float().sum(dim=[d for d in range(diff.dim()) if d != dim]).double()
            prev = self.shift_sum.get(scheme)
            self.shift_sum[scheme] = total if prev is None else prev + total
            self.shift_count[scheme] += diff.numel() // diff.shape[dim]

    def score(self, x: torch.Tensor, y: torch.Tensor, rest: tuple = (),
              kwargs: dict | None = None) -> None:
        """Fold the candidates' output SQNR on input `x` (scaled) and float output `y`."""
        weight_q = self.layer.quantized_weight()
        for cand, (scale, zp, qmin, qmax, axis) in self.candidates.items():
            x_q = fake_quantize(x, scale, zp, qmin, qmax, axis)
            self.scores[cand].update(y, self.layer._run_module(x_q, weight_q, rest,
                                                                kwargs or {}))

    def replay(self, parts: list[torch.Tensor]) -> None:
        """Score the rows the observer pass kept (`_RowStore`), one part per call, their
        float output recomputed by the layer (the caller puts it in state FLOAT)."""
        for raw in parts:
            self.score(self.layer.scale_input(raw), self.layer(raw))

    def finish(self) -> None:
        layer = self.layer
        if self.scores:
            ranked = [(self.scores[c].score(), -i, c) for i, c in enumerate(CANDIDATES)]
            if not math.isnan(max(r[0] for r in ranked)):
                best = max(ranked)[2]
                layer.observer.set_choice(*best)
                layer.calibration_scores = {
                    candidate_label(*c): self.scores[c].score() for c in CANDIDATES}
                logger.debug("%s: activation calibration %s (%s)", layer.layer_name,
                             candidate_label(*best), layer.calibration_scores)
        if not self.weights:  # no bias pass: any correction came from the input mean
            return
        corrections = {}
        for scheme, total in self.shift_sum.items():
            count = self.shift_count[scheme]
            if count:
                delta = (total / count).to(layer.module.weight.dtype)
                corrections[scheme] = delta.to(layer.module.weight.device)
        layer.bias_corrections = corrections


def _refinable(layer: QuantLayer) -> bool:
    """Single-weight wrappers with a weight tensor and one observer (Linear, Conv and
    friends). Multi-weight kinds (RNNs, attention) keep their configured algorithms."""
    from autoquant.quant.kinds.base import MultiQuantLayer

    return not isinstance(layer, MultiQuantLayer) and isinstance(
        getattr(layer.module, "weight", None), torch.Tensor)


def refine_calibration(qmodel: QuantModel, calibrate: Calibrate,
                       input_means: dict[str, _InputMean] | None = None,
                       kept_rows: dict[str, list[torch.Tensor]] | None = None) -> None:
    """Choose each ``auto`` layer's calibration and measure bias corrections, in one pass.

    No pass when no layer uses ``auto`` and ``bias_correction`` is off, or when every
    bias-corrected layer is a Linear whose input mean `input_means` holds and every
    ``auto`` layer has its scored input rows in `kept_rows` (both gathered during the
    observer pass). Needs the observers calibrated (`QuantModel.calibrate`).
    """
    bias_on = qmodel.config.bias_correction
    input_means, kept_rows = input_means or {}, kept_rows or {}
    direct: dict[str, _InputMean] = {}
    wanted = {}
    for name in qmodel.searchable:
        layer = qmodel.layers[name]
        if not _refinable(layer):
            continue
        layer.bias_corrections = {}
        layer.bias_delta = torch.empty(0, device=layer.module.weight.device)
        auto = _auto_choice(layer)
        bias = bias_on and isinstance(layer.module, _BIAS_KINDS) and name not in input_means
        if name in input_means:  # a plain Linear, bias-corrected from its input mean
            direct[name] = input_means[name]
        if auto or bias:
            wanted[name] = (auto, bias)
    if not wanted and not direct:
        return
    qmodel.apply_plan(qmodel.quant_plan())  # weight qparams of every layer's own scheme
    for name, mean in direct.items():
        qmodel.layers[name].bias_corrections = _mean_corrections(qmodel.layers[name], mean)
    refiners = {n: _LayerRefiner(qmodel.layers[n], *flags) for n, flags in wanted.items()}
    replayed = {n for n, (_, bias) in wanted.items() if not bias and n in kept_rows}
    with qmodel.state(QuantState.FLOAT), torch.no_grad():
        for name in replayed:
            refiners[name].replay(kept_rows[name])
    handles = [qmodel.layers[name].register_forward_hook(hook, with_kwargs=True)
               for name, hook in refiners.items() if name not in replayed]
    if handles:
        qmodel.calibration_pass(calibrate, QuantState.FLOAT, "(calibration choice pass)",
                                handles)
    for refiner in refiners.values():
        refiner.finish()
    chosen = [candidate_label(*qmodel.layers[n].observer.effective_algorithm())
              for n in refiners if qmodel.layers[n].config.activation.algorithm == "auto"]
    if chosen:
        counts = {c: chosen.count(c) for c in dict.fromkeys(chosen)}
        logger.info("automatic activation calibration: %s", counts)
    qmodel.apply_plan(qmodel.float_plan())


def calibration_overrides(qmodel: QuantModel) -> dict[str, dict[str, Any]]:
    """Per-layer config overrides that pin each ``auto`` layer's chosen algorithm (and
    smoothing strength), for the final config (so re-applying it reproduces the choice
    without the choice pass)."""
    out: dict[str, dict[str, Any]] = {}
    for name, layer in qmodel.layers.items():
        if not _refinable(layer) or layer.config.activation.algorithm != "auto" \
                or layer.observer.choice is None:
            continue
        algorithm, percentile = layer.observer.choice
        act: dict[str, Any] = {"algorithm": algorithm}
        if algorithm == "percentile":
            act["percentile"] = percentile
        out[name] = {"activation": act}
    for name, pinned in smoothing_overrides(qmodel).items():
        out.setdefault(name, {}).update(pinned)
    return out


def calibration_rows(
    qmodel: QuantModel, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`rows` (from `QuantModel.layer_rows`) with each wrapped layer's calibration added:
    ``act_calibration``, ``weight_calibration``, ``bias_corrected`` and ``smoothed``."""
    out = []
    for row in rows:
        layer = qmodel.layers.get(row["name"])
        if layer is None or not _refinable(layer):
            out.append(dict(row))
            continue
        mode = layer.config.mode
        out.append({
            **row,
            "act_calibration": (candidate_label(*layer.observer.effective_algorithm())
                                if mode == "static" else
                                "per batch" if mode == "dynamic" else "none"),
            "weight_calibration": layer.config.weight.algorithm,
            "bias_corrected": bool(layer.bias_corrections),
            "smoothed": bool(getattr(layer, "smoothed", False)) or bool(layer.input_inv.numel()),
        })
    return out
