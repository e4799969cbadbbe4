"""Sensitivity at the model's output for about the price of the layer pass
(``scope="gradient"``): each layer's own quantization error, carried to the model's output
through the float model's gradient.

The output scope (`autoquant.sensitivity.output`) quantizes one layer at a time and pays
N + 1 calibration passes. To first order, quantizing layer ``l`` alone moves the model's
output by ``J_l e_l``: ``e_l`` is the error the layer adds to its own output on a float
input (what the layer scope scores) and ``J_l`` the Jacobian of the model's output with
respect to that layer's output. The divergences the metrics measure are quadratic in that
move, and a random probe ``u`` with ``E[u u^T] = M`` estimates ``(J_l e_l)^T M (J_l e_l)``
for every layer at once as ``(u^T J_l e_l)^2 = (g_l . e_l)^2``, where ``g_l`` is the
gradient of ``u . output`` at layer ``l``'s output: one backward pass per calibration call.

- ``mse``: ``u`` standard normal (``M = I``): the squared error at the output; scored as
  the SQNR of the output in dB.
- ``cosine``: ``u`` normal and orthogonal to the float output (``M`` projects out its
  direction): ``1 - cos ~ |P e|^2 / 2|y|^2``; scored as ``1 - sum |P e|^2 / 2 sum |y|^2``
  over the calls (each call's cosine weighted by its output's energy: a call of a few
  rows near zero cannot swamp the estimate, and the score does not depend on how the
  rows were split into calls).
- ``kl``: ``u = onehot(c) - p`` for a class ``c`` drawn from each row's softmax ``p`` (``M``
  is the softmax's Fisher information): ``KL ~ e^T F e / 2``; scored as ``-mean KL``.

Variance: one probe per calibration row. The product ``g_l . e_l`` is summed per slice of
the layer output's first dimension (the batch, for most layers) and squared per slice, so
each row is its own sample and cross terms between rows, zero when rows are independent,
are left out. The probes are seeded: the ranking is reproducible.

Rows: the estimate is a sum over rows, so the pass runs in two stages
(`autoquant.sensitivity.sampling`): a share of each call's leading rows (``fraction``,
0.25 by default, and every row until 32 have run), then the other rows only if the ranking
from the first has not settled: if the estimates from alternate rows rank the layers with
a Spearman rho below ``SETTLED`` (0.9). A model or calibration that refuses a cut batch
is run on every row. On all-MiniLM-L6-v2 the first stage settles (split-half rho 0.95)
on 48 of 128 sentences, at 0.3x the cost of the full pass, with rho 0.96 against the
measured single-layer losses (0.95 on every row).

Cost: the layer pass (float and quantized output of every layer) plus one backward pass
with respect to the layers' outputs only (no weight gradients). Memory: one forward graph
and one error tensor per layer call of one calibration call. The weights are frozen for the
pass and the first layer outputs without a graph become its roots, so a Linear or Conv
saves no input for a weight gradient (on a Linear/GELU/Tanh MLP, 0.58x the saved bytes of
a graph that starts at the weights). The model must be
differentiable from its quantizable layers to its output; the calibration may run under
``torch.no_grad`` (the pass turns gradients on around each model call), not under
``torch.inference_mode``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from autoquant.batches import first_tensor, primary_tensor, row_slice
from autoquant.errors import ConfigError
from autoquant.quant.layers import QuantState
from autoquant.quant.qmodel import Calibrate, QuantModel
from autoquant.quant.wrapping import DIRECT_KINDS
from autoquant.sensitivity.metrics import MAX_SQNR_DB
from autoquant.sensitivity.ranking import (
    NONFINITE_SCORE,
    CosineSimilarity,
    LayerSensitivity,
    SensitivityMetric,
    metric_name,
    ranked,
    resolve_metric,
    spearman,
)
from autoquant.sensitivity.sampling import RowShare, row_draws

__all__ = ["GRADIENT_METRICS", "NoGradient", "compute_gradient_sensitivity"]

GRADIENT_METRICS = ("cosine", "mse", "kl")
logger = logging.getLogger(__name__)
# the split-half Spearman rho at which the rows run so far have settled the ranking
SETTLED = 0.9
_SEED = 0


class NoGradient(ConfigError):
    """The model gives no gradient from its quantizable layers to its output (or the
    calibration forbids autograd): the gradient scope cannot rank it."""


class _Error:
    """A layer's comparator in the pass: keeps the last call's output error for the forward
    hook, which pairs it with the output that carries the graph, and folds the layer-scope
    cosine of the same outputs (the ranking's second opinion, three norms a call)."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.local = CosineSimilarity()

    def update(self, y_float: torch.Tensor, y_quant: torch.Tensor) -> None:
        wide = torch.promote_types(y_float.dtype, torch.float32)  # no copy of a half output

        def norm(t: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vector_norm(t, dtype=wide).float()

        na, nb = norm(y_float), norm(y_quant)
        self.pending = y_quant.sub_(y_float)  # y_quant is ours to consume
        self.local.add_norms(na, nb, norm(self.pending))


def _slice_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The dot product of `a` and `b` per slice of their first dimension (a 0-d or 1-d
    tensor is one slice), in float32: one batched BLAS dot, no product tensor (3x faster
    than summing ``a * b``, to about 1e-4 of the slice's dot: far below the probe's noise)."""
    rows = a.shape[0] if a.dim() >= 2 else 1
    return torch.bmm(a.reshape(rows, 1, -1).float(), b.reshape(rows, -1, 1).float()
                     ).reshape(rows).double()


@dataclass
class _Pass:
    """Forward hooks of one gradient pass (hooks must not raise: the adapter would report
    the error as the user's calibration failing; the first error is raised after)."""

    metric: str
    # parameters frozen: each layer output that carries no graph becomes a root of one, so
    # that the forward saves no layer inputs for weight gradients it never computes
    frozen: bool = True
    unrooted: set[str] = field(default_factory=set)  # outputs that could not become roots
    estimate: dict[str, float] = field(default_factory=dict)
    # (layer, the gradient edge of its output as the layer returned it, its error): the
    # edge, not the tensor, so that an in-place op after the layer (ReLU(inplace=True))
    # cannot turn the gradient into that of the modified tensor
    pairs: list[tuple[str, GradientEdge, torch.Tensor]] = field(default_factory=list)
    grad_modes: list[bool] = field(default_factory=list)
    calls: int = 0  # model calls with a graph from a layer to the output
    rows: int = 0
    share: RowShare = field(default_factory=lambda: RowShare(1.0))  # the rows it runs
    skipping: list[bool] = field(default_factory=list)
    set_float: Any = None  # set_float(True) runs the layers float for a call it skips
    # each layer's estimate from alternate rows: their agreement says whether the ranking
    # has settled (`settled`)
    halves: dict[str, list[float]] = field(default_factory=dict)
    # layer calls in model calls that stage 1 had run already (a call counts once)
    fresh: bool = True
    repeats: dict[str, int] = field(default_factory=dict)
    signal: float = 0.0
    generator: torch.Generator | None = None
    error: Exception | None = None

    def before_model(self, _module: Any, args: tuple, kwargs: dict) -> Any:
        if torch.is_inference_mode_enabled() and self.error is None:
            self.error = NoGradient(
                "sensitivity_scope='gradient' needs autograd, but the calibration runs the "
                "model under torch.inference_mode(); use torch.no_grad() there (the pass "
                "turns gradients on itself) or sensitivity_scope='output'")
        self.grad_modes.append(torch.is_grad_enabled())
        span = self.share.span((args, kwargs))
        skip = span is not None and span[1] >= span[2]
        self.skipping.append(skip)
        if skip:  # no row of this call in this stage: it runs float, no twins or graph
            self.set_float(True)
            return None
        torch.set_grad_enabled(True)
        self.pairs = []
        self.fresh = span is None or self.share.stage == 1 or span[1] == 0
        if span is None or (span[1] == 0 and span[2] == span[0]):
            return None
        return row_slice((args, kwargs), *span)

    def after_layer(self, name: str, layer: Any, output: Any) -> torch.Tensor | None:
        """Pair the layer's error with its output's gradient edge; returns the output made
        a graph root (a copy that requires grad) when the parameters are frozen and the
        output carries no graph yet, else None (the output stays as it is)."""
        if not self.fresh:
            self.repeats[name] = self.repeats.get(name, 0) + 1
        error, layer.comparator.pending = layer.comparator.pending, None
        if error is None:
            return None
        try:
            y = primary_tensor(output)
        except Exception:  # an output the layer pass cannot compare either
            return None
        root = None
        if self.frozen and not y.requires_grad and y.is_floating_point():
            if not isinstance(output, torch.Tensor):  # inside a structure: run unfrozen
                self.unrooted.add(name)
                return None
            # a copy, not the leaf itself: an in-place op after the layer must not modify
            # a leaf that requires grad
            root = y = output.detach().requires_grad_(True).clone()
        if y.requires_grad and y.shape == error.shape:
            self.pairs.append((name, get_gradient_edge(y), error))
        return root

    def after_model(self, _module: Any, _args: tuple, _kwargs: dict, output: Any) -> None:
        if self.skipping.pop() if self.skipping else False:
            self.set_float(False)
            self.grad_modes.pop()
            return
        try:
            self._backward(first_tensor(output))
        except Exception as err:  # raised after the pass
            self.error = self.error or NoGradient(
                f"sensitivity_scope='gradient' could not take the gradient of the model's "
                f"output ({type(err).__name__}: {str(err)[:200]}); use "
                "sensitivity_scope='output' or 'layer'")
            self.error.__cause__ = err
        finally:
            self.pairs = []  # this call's graph and errors
            torch.set_grad_enabled(self.grad_modes.pop() if self.grad_modes else False)

    def _draws(self, y: torch.Tensor, rows: int, uniform: bool) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=y.device)
        return row_draws(self.generator, _SEED, self.share.origin, y, rows, uniform)

    def _probe(self, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The probe direction and the weight of this call's squared products."""
        y = out.detach().float()
        rows = y.shape[0] if y.dim() >= 2 else 1
        flat = y.reshape(rows, -1)
        if self.metric == "kl":
            p = torch.softmax(flat.double(), dim=1)
            cdf = torch.cumsum(p, dim=1)
            drawn = torch.searchsorted(cdf, self._draws(y, rows, True).double() * cdf[:, -1:])
            drawn = drawn.clamp_(max=p.shape[1] - 1)
            u = -p
            u.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=p.dtype))
            self.rows += rows
            return u.reshape(y.shape).to(out.dtype), 0.5
        u = self._draws(y, rows, False).reshape(rows, -1)
        norm = float(torch.linalg.vector_norm(flat))
        self.signal += norm * norm
        if self.metric == "mse":
            return u.reshape(y.shape).to(out.dtype), 1.0
        # orthogonal to the call's whole output (a row of one value has no direction of
        # its own to leave out)
        if norm > 0:
            unit, u = flat.reshape(-1) / norm, u.reshape(-1)
            u = u - torch.dot(u, unit) * unit
        return u.reshape(y.shape).to(out.dtype), 0.5

    def _backward(self, out: torch.Tensor) -> None:
        if not self.pairs or not out.requires_grad or not out.is_floating_point():
            return
        u, weight = self._probe(out)
        self.calls += 1
        grads = torch.autograd.grad(out, [edge for _, edge, _ in self.pairs], grad_outputs=u,
                                    allow_unused=True)
        for (name, _, error), grad in zip(self.pairs, grads, strict=True):
            if grad is None:
                continue
            squares = _slice_dots(grad, error).square_()
            odd = self.calls % 2  # alternate rows: the first of each call swaps halves
            half = float(torch.sum(squares[odd::2]))
            total = float(torch.sum(squares))
            self.estimate[name] += weight * total
            pair = self.halves.setdefault(name, [0.0, 0.0])
            pair[0] += weight * half
            pair[1] += weight * (total - half)

    def settled(self, threshold: float) -> bool:
        """Whether the two halves of the rows rank the layers alike (Spearman's rho at
        least `threshold`; three layers or more): more rows would not reorder them much."""
        pairs = list(self.halves.values())
        if len(pairs) < 3:
            return False
        rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
        logger.debug("gradient sensitivity: split-half rho %s over %d layers", rho, len(pairs))
        return rho is not None and rho >= threshold

    def score(self, name: str) -> float:
        est = self.estimate[name]
        if self.metric == "kl":
            return -est / self.rows if self.rows else 0.0
        if self.metric == "mse":
            if est == 0.0:
                return MAX_SQNR_DB
            if self.signal == 0.0:
                return -MAX_SQNR_DB
            return max(-MAX_SQNR_DB, min(MAX_SQNR_DB, 10.0 * math.log10(self.signal / est)))
        return max(-1.0, 1.0 - est / self.signal) if self.signal > 0 else 1.0


def _new_pass(qmodel: QuantModel, metric: str, frozen: bool, fraction: float) -> _Pass:
    """A pass record, with a fresh comparator on every searchable layer."""
    names = qmodel.searchable
    for layer_name, layer in qmodel.layers.items():
        layer.calls = 0
        layer.comparator = _Error() if layer_name in names else None
        layer.nonfinite = False
    return _Pass(metric=metric, frozen=frozen, estimate=dict.fromkeys(names, 0.0),
                 share=RowShare(fraction), set_float=lambda on: qmodel.set_state(
                     QuantState.FLOAT if on else QuantState.COMPARE))


def _run_stage(qmodel: QuantModel, calibrate: Calibrate, record: _Pass, stage: int) -> None:
    """One stage of a gradient pass over the calibration (`RowShare`); the parameters'
    `requires_grad` is set for it and restored after. Unfrozen, every parameter requires
    grad (the graph starts at the weights). Frozen, only the searchable layers that are not
    Linear or Conv keep it (an Embedding saves its indices alone; an LSTM or attention
    returns a tuple, which cannot be made a root); a Linear or Conv saves no input then."""
    names = qmodel.searchable
    graphed = set() if not record.frozen else {
        id(p) for n in names if type(qmodel.layers[n].module) not in DIRECT_KINDS
        for p in qmodel.layers[n].module.parameters()}
    record.share.start_stage(stage)
    flags = {p: p.requires_grad for p in qmodel.model.parameters()}
    hooks = [qmodel.model.register_forward_pre_hook(record.before_model, with_kwargs=True),
             qmodel.model.register_forward_hook(record.after_model, with_kwargs=True)]
    for layer_name in names:
        hooks.append(qmodel.layers[layer_name].register_forward_hook(
            lambda mod, _a, out, n=layer_name: record.after_layer(n, mod, out)))
    try:
        for param in flags:
            if param.is_floating_point():
                # only activation gradients are taken, never a weight's
                param.requires_grad_(not record.frozen or id(param) in graphed)
        qmodel.calibration_pass(calibrate, QuantState.COMPARE, "(gradient sensitivity pass)",
                                hooks)
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)


def _run_pass(qmodel: QuantModel, calibrate: Calibrate, metric: str, frozen: bool,
              fraction: float = 1.0) -> _Pass:
    """The gradient pass: `fraction` of the rows, then the rest unless the ranking from
    those rows has settled (`SETTLED`); every row when `fraction` is 1."""
    record = _new_pass(qmodel, metric, frozen, fraction)
    _run_stage(qmodel, calibrate, record, 1)
    if record.error is None and record.share.left and not record.settled(SETTLED):
        share = record.share
        logger.info("gradient sensitivity: the ranking from %d of %d calibration rows has "
                    "not settled; running the other rows", share.ran, share.ran + share.left)
        _run_stage(qmodel, calibrate, record, 2)
    return record


def compute_gradient_sensitivity(qmodel: QuantModel, calibrate: Calibrate,
                                 metric: str | type[SensitivityMetric] = "cosine",
                                 fraction: float = 1.0) -> list[LayerSensitivity]:
    """Score every searchable layer by the estimated divergence of the model's output when
    that layer alone is quantized (see the module docstring); worst first.

    Raises:
        ConfigError: a metric other than cosine, mse or kl.
        NoGradient: a calibration under ``torch.inference_mode``, or a model whose output
            carries no gradient from any quantizable layer.
    """
    metric_cls = resolve_metric(metric)
    name = metric_name(metric_cls)
    if name not in GRADIENT_METRICS:
        raise ConfigError(f"sensitivity_scope='gradient' estimates the cosine, mse or kl "
                          f"divergence of the model's output, not {name!r}; use "
                          "sensitivity_scope='output' for another metric")
    start = time.perf_counter()
    names = qmodel.searchable
    qmodel.apply_plan(qmodel.quant_plan())
    try:
        record = _run_pass(qmodel, calibrate, name, True, fraction)
    except Exception as err:
        if fraction >= 1.0:
            raise
        # the model or the calibration refused a cut batch: the pass runs every row
        logger.warning("the gradient sensitivity pass on %.0f%% of the calibration rows "
                       "failed (%s: %.200s); running it on every row", 100 * fraction,
                       type(err).__name__, err)
        fraction = 1.0
        record = _run_pass(qmodel, calibrate, name, True, fraction)
    if record.unrooted and record.error is None:  # outputs inside tuples: graph via weights
        record = _run_pass(qmodel, calibrate, name, False, fraction)
    if record.error is not None:
        raise record.error
    if not record.calls:
        raise NoGradient("sensitivity_scope='gradient' found no gradient from any quantizable "
                          "layer to the model's output (a non-differentiable output such as "
                          "argmax or integer ids, or a model that detaches); use "
                          "sensitivity_scope='output' or 'layer'")
    rows, local = [], {}
    for layer_name in names:
        layer = qmodel.layers[layer_name]
        score = NONFINITE_SCORE if layer.nonfinite else record.score(layer_name)
        layer.calls -= record.repeats.get(layer_name, 0)
        rows.append((score, layer_name, layer.calls))
        cosine = layer.comparator.local.score()
        local[layer_name] = NONFINITE_SCORE if layer.nonfinite or not math.isfinite(cosine) \
            else cosine
        layer.comparator, layer.nonfinite = None, False
    return ranked(qmodel, rows, f"{name}, model output by gradient, 1 pass", start, "gradient",
                  local)
