"""Benchmark: wall time of a search whose evaluation takes a fixed time, on 1, 2 and 4 workers.

The model is a stack of `--layers` Linear layers; the evaluator is the exact synthetic
metric of `autoquant.search.testing` plus a fixed cost per ``evaluate()``: a sleep (an
evaluation that waits on I/O or a GPU) or a torch computation (CPU-bound; on this 2-core
machine four computing workers share two cores, so expect no gain past 2). For each engine
(a Dask ``LocalCluster`` of W single-threaded worker processes, and ``workers=W`` local
processes) and each width W it prints:

- rounds: strategy steps (the float baseline included); the ideal wall time is
  rounds × the evaluation time (every plan of a round evaluated at once);
- the search's wall time (``result.timings["search"]``, worker start-up included for the
  local pool, which the search starts; the Dask cluster is started before);
- the speed-up over W = 1 and over the ideal;
- start-up: the wall time until the float baseline came back, less one evaluation (the
  workers start, import torch and load the model; the local pool's processes are spawned
  by the search, a Dask cluster's workers are already running);
- the overhead per trial after that: (time from the first to the last result − the
  remaining rounds × the evaluation time) / the remaining evaluations (target: <= 5% of
  a 1-second evaluation);
- whether the chosen plan equals the in-process search's.

Usage::

    python benchmarks/parallel.py                        # sleep 1 s, 31 layers, W = 1, 2, 4
    python benchmarks/parallel.py --mode compute --seconds 0.5 --widths 1 2
    python benchmarks/parallel.py --device cuda          # on a GPU machine: each worker's
                                                         # device is printed (cuda:K)
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

import autoquant as aq
from autoquant.search.testing import SyntheticEvaluator, linear_stack, ranking_from_drops
from autoquant.strategies.binary import BinarySearchStrategy

__all__ = ["FixedCostEvaluator", "CountingBinary", "main"]


class FixedCostEvaluator(SyntheticEvaluator):
    """The synthetic metric after `seconds` of sleep (``mode="sleep"``) or of torch matmuls
    (``mode="compute"``), on the model's device."""

    def __init__(self, drops: dict[str, float], seconds: float, mode: str) -> None:
        super().__init__(drops)
        self.seconds, self.mode = seconds, mode

    def evaluate(self, model: Any) -> float:
        end = time.perf_counter() + self.seconds
        if self.mode == "sleep":
            time.sleep(self.seconds)
        else:
            device = next(model.parameters()).device
            x = torch.randn(192, 192, device=device)
            while time.perf_counter() < end:
                x = torch.tanh(x @ x)
        return super().evaluate(model)


class CountingBinary(BinarySearchStrategy):
    """The binary search, counting the strategy steps that asked for plans."""

    def setup(self, context: Any) -> None:
        super().setup(context)
        self.rounds = 0

    def ask(self) -> list:
        plans = super().ask()
        self.rounds += bool(plans)
        return plans


def run(args: argparse.Namespace, executor: Any, workers: int
        ) -> tuple[Any, int, float, list[float]]:
    """One search: (result, rounds with the baseline, search wall seconds, the times
    (``time.perf_counter``) at which each trial's result came back)."""
    n = args.layers
    drops = {str(i): ((7 * i) % n + 1) / 1024 for i in range(n)}
    strategy = CountingBinary()
    model = linear_stack(n).to(args.device)
    returned: list[float] = []

    def progress(stage: str, event: str, **info: Any) -> None:
        if stage == "search" and event == "trial":
            returned.append(time.perf_counter())

    result = aq.auto_quantize(
        model, FixedCostEvaluator(drops, args.seconds, args.mode), max_loss=n * 1.5 / 1024,
        ranking=ranking_from_drops(drops), strategy=strategy, executor=executor,
        workers=workers, progress=progress)
    return result, strategy.rounds + 1, result.timings["search"], returned


def report(label: str, width: int, result: Any, rounds: int, wall: float, base: float,
           reference: Any, seconds: float, returned: list[float]) -> None:
    ideal = rounds * seconds
    trials = result.num_evaluations
    span = returned[-1] - returned[0]
    startup = wall - span - seconds
    overhead = (span - (rounds - 1) * seconds) / max(1, trials - 1)
    devices = sorted(set(result.checks.get("parallel", {}).get("workers", {}).values())) \
        or ["this process"]
    print(f"{label:>6} {width:>2} | {rounds:>6} {trials:>5} | {ideal:7.2f}s {wall:7.2f}s | "
          f"{base / wall:5.2f}x {ideal / wall:6.0%} | {startup:6.2f}s | "
          f"{overhead * 1000:7.1f} ms "
          f"({overhead / seconds:5.1%}) | {'yes' if result.plan == reference.plan else 'NO'} "
          f"| {', '.join(devices)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=31)
    parser.add_argument("--seconds", type=float, default=1.0, help="cost of one evaluation")
    parser.add_argument("--mode", choices=["sleep", "compute"], default="sleep")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--engines", nargs="+", default=["dask", "local"],
                        choices=["dask", "local"])
    parser.add_argument("--device", default="cpu", help="the searched model's device")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from distributed import Client, LocalCluster

    reference, rounds, base, returned = run(args, None, 1)
    print(f"{args.layers} layers, {args.mode} {args.seconds:g}s per evaluation, "
          f"{torch.get_num_threads()} torch threads in this process, device {args.device}")
    print(f"{'engine':>6} {'W':>2} | {'rounds':>6} {'evals':>5} | {'ideal':>8} {'wall':>8} | "
          f"{'vs W=1':>6} {'ideal':>6} | start-up | overhead per trial   | same plan | "
          "devices")
    report("inproc", 1, reference, rounds, base, base, reference, args.seconds, returned)
    for engine in args.engines:
        for width in args.widths:
            if engine == "dask":
                with LocalCluster(n_workers=width, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=logging.ERROR) as c, \
                        Client(c) as client:
                    result, rounds, wall, returned = run(args, client, 1)
            else:
                result, rounds, wall, returned = run(args, "local", width)
            report(engine, width, result, rounds, wall, base, reference, args.seconds,
                   returned)


if __name__ == "__main__":
    main()
