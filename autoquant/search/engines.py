"""Where trials run: the executor named by ``SearchSettings.executor`` and ``workers``.

Every engine is reached through the one interface they all speak,
`concurrent.futures.Executor.submit`:

- ``workers=N`` (or ``executor="local"``): N processes on this machine, a
  `concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start method, owned by the
  search (rebuilt if a worker dies, stopped at the end);
- ``executor="dask://HOST:PORT"`` (or ``tcp://``, ``tls://``): a Dask ``distributed``
  scheduler (``pip install "autoquant[distributed]"``); as wide as its worker threads
  unless ``workers`` says otherwise;
- ``executor="ray"`` (the Ray cluster ``ray.init()`` finds, e.g. by ``RAY_ADDRESS``) or
  ``"ray://HOST:PORT"`` (a Ray client address): each trial is a Ray task on one GPU where
  the cluster has GPUs, else on one CPU; as wide as those (``pip install
  "autoquant[ray]"``);
- in Python, a `distributed.Client` (the bundle then travels once per worker with
  ``Client.scatter``), a `RayExecutor`, or any `concurrent.futures.Executor` (loky,
  mpi4py.futures, a Dask ``ClientExecutor``, a thread pool): the user owns it, ``workers``
  says how many trials to run at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from autoquant.errors import ConfigError
from autoquant.search.worker import init_local_worker

__all__ = ["Engine", "RayExecutor", "open_engine", "check_executor", "DASK_SCHEMES"]

logger = logging.getLogger(__name__)

DASK_SCHEMES = ("dask://", "tcp://", "tls://")


def _is_dask_client(value: Any) -> bool:
    return all(callable(getattr(value, a, None)) for a in ("get_executor", "scatter",
                                                           "nthreads"))


def check_executor(value: Any) -> Any:
    """`value` if it names or is an executor (see the module docstring), else ConfigError."""
    if value is None or isinstance(value, Executor) or _is_dask_client(value):
        return value
    if isinstance(value, str) and (value in ("local", "ray") or
                                   value.startswith((*DASK_SCHEMES, "ray://"))):
        return value
    raise ConfigError(
        f"executor must be 'local', a Dask scheduler address ('dask://HOST:PORT'), 'ray' or "
        f"'ray://HOST:PORT', or in Python a concurrent.futures.Executor or a "
        f"distributed.Client, got {value!r:.60}")


class RayExecutor(Executor):
    """A `concurrent.futures.Executor` over Ray: ``submit`` runs the function as a Ray task
    and returns its ``ObjectRef.future()``.

    Args:
        num_cpus, num_gpus: the resources of each task (``num_gpus=1``: Ray gives the task
            one GPU, which the worker then evaluates on).
        options: other ``ray.remote`` options (``max_retries``, ``resources``...).
    """

    def __init__(self, num_cpus: float = 1, num_gpus: float = 0, **options: Any) -> None:
        import ray

        if not ray.is_initialized():
            ray.init()
        self._ray = ray
        self._options = {"num_cpus": num_cpus, "num_gpus": num_gpus, **options}
        self._remote: dict[Any, Any] = {}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(**self._options)(fn)
        return remote.remote(*args, **kwargs).future()

    def put(self, value: Any) -> Any:
        """`value` in Ray's object store, once (a reference a task argument resolves)."""
        return self._ray.put(value)


@dataclass
class Engine:
    """An open executor with its width, how the bundle travels, and how to stop it."""

    executor: Executor
    width: int
    name: str
    owned_pool: bool = False  # a local process pool the search may rebuild and kill
    share: Callable[[bytes], Any] = lambda bundle: bundle
    # submit(fn, *args) once on every worker, when the engine can address them (Dask)
    on_each: Callable[..., list[Any]] | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)
    _pids: Any = None  # the local pool's worker pids (a shared array), to stop them
    _threads: int = 1
    _stopped: bool = False

    def rebuild(self) -> None:
        """Replace a local pool whose worker died or is stuck (only for ``owned_pool``)."""
        self.abort()
        self.executor = _local_pool(self)
        self._stopped = False

    def abort(self) -> None:
        """Stop a local pool now, evaluations in flight included (after a failure)."""
        if not self.owned_pool:
            return
        for pid in list(self._pids or []):
            if pid > 0:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._stopped = True

    def close(self) -> None:
        """Stop what the search started (a local pool, a client it connected)."""
        if self.owned_pool and not self._stopped:  # idle workers exit on their own
            self.executor.shutdown(wait=True, cancel_futures=True)
        for close in self.closers:
            try:
                close()
            except Exception as err:  # closing must not hide the search's own outcome
                logger.warning("closing the %s executor failed: %s", self.name, err)


def _local_pool(engine: Engine) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("spawn")
    engine._pids = context.Array("l", engine.width)
    return ProcessPoolExecutor(engine.width, mp_context=context, initializer=_start_local,
                               initargs=(engine._pids, engine._threads))


def _start_local(pids: Any, threads: int) -> None:
    """A local worker takes the first free slot of `pids` (its index K: ``cuda:K``)."""
    with pids.get_lock():
        index = next(i for i in range(len(pids)) if pids[i] == 0)
        pids[index] = os.getpid()
    init_local_worker(index, threads)


def open_engine(spec: Any, workers: int) -> Engine | None:
    """The engine for ``executor=spec`` and ``workers`` (None: evaluate in this process)."""
    check_executor(spec)
    if spec is None and workers == 1:
        return None
    if spec is None or spec == "local":
        engine = Engine(executor=None, width=workers, name="local", owned_pool=True,  # type: ignore[arg-type]
                        _threads=max(1, (os.cpu_count() or 1) // workers))
        engine.executor = _local_pool(engine)
        logger.info("evaluating in %d local worker processes (%d torch threads each)",
                    workers, engine._threads)
        return engine
    if spec == "ray" or (isinstance(spec, str) and spec.startswith("ray://")):
        return _ray_engine(spec, workers)
    if isinstance(spec, RayExecutor):
        return Engine(executor=spec, width=workers, name="RayExecutor", share=spec.put)
    if isinstance(spec, str):
        client = _connect_dask(spec)
        try:
            engine = _dask_engine(client, workers, spec)
        except BaseException:
            client.close()  # the client this search connected: not left open on an error
            raise
        engine.closers.append(client.close)
        return engine
    if _is_dask_client(spec):
        return _dask_engine(spec, workers, type(spec).__name__)
    logger.info("evaluating on %s, %d trial(s) at a time", type(spec).__name__, workers)
    return Engine(executor=spec, width=workers, name=type(spec).__name__)


def _connect_dask(address: str) -> Any:
    try:
        from distributed import Client
    except ImportError as err:
        raise ConfigError(
            f"executor {address!r} needs Dask distributed: pip install "
            "'autoquant[distributed]' (or dask[distributed])") from err
    target = "tcp://" + address.removeprefix("dask://") if address.startswith("dask://") \
        else address
    try:
        return Client(target, timeout=30)
    except Exception as err:
        raise ConfigError(f"cannot connect to the Dask scheduler at {target}: "
                          f"{type(err).__name__}: {err}; start one (dask scheduler) or fix "
                          "the address") from err


def _dask_engine(client: Any, workers: int, name: str) -> Engine:
    if workers == 1:
        try:
            client.wait_for_workers(1, timeout=60)
        except Exception as err:
            raise ConfigError(f"the Dask cluster {name} has no workers after 60 s ({err}); "
                              "start some (dask worker ADDRESS)") from err
        workers = max(1, sum(client.nthreads().values()))
    logger.info("evaluating on Dask (%s), %d trial(s) at a time", name, workers)

    def on_each(fn: Callable[..., Any], *args: Any) -> list[Any]:
        return [client.submit(fn, *args, workers=[address], allow_other_workers=False,
                              pure=False) for address in client.scheduler_info()["workers"]]

    return Engine(executor=client.get_executor(pure=False), width=workers, name=name,
                  share=lambda bundle: client.scatter(bundle, broadcast=True, hash=False),
                  on_each=on_each)


def _ray_engine(spec: str, workers: int) -> Engine:
    try:
        import ray
    except ImportError as err:
        raise ConfigError(f"executor {spec!r} needs Ray: pip install 'autoquant[ray]'") from err
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if spec == "ray" else spec, log_to_driver=False)
        except Exception as err:
            raise ConfigError(f"cannot start or reach Ray at {spec!r}: {type(err).__name__}: "
                              f"{err}") from err
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    executor = RayExecutor(num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0)
    width = workers if workers > 1 else max(1, gpus or int(resources.get("CPU", 1)))
    logger.info("evaluating on Ray (%s), %d trial(s) at a time, one %s each", spec, width,
                "GPU" if gpus else "CPU")
    engine = Engine(executor=executor, width=width, name=spec, share=executor.put)
    if started:
        engine.closers.append(ray.shutdown)
    return engine
