"""Evaluators that misbehave inside an evaluation worker (importable by spawned and Dask
workers): one that kills its worker, one that hangs, one that logs when each call starts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from torch import nn

from autoquant.plan import FLOAT
from autoquant.quant.layers import QuantLayer
from autoquant.search.testing import SyntheticEvaluator


def fallbacks(model: nn.Module) -> int:
    """How many quantizable layers of `model` are in float."""
    return sum(isinstance(m, QuantLayer) and m.scheme == FLOAT for m in model.modules())


class WorkerFaultEvaluator(SyntheticEvaluator):
    """A `SyntheticEvaluator` that misbehaves on the plan with `at` float layers.

    Args:
        fault: ``"die"`` (``os._exit`` in the worker), ``"hang"`` (sleep for an hour) or
            None (behave).
        at: the number of float layers of the plan that triggers the fault.
        once: a file; the fault happens only while it does not exist (it is created first),
            so a re-queued trial succeeds. None: every time.
        log: a file to append ``{"start", "end", "fallbacks", "pid"}`` per call to.
        seconds: every call sleeps this long (a slow evaluation).
    """

    def __init__(self, drops, fault: str | None = None, at: int = -1,
                 once: str | None = None, log: str | None = None, seconds: float = 0.0):
        super().__init__(drops)
        self.fault, self.at, self.once = fault, at, once
        self.log, self.seconds = log, seconds

    def evaluate(self, model: nn.Module) -> float:
        start = time.time()
        k = fallbacks(model)
        if self.fault and k == self.at and not self._spent():
            if self.fault == "die":
                os._exit(7)
            time.sleep(3600)
        if self.seconds:
            time.sleep(self.seconds)
        value = super().evaluate(model)
        if self.log:
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"start": start, "end": time.time(), "fallbacks": k,
                                         "pid": os.getpid()}) + "\n")
        return value

    def _spent(self) -> bool:
        if self.once is None:
            return False
        marker = Path(self.once)
        if marker.exists():
            return True
        marker.touch()
        return False


def read_calls(path: str | Path) -> list[dict]:
    """The entries a `WorkerFaultEvaluator` logged."""
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
