"""Benchmark the search strategies: evaluations spent vs layers kept quantized.

Usage::

    python benchmarks/strategies.py                  # digits CNN + a 48-layer MLP
    python benchmarks/strategies.py --models deep --workers 2

For each model the sensitivity ranking is computed once and shared by every strategy, so
the table compares the searches alone. Per strategy it prints: evaluations (the float
baseline included), layers quantized k/N (at any bit width), effective weight/activation
bits (`autoquant.report.build.effective_bits`), the final loss, wall time of the whole
`auto_quantize` call and the part of it spent inside the evaluator.

The deep model is a 48-layer Linear+Tanh MLP with random but fixed (seeded) weights in which
some layers carry an outlier output channel of random size, so the next layer's per-tensor
input activation is hard to quantize: sensitivity varies widely from layer to layer. Its
metric is `autoquant.evaluators.FidelityEvaluator` (cosine similarity of the outputs to the float
model's).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

import autoquant as aq

__all__ = ["deep_mlp", "main", "STRATEGIES"]

STRATEGIES: list[tuple[str, str, dict[str, Any]]] = [
    ("greedy", "greedy", {}),
    ("binary", "binary", {}),
    ("binary+refine", "binary", {"refine": True}),
    ("ladder [16]", "ladder", {"ladder": [16]}),
    ("optuna (30 trials)", "optuna", {"n_trials": 30, "seed": 0}),
]


def deep_mlp(layers: int = 48, width: int = 64, seed: int = 0) -> nn.Sequential:
    """A deep Linear+Tanh MLP with fixed random weights and per-layer outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    modules: list[nn.Module] = []
    for _ in range(layers):
        linear = nn.Linear(width, width)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(width, width, generator=gen) / width ** 0.5)
            linear.bias.copy_(torch.randn(width, generator=gen) * 0.1)
            outlier = float(torch.rand(1, generator=gen)) ** 3 * 40  # mostly small, a few big
            linear.weight[0] *= 1 + outlier
            linear.bias[0] *= 1 + outlier
        modules += [linear, nn.Tanh()] if len(modules) < 2 * layers - 2 else [linear]
    return nn.Sequential(*modules).eval()


def digits_setup() -> tuple[nn.Module, Any, Any, float]:
    from autoquant.evaluators import ClassificationEvaluator
    from examples.digits.model import make_loaders
    from examples.digits.train import get_trained_model

    model = get_trained_model()
    _, val_loader = make_loaders(batch_size=64)
    evaluator = ClassificationEvaluator(val_loader, calibration_batches=4)
    config = {"default": {"weight": {"bits": 2}, "activation": {"bits": 2}}}
    return model, evaluator, config, 0.01


def deep_setup() -> tuple[nn.Module, Any, Any, float]:
    from autoquant.evaluators import FidelityEvaluator

    model = deep_mlp()
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(64, 64, generator=gen) for _ in range(4)]
    return model, FidelityEvaluator(model, inputs), None, 0.002


def bench(name: str, setup: Any, workers: int) -> list[dict[str, Any]]:
    model, evaluator, config, max_loss = setup()
    ranking = aq.sensitivity_analysis(model, evaluator, config=config)
    rows = []
    runs = list(STRATEGIES)
    if workers > 1:
        runs.append((f"binary workers={workers}", "binary", {}))
    for label, strategy, options in runs:
        start = time.perf_counter()
        result = aq.auto_quantize(
            model, evaluator, max_loss=max_loss, strategy=strategy, strategy_options=options,
            config=config, ranking=ranking, workers=workers if "workers" in label else 1,
        )
        wall = time.perf_counter() - start
        n = len(result.layers)
        bits = result.effective_bits
        rows.append({
            "model": name, "strategy": label, "evaluations": result.num_evaluations,
            "quantized": f"{len(result.quantized_layers)}/{n}",
            "bits": f"{bits['weights']:.2f}/{bits['activations']:.2f}",
            "loss": f"{result.loss:.5f}" if result.loss is not None else "n/a",
            "status": result.status, "wall": f"{wall:.2f}",
            "evaluator": f"{result.timings['evaluator']:.2f}",
        })
    return rows


def audit_metrics(name: str, setup: Any, count: int = 10) -> list[str]:
    """Spearman's rho of each sensitivity metric's ranking against measured drops."""
    model, evaluator, config, max_loss = setup()
    lines = []
    for metric in ("cosine", "mse", "kl"):
        result = aq.auto_quantize(model, evaluator, max_loss=max_loss, config=config,
                                  sensitivity=metric, audit=count)
        audit = result.checks["audit"]
        rho = audit["spearman_rho"]
        lines.append(f"| {name} | {metric} | {len(audit['layers'])} | "
                     f"{'n/a' if rho is None else f'{rho:.3f}'} | "
                     f"{len(result.quantized_layers)}/{len(result.layers)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "deep"],
                        choices=["digits", "deep"])
    parser.add_argument("--workers", type=int, default=1,
                        help="also run binary with this many workers (default: 1 = skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in this process (default: 1, stable timings)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setups = {"digits": ("digits CNN (w2a2, max_loss 0.01)", digits_setup),
              "deep": ("deep MLP, 48 layers (w8a8, max_loss 0.002)", deep_setup)}
    rows = []
    for key in args.models:
        title, setup = setups[key]
        rows += bench(title, setup, args.workers)
    header = ["model", "strategy", "evaluations", "quantized", "bits", "loss", "status",
              "wall", "evaluator"]
    titles = ["model", "strategy", "evals", "quantized k/N", "eff. bits W/A", "final loss",
              "status", "wall s", "evaluator s"]
    print("| " + " | ".join(titles) + " |")
    print("|" + "---|" * len(titles))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    print()
    print("| model | sensitivity | layers audited | Spearman rho | binary quantized k/N |")
    print("|---|---|---|---|---|")
    for key in args.models:
        title, setup = setups[key]
        for line in audit_metrics(title, setup):
            print(line)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    main()
