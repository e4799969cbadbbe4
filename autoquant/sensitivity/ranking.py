"""Per-layer sensitivity: how far each layer's quantized output is from its float output.

One pass over the calibration batches with every layer in ``COMPARE`` state: each layer
computes its float and fake-quantized outputs on the same float input and feeds them to an
accumulator, so memory holds one layer's outputs at a time. Layers are ranked worst first.

Metrics are plug-ins: subclass `SensitivityMetric` and register it by name
(`register_sensitivity`), or expose it in the ``autoquant.sensitivity`` entry-point group.
"""

from __future__ import annotations

import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from autoquant.errors import ConfigError
from autoquant.quant.layers import QuantState
from autoquant.quant.qmodel import Calibrate, QuantModel
from autoquant.registry import Registry

__all__ = [
    "spearman",
    "average_ranks",
    "SensitivityMetric",
    "CosineSimilarity",
    "LayerSensitivity",
    "SENSITIVITY_METRICS",
    "register_sensitivity",
    "compute_sensitivity",
    "resolve_metric",
    "metric_name",
    "ranked",
    "NONFINITE_SCORE",
]

logger = logging.getLogger(__name__)

NONFINITE_SCORE = -1e30  # below every metric's range: a layer whose quantized output broke


class SensitivityMetric(ABC):
    """Accumulates a similarity score of a layer's quantized vs float output.

    Contract: `update` is called once per layer call with detached tensors of equal shape
    (`y_quant` is the metric's to consume: it may be overwritten in place, which keeps the
    pass's peak memory near a float forward pass);
    `score` returns a float where **higher means less sensitive** (closer to float), so the
    ranking sorts ascending. Instances are created fresh per layer and per run.
    """

    name: str = ""

    @abstractmethod
    def update(self, y_float: torch.Tensor, y_quant: torch.Tensor) -> None:
        """Fold one call's outputs into the running score."""

    @abstractmethod
    def score(self) -> float:
        """The accumulated score (higher = closer to float)."""


class CosineSimilarity(SensitivityMetric):
    """Mean over calls of the cosine similarity of the flattened outputs, in [-1, 1]."""

    name = "cosine"

    def __init__(self) -> None:
        self.norms: list[torch.Tensor] = []

    def update(self, y_float: torch.Tensor, y_quant: torch.Tensor) -> None:
        # Three float32 norms instead of float64 copies: cos = (|a|^2 + |b|^2 - |a-b|^2)
        # / (2|a||b|) keeps the precision of 1 - cos, which is what the ranking compares.
        # They stay on the device until `score`, so a GPU pass never waits on a sync.
        a, b = y_float.reshape(-1).float(), y_quant.reshape(-1).float()
        na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
        nd = torch.linalg.vector_norm(b.sub_(a))  # in place: y_quant is ours to consume
        self.add_norms(na, nb, nd)

    def add_norms(self, na: torch.Tensor, nb: torch.Tensor, nd: torch.Tensor) -> None:
        """Fold one call given ``|y_float|``, ``|y_quant|`` and ``|y_quant - y_float|``
        (0-d float32 tensors), for a pass that computes the difference itself."""
        self.norms.append(torch.stack([na, nb, nd]))

    def score(self) -> float:
        if not self.norms:
            return 1.0
        total = 0.0
        for na, nb, nd in torch.stack(self.norms).double().cpu().tolist():
            if na == 0 and nb == 0:
                cos = 1.0  # both all-zero: identical
            elif na == 0 or nb == 0:
                cos = 0.0
            else:
                cos = max(-1.0, min(1.0, (na * na + nb * nb - nd * nd) / (2.0 * na * nb)))
            total += cos
        return total / len(self.norms)


SENSITIVITY_METRICS: Registry[type[SensitivityMetric]] = Registry(
    "sensitivity metric",
    {
        "cosine": "autoquant.sensitivity.ranking:CosineSimilarity",
        "mse": "autoquant.sensitivity.metrics:SQNRMetric",
        "kl": "autoquant.sensitivity.metrics:KLMetric",
    },
    entry_point_group="autoquant.sensitivity",
    aliases={"CosineSimilarity": "cosine", "sqnr": "mse"},
)


def register_sensitivity(name: str, metric: type[SensitivityMetric]) -> None:
    """Register a sensitivity metric class under `name`."""
    SENSITIVITY_METRICS.register(name, metric)


@dataclass(frozen=True)
class LayerSensitivity:
    """One row of the ranking: a layer, its score and its rank (0 = most sensitive).

    `aliases` are the other qualified names of a shared module (one unit, one scheme);
    `scope` is where the score was measured (``"layer"``, ``"gradient"``, ``"output"``,
    ``"subset"``); `local` is the layer-scope cosine of the layer's own output, measured in
    the same pass when the score was measured elsewhere (a second opinion; None if not).
    """

    name: str
    score: float
    rank: int
    calls: int
    aliases: tuple[str, ...] = ()
    scope: str = "layer"
    local: float | None = None

    def __post_init__(self) -> None:
        # rows read back from JSON carry a list; keep rows comparable and hashable
        object.__setattr__(self, "aliases", tuple(self.aliases))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form."""
        return asdict(self)


def _file_name(layer: str) -> str:
    """`layer` as one safe path component: separators, ``..`` and leading dots escaped (a
    top-level layer named ``/etc`` must not write outside the dump folder)."""
    name = re.sub(r"[^A-Za-z0-9._-]", lambda m: f"%{ord(m.group()):02X}", layer)
    return name if name.strip(".") and not name.startswith(".") else f"%2E{name}"


def compute_sensitivity(
    qmodel: QuantModel,
    calibrate: Calibrate,
    metric: str | type[SensitivityMetric] = "cosine",
    dump_dir: str | Path | None = None,
) -> list[LayerSensitivity]:
    """Score every searchable layer at its configured scheme; return them worst first.

    Runs the calibration batches (`calibrate`) once more with layers in ``COMPARE`` state.
    `dump_dir`, if given, receives each layer's input activations, one file per call
    (``<dump_dir>/<layer>/input_00000.pt``, the layer name made a safe file name: a name
    never becomes a path outside `dump_dir`), for inspection.
    """
    metric_cls = resolve_metric(metric)
    names = qmodel.searchable
    qmodel.apply_plan(qmodel.quant_plan())
    for name, layer in qmodel.layers.items():
        layer.calls = 0
        layer.comparator = metric_cls() if name in names else None
        if dump_dir is not None and name in names:
            layer.dump_dir = Path(dump_dir) / _file_name(name)
    start = time.perf_counter()
    try:
        qmodel.calibration_pass(calibrate, QuantState.COMPARE, "(sensitivity pass)")
    finally:
        for layer in qmodel.layers.values():
            layer.dump_dir = None
    rows = []
    for name in names:
        layer = qmodel.layers[name]
        score = layer.comparator.score()
        if layer.nonfinite:  # NaN/inf quantized outputs: most sensitive, whatever the metric
            logger.warning("layer %s: its quantized output has NaN or inf on the calibration "
                           "data (broken ranges or weights); it is ranked most sensitive", name)
            score = NONFINITE_SCORE
        rows.append((score, name, layer.calls))
        layer.comparator = None
        layer.nonfinite = False
    return ranked(qmodel, rows, f"{metric_name(metric_cls)}, layer outputs", start)


def resolve_metric(metric: str | type[SensitivityMetric]) -> type[SensitivityMetric]:
    """The metric class of a registered name (or the class itself).

    Raises:
        ConfigError: `metric` is neither a registered name nor a `SensitivityMetric` class.
    """
    metric_cls = SENSITIVITY_METRICS.resolve(metric) if isinstance(metric, str) else metric
    if not (isinstance(metric_cls, type) and issubclass(metric_cls, SensitivityMetric)):
        raise ConfigError(
            f"sensitivity must be a name or a SensitivityMetric class, got {metric!r}"
        )
    return metric_cls


def metric_name(metric_cls: type[SensitivityMetric]) -> str:
    """The name a metric class is logged and reported under."""
    return metric_cls.name or metric_cls.__name__


def ranked(qmodel: QuantModel, rows: list[tuple[float, str, int]], what: str,
           start: float, scope: str = "layer", local: dict[str, float] | None = None
           ) -> list[LayerSensitivity]:
    """``(score, name, calls)`` rows as the ranking: lowest score (most sensitive) first,
    ties in the model's layer order; logged with `what` and the time since `start`.
    `local`: each layer's layer-scope score from the same pass, if it measured one."""
    names = qmodel.searchable
    rows = sorted(rows, key=lambda r: (r[0], names.index(r[1])))
    logger.info("sensitivity (%s) of %d layers in %.2fs", what, len(rows),
                time.perf_counter() - start)
    aliases = getattr(qmodel, "aliases", {})
    local = local or {}
    return [LayerSensitivity(name, score, rank, calls, tuple(aliases.get(name, ())), scope,
                             local.get(name))
            for rank, (score, name, calls) in enumerate(rows)]


def average_ranks(values: Sequence[float]) -> list[float]:
    """Each value's 0-based rank, lowest first; ties share their average rank.

    Example:
        >>> average_ranks([0.3, 0.1, 0.3])
        [1.5, 0.0, 1.5]
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2  # ties share their average rank
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation of `x` and `y` (average ranks for ties).

    None when it is undefined: fewer than two points, or either side constant.

    Example:
        >>> spearman([1, 2, 3], [10, 30, 20])
        0.5
    """
    if len(x) != len(y) or len(x) < 2:
        return None
    rx, ry = average_ranks(list(x)), average_ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)
