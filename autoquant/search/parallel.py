"""Parallel trials: evaluate the independent plans of one `ask()` on an executor.

`auto_quantize(..., workers=N)` runs them in N local processes; ``executor=`` puts them on
any `concurrent.futures.Executor` or a Dask cluster (`autoquant.search.engines`). Both are
this one path: the calibrated `QuantModel` and the evaluator travel to each worker once
(`autoquant.search.worker`), then each trial sends a plan and gets back the raw value and
its wall time. Records are still made by the core, in the asked order, so the history and
the plan chosen do not depend on the engine or on which worker finished first.

The evaluator reaches a worker in one of two ways:

- if it has a method ``worker_spec()`` returning ``("package.module:factory", {kwargs})``,
  each worker builds its own evaluator by calling the factory (use this for evaluators
  that hold open files, GPU handles or data loaders that do not pickle);
- otherwise the evaluator object is pickled.

Local workers are spawned, so the model's and the evaluator's classes must be importable by
module name (define them in a module, or guard the script with
``if __name__ == "__main__":``); a worker that cannot rebuild them is a ConfigError, not a
respawn loop. Faults: a lost worker (a crash, a killed process, a dropped connection)
re-queues its trial once, then is an EvaluatorError naming the trial; ``eval_timeout`` is
enforced inside the worker and, for a worker that stops answering, by the driver.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from autoquant.batches import model_device
from autoquant.errors import ConfigError, EvaluatorError, EvaluatorTimeoutError
from autoquant.evaluation.adapter import EvaluatorAdapter
from autoquant.plan import QuantPlan
from autoquant.quant.qmodel import QuantModel
from autoquant.search.engines import Engine, open_engine
from autoquant.search.worker import Outcome, Task, pack, run_trial

__all__ = ["TrialExecutor", "check_workers", "open_trial_executor"]

logger = logging.getLogger(__name__)

OnResult = Callable[[int, Any, float], None]


def check_workers(workers: Any) -> int:
    """Return `workers` as an int >= 1, or raise ConfigError."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(
            f"workers must be an int >= 1 (1 evaluates in this process), got {workers!r}"
        )
    return workers


class TrialExecutor:
    """Evaluates plans on an `Engine`'s workers (see the module docstring).

    Use as a context manager (or call `close`) so what the search started is stopped.

    Attributes:
        width: how many trials run at once.
        requeued: trials sent again after their worker was lost.
        workers_seen: the workers (``host:pid``) that returned a result, with the device
            each evaluated on.
    """

    def __init__(self, engine: Engine, qmodel: QuantModel, evaluator: EvaluatorAdapter,
                 timeout: float | None) -> None:
        self.engine = engine
        self.width = engine.width
        self.timeout = timeout
        self.requeued = 0
        self.workers_seen: dict[str, str] = {}
        self._token = uuid.uuid4().hex
        self._device_type = model_device(qmodel.model).type
        try:
            bundle = pack(qmodel, evaluator.payload())
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(
                f"evaluating on workers needs the model in every worker, but it cannot be "
                f"saved ({type(err).__name__}: {err}); make the model picklable or use "
                "workers=1") from err
        self._bundle = engine.share(bundle)
        self._holders: set[str] = set()
        self._generation = 0  # bumped when a broken local pool is replaced
        self._warming: list[Any] = []
        self._warm_up()

    def _warm_up(self) -> None:
        """Send every worker the bundle at once, before the first trial: the workers start,
        import torch and load the model in parallel instead of one at its first trial."""
        task = Task(self._token, {}, None, self._device_type, "(warm-up)", warm_up=True)
        try:
            if self.engine.on_each is not None:
                futures = self.engine.on_each(run_trial, task, self._bundle)
            else:
                futures = [self.engine.executor.submit(run_trial, task, self._bundle)
                           for _ in range(self.width)]
        except Exception as err:  # the first trial reports it, naming the trial
            logger.debug("warm-up not sent: %s", err)
            return
        self._warming = futures  # a Dask future let go of is a task cancelled
        for future in futures:
            future.add_done_callback(self._warmed)

    def _warmed(self, future: Future) -> None:
        try:
            outcome = future.result()
        except Exception:  # a lost worker: its trials are re-queued in `evaluate`
            return
        if outcome.kind == "ready":
            self._holders.add(outcome.worker)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, jobs: Sequence[tuple[QuantPlan, str]], on_result: OnResult,
                 deadline: float | None = None) -> None:
        """Evaluate ``(plan, where)`` jobs, at most `width` at a time; ``on_result(i, value,
        seconds)`` as each finishes. No job starts after `deadline` (``time.monotonic``);
        those are left without a result. Raises the first failure (see the module docstring).
        """
        pending = deque(range(len(jobs)))
        running: dict[Future, tuple[int, float, int]] = {}  # -> (job, started, generation)
        tries: dict[int, int] = {}
        with_bundle: set[int] = set()
        try:
            self._loop(jobs, on_result, deadline, pending, running, tries, with_bundle)
        except BaseException:
            if running:  # others still evaluating: a failed search must not wait for them
                for future in running:
                    future.cancel()
                self.engine.abort()
            raise

    def _loop(self, jobs: Sequence[tuple[QuantPlan, str]], on_result: OnResult,
              deadline: float | None, pending: deque[int],
              running: dict[Future, tuple[int, float, int]], tries: dict[int, int],
              with_bundle: set[int]) -> None:
        lost: list[EvaluatorError] = []  # trials that lost their worker twice
        while pending or running:
            self._fill(jobs, pending, running, tries, with_bundle, deadline)
            if not running:
                break
            done, _ = wait(running, timeout=self._wait_limit(running),
                           return_when=FIRST_COMPLETED)
            if not done:
                self._stalled(jobs, running)
            again: list[int] = []
            for future in done:
                i, _started, generation = running.pop(future)
                try:
                    outcome = self._outcome(future, jobs[i][1], tries, i, generation)
                except EvaluatorError as err:  # the others still run: raise at the end
                    lost.append(err)
                    continue
                if outcome is None or outcome.kind == "need":  # lost, or lacks the bundle
                    if outcome is not None:
                        with_bundle.add(i)
                    again.append(i)
                else:
                    on_result(i, *self._accept(outcome, jobs[i][1]))
            pending.extendleft(sorted(again, reverse=True))  # first asked, first sent again
        if lost:
            raise lost[0]

    def _fill(self, jobs: Sequence[tuple[QuantPlan, str]], pending: deque[int],
              running: dict[Future, tuple[int, float, int]], tries: dict[int, int],
              with_bundle: set[int], deadline: float | None) -> None:
        """Submit pending jobs up to the width, none after the deadline. A trial whose
        worker was lost runs alone, so a second loss names the trial that caused it."""
        while pending and len(running) < self.width and \
                (deadline is None or time.monotonic() < deadline):
            i = pending[0]
            alone = any(tries.get(j) for j, _, _ in running.values())
            if alone or (tries.get(i) and running):
                return
            pending.popleft()
            running[self._submit(jobs[i], i in with_bundle)] = \
                (i, time.monotonic(), self._generation)

    def _submit(self, job: tuple[QuantPlan, str], force_bundle: bool) -> Future:
        plan, where = job
        task = Task(self._token, dict(plan), self.timeout, self._device_type, where)
        bundle = self._bundle if force_bundle or len(self._holders) < self.width or \
            not isinstance(self._bundle, bytes) else None  # a scattered bundle costs nothing
        try:
            return self.engine.executor.submit(run_trial, task, bundle)
        except Exception as err:
            raise EvaluatorError(
                f"cannot send the evaluation {where} to the {self.engine.name} executor "
                f"({type(err).__name__}: {err}); every evaluation finished before is in the "
                "journal: restart the cluster and resume the run") from err

    def _wait_limit(self, running: dict[Future, tuple[int, float, int]]) -> float | None:
        """Seconds until the oldest running trial exceeds the driver's backstop."""
        if self.timeout is None:
            return None
        oldest = min(started for _, started, _ in running.values())
        return max(0.0, oldest + self._backstop() - time.monotonic())

    def _backstop(self) -> float:
        # the worker enforces eval_timeout itself; the driver waits longer (rebuilding the
        # model in a fresh worker included) before it gives up on a worker that is stuck
        assert self.timeout is not None
        return 2 * self.timeout + 60

    def _stalled(self, jobs: Sequence[tuple[QuantPlan, str]],
                 running: dict[Future, tuple[int, float, int]]) -> None:
        i, started, _ = min(running.values(), key=lambda v: v[1])
        raise EvaluatorTimeoutError(
            f"the evaluation {jobs[i][1]} sent to a worker gave no answer within "
            f"{time.monotonic() - started:.0f}s (eval_timeout={self.timeout:g}s, and the "
            "worker did not enforce it: it is stuck outside Python). The search stopped; "
            "every evaluation finished before is kept in the journal.")

    def _outcome(self, future: Future, where: str, tries: dict[int, int], i: int,
                 generation: int) -> Outcome | None:
        """The worker's `Outcome`, or None when the worker was lost and the trial re-queued."""
        try:
            return future.result()
        except Exception as err:
            if isinstance(err, BrokenProcessPool) and self.engine.owned_pool and \
                    generation == self._generation:  # a new pool, once per broken one
                self._holders.clear()
                self._generation += 1
                self.engine.rebuild()
            tries[i] = tries.get(i, 0) + 1
            killed = type(err).__name__ == "KilledWorker"  # Dask already retried it
            if tries[i] > 1 or killed:
                how = "more than once (Dask retried it)" if killed else \
                    "twice, the second time running alone"
                died = killed or isinstance(err, BrokenProcessPool)
                fix = ("A trial that kills its worker (out of memory, a crash in native code, "
                       "os._exit) cannot finish on any; fix the evaluator, or evaluate with "
                       "workers=1 to see its own error.") if died else (
                    "The cluster stopped or the connection to it dropped; every evaluation "
                    "finished before is in the journal: restart the cluster and resume.")
                raise EvaluatorError(
                    f"the evaluation {where} lost its worker {how} "
                    f"({type(err).__name__}: {err}). {fix}") from err
            self.requeued += 1
            logger.warning("the worker evaluating %s was lost (%s: %s); sending it again",
                           where, type(err).__name__, err)
            return None

    def _accept(self, outcome: Outcome, where: str) -> tuple[Any, float]:
        if outcome.kind == "setup":
            raise ConfigError(
                f"{outcome.message} (for the evaluation {where}). Define the model's and the "
                "evaluator's classes in an importable module (a spawned or remote worker "
                "imports them by name), give the evaluator worker_spec(), or use workers=1.")
        if outcome.kind == "timeout":
            raise EvaluatorTimeoutError(outcome.message)
        if outcome.kind == "error":
            raise EvaluatorError(outcome.message)
        self._holders.add(outcome.worker)
        self.workers_seen[outcome.worker] = outcome.device
        return outcome.value, outcome.seconds

    def summary(self) -> dict[str, Any]:
        """For the report: the engine, the width, re-queued trials and the workers used."""
        return {"executor": self.engine.name, "width": self.width,
                "requeued": self.requeued, "workers": dict(sorted(self.workers_seen.items()))}

    def close(self) -> None:
        """Stop what the search started (the local pool, a connected Dask client)."""
        self.engine.close()

    def __enter__(self) -> TrialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_trial_executor(qmodel: QuantModel, evaluator: EvaluatorAdapter, executor: Any,
                        workers: int, timeout: float | None) -> TrialExecutor | None:
    """A `TrialExecutor` for ``executor``/``workers``, or None to evaluate in this process."""
    engine = open_engine(executor, check_workers(workers))
    if engine is None:
        return None
    try:
        return TrialExecutor(engine, qmodel, evaluator, timeout)
    except BaseException:
        engine.close()
        raise
