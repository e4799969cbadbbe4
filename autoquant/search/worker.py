"""What runs inside an evaluation worker: the task function every executor is sent.

The driver (`autoquant.search.parallel`) submits `run_trial(task, bundle)` to any
`concurrent.futures` executor: a local process pool, a Dask cluster, a thread pool. A
worker rebuilds the calibrated model and the evaluator from the *bundle* once, keeps them
under the bundle's token, and from then on receives only plans (small dicts). A task sent
without the bundle to a worker that lacks it answers ``need`` and the driver sends it again
with the bundle, so a worker that joins late (or replaces a dead one) still gets it once.

`run_trial` never raises for a fault in the user's code: it returns an `Outcome` whose
``kind`` says what happened, so the driver can tell a failing evaluation (an error naming
the trial) from a lost worker (an exception from the engine, re-queued once).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from autoquant.errors import EvaluatorTimeoutError
from autoquant.evaluation.adapter import EvaluatorAdapter, call_user
from autoquant.evaluation.guard import run_with_timeout

__all__ = ["Task", "Outcome", "pack", "run_trial", "init_local_worker", "worker_device"]

logger = logging.getLogger(__name__)

OutcomeKind = Literal["ok", "ready", "need", "setup", "error", "timeout"]

_BUNDLES: dict[str, bytes] = {}  # this process's latest bundle (one search at a time)
_BUNDLES_LOCK = threading.Lock()
_LIVE = threading.local()  # per thread: token -> (QuantModel, evaluator, device)
_SLOT: dict[str, int | None] = {"index": None}  # this local pool worker's index


@dataclass(frozen=True)
class Task:
    """One evaluation: which bundle, which plan, the timeout and where it is reported
    (``warm_up``: only load the bundle, as sent to every worker at the start)."""

    token: str
    plan: dict[str, str]
    timeout: float | None
    device_type: str
    where: str
    warm_up: bool = False


@dataclass(frozen=True)
class Outcome:
    """What a worker did with a `Task` (``value`` and ``seconds`` when ``kind == "ok"``)."""

    kind: OutcomeKind
    worker: str
    value: Any = None
    seconds: float = 0.0
    device: str = ""
    message: str = ""


def pack(qmodel: Any, payload: tuple[str, Any]) -> bytes:
    """The bundle a worker needs: the calibrated `QuantModel` (``torch.save``) and the
    evaluator payload (`EvaluatorAdapter.payload`), as one bytes object."""
    buffer = io.BytesIO()
    torch.save(qmodel, buffer)
    return pickle.dumps((buffer.getvalue(), payload), protocol=pickle.HIGHEST_PROTOCOL)


def init_local_worker(index: int, threads: int) -> None:
    """Set up a local pool worker: its torch threads and its index (worker K owns
    ``cuda:K`` where GPUs exist)."""
    torch.set_num_threads(threads)
    _SLOT["index"] = index


def worker_device(device_type: str) -> torch.device:
    """The device this worker evaluates on, for a searched model on `device_type`.

    ``AUTOQUANT_DEVICE`` in the worker's environment wins. A CUDA model goes to
    ``cuda:K`` (K = this local worker's index modulo the GPUs it sees; the current device
    under an engine that gives each worker its own GPU, e.g. dask-cuda); a model on the
    CPU stays there, so results match a search on one machine.
    """
    chosen = os.environ.get("AUTOQUANT_DEVICE")
    if chosen:
        return torch.device(chosen)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        slot = _SLOT["index"]
        index = torch.cuda.current_device() if slot is None else slot % \
            torch.cuda.device_count()
        return torch.device("cuda", index)
    return torch.device(device_type)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _live(task: Task, bundle: bytes | None) -> tuple[Any, Any, torch.device] | None:
    """This thread's model and evaluator for `task.token`, built from the bundle once."""
    cache = getattr(_LIVE, "state", None)
    if cache is not None and cache[0] == task.token:
        return cache[1]
    with _BUNDLES_LOCK:
        if bundle is not None and task.token not in _BUNDLES:
            _BUNDLES.clear()  # a new search: drop the previous one's model
            _BUNDLES[task.token] = bundle
        data = _BUNDLES.get(task.token)
    if data is None:
        return None
    model_bytes, payload = pickle.loads(data)
    qmodel = torch.load(io.BytesIO(model_bytes), map_location="cpu", weights_only=False)
    device = worker_device(task.device_type)
    qmodel.model.to(device)
    evaluator = EvaluatorAdapter.from_payload(payload)
    _LIVE.state = (task.token, (qmodel, evaluator, device))
    return qmodel, evaluator, device


def run_trial(task: Task, bundle: bytes | None = None) -> Outcome:
    """Evaluate `task.plan` with this worker's copy of the model (see the module docstring)."""
    name = _worker_name()
    try:
        live = _live(task, bundle)
    except Exception as err:  # an unimportable class, a missing package, a bad device
        return Outcome("setup", name, message=(
            f"worker {name} cannot rebuild the model and the evaluator: "
            f"{type(err).__name__}: {err}"))
    if live is None:
        return Outcome("need", name)
    qmodel, evaluator, device = live
    if task.warm_up:
        return Outcome("ready", name, device=str(device))
    qmodel.apply_plan(task.plan)
    what = f"{type(evaluator).__name__}.evaluate() {task.where} on worker {name}"
    start = time.perf_counter()
    try:
        value = run_with_timeout(
            lambda: call_user(evaluator, "evaluate", qmodel.model, f"{task.where} on worker "
                                                                  f"{name}"),
            task.timeout, what)
    except EvaluatorTimeoutError as err:
        return Outcome("timeout", name, device=str(device), message=str(err))
    except Exception as err:
        return Outcome("error", name, device=str(device), message=str(err))
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()  # a CUDA tensor does not unpickle on a CPU-only driver
    return Outcome("ok", name, value, time.perf_counter() - start, str(device))
