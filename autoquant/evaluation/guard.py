"""Guards against hostile input and faults: evaluation timeouts, a determinism check of the
evaluator, model devices, foreign output directories and checkpoints that are not state dicts.

Each guard turns a fault that would otherwise hang, crash with an internal traceback, or
silently corrupt a result into an `autoquant.errors` exception that names the problem and
the fix (or, for a non-deterministic evaluator, a warning plus a record in the result).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from autoquant.errors import ConfigError, EvaluatorTimeoutError, ModelError

__all__ = [
    "run_with_timeout",
    "check_timeout_setting",
    "determinism_record",
    "check_model_devices",
    "check_output_dir",
    "load_state_dict_file",
    "lock_output_dir",
    "RUN_ARTIFACTS",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Files `autoquant run` writes into its output directory (besides the journal).
RUN_ARTIFACTS = ("report.json", "quant_config.yaml", "model_state.pt", "job.yaml")


def check_timeout_setting(value: Any, name: str) -> float | None:
    """`value` as seconds > 0, or None (no limit); anything else is a ConfigError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a number of seconds > 0 or None (no limit), "
                          f"got {value!r}")
    return float(value)


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


def determinism_record(first: float, second: float, seconds: float,
                       max_loss: float | None = None) -> dict[str, Any]:
    """Compare two evaluations of the float model; warn if they differ.

    Equal means `math.isclose` with ``rel_tol=1e-9, abs_tol=1e-12`` (float rounding only).

    Returns:
        ``{"checked", "deterministic", "first", "second", "difference",
        "extra_evaluations", "seconds"}``, stored as ``SearchResult.determinism`` and in
        ``report.json``.
    """
    difference = abs(second - first)
    deterministic = math.isclose(first, second, rel_tol=1e-9, abs_tol=1e-12)
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


def check_model_devices(model: Any) -> None:
    """Refuse a model with parameters or buffers on the 'meta' device (they hold no data).

    Parameters on several real devices (model parallelism) are not refused: each layer's
    weight qparams are computed on the weight's device and its activation statistics on
    the device its input arrives on (not yet covered by a test on a multi-device machine).
    """
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers())
            if t.device.type == "meta"]
    if meta:
        shown = ", ".join(meta[:5]) + (" ..." if len(meta) > 5 else "")
        raise ModelError(
            f"{len(meta)} parameter(s)/buffer(s) are on the 'meta' device and hold no values "
            f"({shown}); materialise the model first, e.g. model.to_empty(device='cpu') "
            "then load_state_dict(...), or build it without device='meta'"
        )


def check_output_dir(directory: Path, journal: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory holding another run's results but no journal.

    Without a journal the files cannot be attributed to this job, so writing the new run
    there would silently replace them. ``--overwrite`` allows it explicitly.
    """
    if overwrite or journal.exists() or not directory.is_dir():
        return
    found = [name for name in RUN_ARTIFACTS if (directory / name).exists()]
    if found:
        action = "resume" if resume else "write into"
        raise ConfigError(
            f"{directory} already holds results ({', '.join(found)}) but no journal, so they "
            f"cannot be from this job; refusing to {action} it and overwrite them. Choose "
            "another --output-dir, or pass --overwrite to replace them."
        )


@contextlib.contextmanager
def lock_output_dir(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (created if missing) for a run.

    Two runs writing into one output directory would interleave their journals; the second
    one gets a ConfigError instead. The lock is ``flock`` on the directory itself (no lock
    file is written), released when the block ends or the process dies, even by
    ``kill -9``. Where ``fcntl`` does not exist (Windows) the block runs unlocked.

    Raises:
        ConfigError: another process holds the lock.
        OutputError: the directory cannot be created.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    from autoquant.io.atomic import output_error

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except OSError as err:
        raise output_error(directory, err) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ConfigError(
                f"another autoquant run is writing into {directory} right now; wait for it "
                "to finish, or choose another --output-dir (two runs would mix their "
                "journals)"
            ) from err
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def load_state_dict_file(path: str | Path, what: str) -> Mapping[str, Any]:
    """``torch.load(path, weights_only=True)``, checked to be a state dict.

    Raises:
        ModelError: the file cannot be read safely (e.g. a pickled full model, which could
            run arbitrary code on load), is not a mapping of names to tensors, or is corrupt.
    """
    import pickle

    import torch

    fix = ("save the weights with torch.save(model.state_dict(), path); a pickled full "
           "model is refused because loading it could run arbitrary code")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{what} {str(path)!r} cannot be loaded as a state dict "
                         f"({type(err).__name__}: {first}); {fix}") from err
    if not isinstance(state, Mapping):
        raise ModelError(f"{what} {str(path)!r} holds a {type(state).__name__}, not a state "
                         f"dict (a mapping of parameter names to tensors); {fix}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or
           not (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))]
    if bad:
        nested = [k for k in bad if isinstance(state.get(k), Mapping)]
        hint = (f"; it looks like a training checkpoint: use its {nested[0]!r} entry"
                if nested else "")
        raise ModelError(f"{what} {str(path)!r} is a mapping but not a state dict: entry "
                         f"{bad[0]!r} is not a tensor{hint}; {fix}")
    return state
