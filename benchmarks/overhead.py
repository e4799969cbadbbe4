"""Benchmark: autoquant's own overhead on a model with 1,000+ quantizable layers.

The evaluator here is nearly free (it reads the plan off the wrapped layers and returns a
metric with a known answer), so what remains is autoquant's bookkeeping: deep-copying and
wrapping the model, calibration and sensitivity passes, and, per trial, applying the plan
to every layer, the cache, the history, the journal (an fsync per trial) and the
``eval_timeout`` watchdog thread. Prints seconds per phase; "search overhead" is the search
loop's wall time minus the time inside ``Evaluator.evaluate``.

Usage::

    python benchmarks/overhead.py [--layers 1024] [--width 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import autoquant as aq  # noqa: E402
from autoquant.evaluators import Evaluator  # noqa: E402
from autoquant.jobs.journal import Journal  # noqa: E402
from autoquant.quant.layers import QuantLayer  # noqa: E402
from autoquant.sensitivity.ranking import LayerSensitivity  # noqa: E402


def deep_mlp(layers: int, width: int) -> nn.Sequential:
    """`layers` Linear(width, width) + ReLU pairs: `layers` quantizable layers."""
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods).eval()


class PlanEvaluator(Evaluator):
    """metric = 1 - 0.2 * (number of the `sensitive` layers that are quantized).

    The binary search then has to find exactly `sensitive` fallback layers among all of
    them (the ranking puts them first), so it runs its full log2(N) trials.
    """

    def __init__(self, width: int, sensitive: set[str]) -> None:
        self.x = torch.randn(4, width)
        self.sensitive = sensitive

    def calibration(self, model: nn.Module) -> None:
        model(self.x)

    def evaluate(self, model: nn.Module) -> float:
        hurt = sum(1 for m in model.modules() if isinstance(m, QuantLayer)
                   and m.scheme != "float" and m.layer_name in self.sensitive)
        return 1.0 - 0.2 * hurt


def one_run(n: int, width: int, journal_dir: Path | None, eval_timeout: float | None):
    model = deep_mlp(n, width)
    names = [str(2 * i) for i in range(n)]
    sensitive = set(names[: n // 3])
    ranking = [LayerSensitivity(name, i / n, i, n) for i, name in enumerate(names)]
    kwargs = {}
    if journal_dir is not None:
        journal = Journal.open(journal_dir, {"model": "m", "quant": "q", "search": "s"},
                               resume=False, overwrite=True)
        kwargs["on_record"] = journal.append_record
    start = time.perf_counter()
    result = aq.auto_quantize(model, PlanEvaluator(width, sensitive), max_loss=0.1,
                              ranking=ranking, eval_timeout=eval_timeout, **kwargs)
    wall = time.perf_counter() - start
    assert result.met and len(result.fallback_layers) == len(sensitive), result.summary()
    t = result.timings
    return {
        "total": wall,
        "setup": wall - t["calibration"] - t["sensitivity"] - t["search"],
        "calibration": t["calibration"],
        "search": t["search"],
        "evaluator": t["evaluator"],
        "overhead": t["search"] - t["evaluator"],
        "trials": result.num_evaluations,
    }


def sensitivity_seconds(n: int, width: int) -> float:
    model = deep_mlp(n, width)
    start = time.perf_counter()
    aq.sensitivity_analysis(model, PlanEvaluator(width, set()))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1024)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"model: {args.layers} x Linear({args.width}, {args.width}); torch "
          f"{torch.__version__}; median of {args.repeat} runs; seconds")
    header = (f"{'variant':<28}{'total':>8}{'setup':>8}{'calib':>8}{'search':>8}"
              f"{'in eval':>9}{'overhead':>9}{'trials':>7}{'per trial':>10}")
    print(header)
    with tempfile.TemporaryDirectory() as folder:
        variants = [("plain", None, None), ("journal (fsync per trial)", Path(folder), None),
                    ("journal + eval_timeout", Path(folder), 60.0)]
        for label, journal_dir, timeout in variants:
            runs = [one_run(args.layers, args.width, journal_dir, timeout)
                    for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{label:<28}{med['total']:>8.2f}{med['setup']:>8.2f}"
                  f"{med['calibration']:>8.2f}{med['search']:>8.2f}{med['evaluator']:>9.3f}"
                  f"{med['overhead']:>9.3f}{int(med['trials']):>7}"
                  f"{med['overhead'] / med['trials']:>10.4f}")
    print(f"sensitivity pass (cosine, not part of the search): "
          f"{sensitivity_seconds(args.layers, args.width):.2f} s")


if __name__ == "__main__":
    main()
