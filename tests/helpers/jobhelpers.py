"""A tiny model and evaluator for batch-job and CLI tests (imported by job files).

`TinyEvaluator` appends one JSON line per `evaluate` call to `log` (the plan it saw, read
from the model's wrapped layers), so tests count evaluations across processes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from autoquant.evaluators import Evaluator

__all__ = ["build_model", "build_renamed_model", "TinyEvaluator", "make_inputs", "plan_of",
           "read_log", "without_resume_check"]

WIDTH = 16


def build_model(seed: int = 0, depth: int = 4) -> nn.Sequential:
    """An MLP of `depth` Linear layers (8 -> 16 ... -> 4), deterministic for `seed`."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    sizes = [8] + [WIDTH] * (depth - 1) + [4]
    for i in range(depth):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) / sizes[i] ** 0.5)
            # Layer i gets one outlier weight of size i: later layers quantize worse.
            linear.weight[0, 0] = float(i)
            linear.bias.zero_()
        layers += [linear, nn.ReLU()] if i < depth - 1 else [linear]
    return nn.Sequential(*layers).eval()


def build_renamed_model(seed: int = 0, depth: int = 4, first: str = "cost$\\foo$"
                        ) -> nn.Sequential:
    """`build_model` with its first layer registered as `first` (``add_module``), e.g. a
    name holding matplotlib mathtext or HTML; the same weights, so `TinyEvaluator` fits."""
    model = build_model(seed, depth)
    renamed = nn.Sequential()
    for i, (name, module) in enumerate(model.named_children()):
        renamed.add_module(first if i == 0 else name, module)
    return renamed.eval()


def make_inputs(batch: int = 2) -> tuple[torch.Tensor]:
    """Example inputs for `build_model` (an example_inputs factory)."""
    return (torch.ones(batch, 8),)


def plan_of(model: nn.Module) -> dict[str, str]:
    """``{layer: scheme}`` of the wrapped layers of `model` (the plan it is evaluated at)."""
    from autoquant.quant.layers import QuantLayer

    return {name: m.scheme for name, m in model.named_modules() if isinstance(m, QuantLayer)}


class TinyEvaluator(Evaluator):
    """Metric: 1 - relative L2 error of the outputs against the float model's (float = 1).

    Args:
        seed: the seed `build_model` was called with (rebuilds the reference).
        depth: as for `build_model`.
        log: a file to append one JSON line per evaluate() call to, or None.
        hang_on_call: the evaluate() call (1-based, per evaluator) that never returns, so a
            test can kill the run at a known point; None never hangs.
        spin_on_call: the evaluate() call that computes with torch for `spin_seconds`
            before it returns (a slow evaluation inside torch's C++ code, for the timeout
            tests); None never spins.
        spin_seconds: how long that call computes.
        delay: seconds every evaluate() sleeps first (a slow evaluator, so a benchmark
            can kill a run in the middle of its search).
    """

    def __init__(self, seed: int = 0, depth: int = 4, log: str | None = None,
                 hang_on_call: int | None = None, spin_on_call: int | None = None,
                 spin_seconds: float = 30.0, delay: float = 0.0) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.batches = [torch.randn(32, 8, generator=gen) for _ in range(3)]
        reference = build_model(seed, depth)
        with torch.no_grad():
            self.reference = [reference(x) for x in self.batches]
        self.log = Path(log) if log else None
        self.hang_on_call = hang_on_call
        self.spin_on_call, self.spin_seconds = spin_on_call, spin_seconds
        self.delay = delay
        self.calls = 0

    def calibration(self, model: nn.Module) -> None:
        for x in self.batches:
            model(x)

    def evaluate(self, model: nn.Module) -> float:
        self.calls += 1
        if self.calls == self.hang_on_call:
            time.sleep(600)  # the test kills the process here
        if self.delay:
            time.sleep(self.delay)
        if self.calls == self.spin_on_call:
            end, x = time.monotonic() + self.spin_seconds, torch.randn(256, 256)
            while time.monotonic() < end:
                x = torch.tanh(x @ x)
        with torch.no_grad():
            num = sum(float((model(x) - r).norm())
                      for x, r in zip(self.batches, self.reference, strict=True))
        den = sum(float(r.norm()) for r in self.reference)
        metric = 1.0 - num / den
        if self.log is not None:
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "plan": plan_of(model),
                                         "metric": metric}) + "\n")
                handle.flush()
        return metric


def read_log(path: str | Path) -> list[dict]:
    """The entries a `TinyEvaluator` appended to `path` (``pid``, ``plan``, ``metric``)."""
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def without_resume_check(entries: list[dict]) -> list[dict]:
    """The log `entries` of a resumed run less its first evaluation of the all-float plan.

    A resume scores the float model once more to check that the evaluator still agrees
    with the journal (outside the trial budget, not a trial); that check is not a repeated
    evaluation. A run without it loses nothing here: no float evaluation, nothing dropped.
    """
    out = list(entries)
    for i, entry in enumerate(out):
        if all(scheme == "float" for scheme in entry["plan"].values()):
            del out[i]
            break
    return out
