"""Parallel trials: evaluate the independent plans of one `ask()` in worker processes.

`auto_quantize(..., workers=N)` starts N processes with the ``spawn`` start method (safe with
torch and threads on every platform). Each worker receives, once, the calibrated
`QuantModel` (saved with `torch.save` to a private temporary file) and the evaluator, then
evaluates plans it is sent: apply the plan, call ``evaluator.evaluate``, return the raw
value and its wall time. Records are still made by the core, in the asked order, so the
history and the plan chosen are the same as with one worker.

The evaluator reaches a worker in one of two ways:

- if it has a method ``worker_spec()`` returning ``("package.module:factory", {kwargs})``,
  each worker builds its own evaluator by calling the factory (use this for evaluators
  that hold open files, GPU handles or data loaders that do not pickle);
- otherwise the evaluator object is pickled.

Because workers are spawned, the model's and the evaluator's classes must be importable by
module name (define them in a module, or guard the script with
``if __name__ == "__main__":``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from autoquant.errors import ConfigError
from autoquant.evaluation.adapter import EvaluatorAdapter, call_user
from autoquant.plan import QuantPlan
from autoquant.quant.qmodel import QuantModel

__all__ = ["WorkerPool", "check_workers"]

logger = logging.getLogger(__name__)

_STATE: dict[str, Any] = {}  # the worker process's QuantModel and evaluator


def check_workers(workers: Any) -> int:
    """Return `workers` as an int >= 1, or raise ConfigError."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(
            f"workers must be an int >= 1 (1 evaluates in this process), got {workers!r}"
        )
    return workers


def _init_worker(model_file: str, payload: tuple[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    _STATE["qmodel"] = torch.load(model_file, map_location="cpu", weights_only=False)
    _STATE["evaluator"] = EvaluatorAdapter.from_payload(payload)


def _evaluate_in_worker(plan: QuantPlan) -> tuple[Any, float]:
    qmodel: QuantModel = _STATE["qmodel"]
    qmodel.apply_plan(plan)
    start = time.perf_counter()
    value = call_user(_STATE["evaluator"], "evaluate", qmodel.model, "(in a worker)")
    return value, time.perf_counter() - start


class WorkerPool:
    """N spawned processes, each holding the calibrated model and an evaluator.

    Use as a context manager (or call `close`) so the processes and the temporary model
    file are always released.

    Args:
        qmodel: the calibrated `QuantModel` (copied to every worker once).
        evaluator: the search's evaluator adapter; each worker gets the user's evaluator
            pickled or rebuilt from its ``worker_spec()`` (`EvaluatorAdapter.payload`).
        workers: the number of processes (>= 2 to be useful).
    """

    def __init__(self, qmodel: QuantModel, evaluator: EvaluatorAdapter, workers: int) -> None:
        self.workers = check_workers(workers)
        payload = evaluator.payload()
        self._dir = tempfile.TemporaryDirectory(prefix="autoquant-workers-")
        model_file = Path(self._dir.name) / "qmodel.pt"
        try:
            torch.save(qmodel, model_file)
        except Exception as err:
            self._dir.cleanup()
            raise ConfigError(
                f"workers > 1 needs the model in every worker process, but it cannot be "
                f"saved ({type(err).__name__}: {err}); make the model picklable or use "
                "workers=1"
            ) from err
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        context = multiprocessing.get_context("spawn")
        self._pool = context.Pool(
            self.workers, initializer=_init_worker,
            initargs=(str(model_file), payload, threads),
        )
        logger.info("started %d evaluation workers (%d torch threads each)", self.workers,
                    threads)

    def evaluate(self, plans: list[QuantPlan]) -> list[tuple[Any, float]]:
        """Evaluate `plans` concurrently; ``(raw value, seconds)`` per plan, in order."""
        return self._pool.map(_evaluate_in_worker, plans, chunksize=1)

    def close(self) -> None:
        """Stop the workers and delete the temporary model file."""
        self._pool.terminate()
        self._pool.join()
        self._dir.cleanup()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
