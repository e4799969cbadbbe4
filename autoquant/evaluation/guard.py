"""Guards around the user's evaluation: a timeout on each call and a determinism check.

Each turns a fault that would otherwise hang or silently corrupt a result into an
`autoquant.errors` exception that names the problem and the fix (or, for a
non-deterministic evaluator, a warning plus a record in the result).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from autoquant.errors import EvaluatorTimeoutError

__all__ = [
    "run_with_timeout",
    "determinism_record",
    "same_score",
    "abandoned_evaluations",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# evaluation threads given up on after their timeout; the CLI must not let the interpreter
# finalize under them (a thread still inside torch's C++ code then aborts the process)
_ABANDONED: list[threading.Thread] = []
_ABANDONED_LOCK = threading.Lock()


def abandoned_evaluations() -> int:
    """How many evaluations abandoned after their ``eval_timeout`` are still running.

    A process that exits normally while one is running can abort in the interpreter's
    shutdown (``terminate called without an active exception``) when the thread is inside
    torch's C++ code; ``autoquant`` (the CLI) checks this and exits with ``os._exit``.
    """
    with _ABANDONED_LOCK:
        _ABANDONED[:] = [t for t in _ABANDONED if t.is_alive()]
        return len(_ABANDONED)


def run_with_timeout(func: Callable[[], T], timeout: float | None, what: str) -> T:
    """Call `func()`; if it has not returned after `timeout` seconds, raise.

    With ``timeout=None`` `func` runs in the calling thread, exactly as without a guard.
    Otherwise it runs in a daemon worker thread that the calling thread waits for. Python
    cannot stop a thread, so on timeout the worker is *abandoned*, not killed: it keeps
    running until `func` returns on its own (its result is discarded, and a daemon thread
    never keeps the process alive). The caller gets `EvaluatorTimeoutError` at once, so a
    search stops with a clear error, and the journal keeps every evaluation finished before.
    Thread-local torch state of the caller (autocast, inference_mode, the current CUDA
    device) does not carry into the worker; `func` must set what it needs.

    Args:
        func: the call to guard (e.g. one ``Evaluator.evaluate``).
        timeout: seconds, or None for no limit.
        what: names the call in the error, e.g. ``"MyEvaluator.evaluate() in trial 3"``.

    Raises:
        EvaluatorTimeoutError: `func` ran longer than `timeout`.
        BaseException: whatever `func` raised, re-raised in the calling thread.
    """
    if timeout is None:
        return func()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = func()
        except BaseException as err:  # handed to the waiting thread, re-raised there
            box["error"] = err

    worker = threading.Thread(target=target, name=f"autoquant-eval: {what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        with _ABANDONED_LOCK:
            _ABANDONED.append(worker)
        logger.error("%s is still running after %.3gs; abandoning it", what, timeout)
        raise EvaluatorTimeoutError(
            f"{what} did not finish within eval_timeout={timeout:g}s. The search stopped; "
            "every evaluation finished before is kept (with the CLI: in the journal, so "
            "`autoquant run JOB --resume` continues from there). Raise eval_timeout, make the "
            "evaluation faster (fewer batches), or set eval_timeout=None for no limit. The "
            "abandoned evaluation runs on in a background thread until it returns."
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def same_score(first: float, second: float) -> bool:
    """Two evaluations of one model agree: `math.isclose` with ``rel_tol=1e-9,
    abs_tol=1e-12``, so only float rounding is forgiven (the determinism and resume
    checks)."""
    return math.isclose(first, second, rel_tol=1e-9, abs_tol=1e-12)


def determinism_record(first: float, second: float, seconds: float,
                       max_loss: float | None = None) -> dict[str, Any]:
    """Compare two evaluations of the float model; warn if they differ.

    Equal means `same_score` (float rounding only).

    Returns:
        ``{"checked", "deterministic", "first", "second", "difference",
        "extra_evaluations", "seconds"}``, stored as ``SearchResult.determinism`` and in
        ``report.json``.
    """
    difference = abs(second - first)
    deterministic = same_score(first, second)
    if not deterministic:
        scale = "" if max_loss is None else f" (max_loss is {max_loss:g})"
        logger.warning(
            "the evaluator is not deterministic: the float model scored %.9g, then %.9g "
            "(difference %.3g%s). Pass/fail decisions closer than that are noise; fix the "
            "evaluator's data order, dropout or sampling (seed it), or raise max_loss.",
            first, second, difference, scale,
        )
    return {"checked": True, "deterministic": deterministic, "first": first,
            "second": second, "difference": difference, "extra_evaluations": 1,
            "seconds": seconds}


