"""Optuna study over per-layer precision, seeded with the `binary` result.

Each Optuna trial picks one scheme per searchable layer among ``choices``: the layer's
quantized scheme, the optional ladder rungs and its fallback. The strategy first runs a
plain binary search (through the core, so those plans are cached and counted), adds every
plan it evaluated to the study as a finished trial (no re-evaluation), and asks the
binary answer first so the sampler starts from a known-good point. Then it asks Optuna for
``n_trials`` more plans. Plans Optuna proposes twice are served from the core's cache.

Objectives (minimised):

- ``"single"``: the effective weight bits (parameter-weighted, float = 32) of a passing
  plan; a failing plan scores ``32 + 1 + loss`` (worse than any passing plan).
- ``"multi"``: the pair (loss, effective weight bits), a Pareto front (NSGA-II).

The core picks the final plan from every evaluated record (most layers quantized, then
fewest float layers, then lowest loss), whatever the objective.

``storage`` is None (in memory), a ``sqlite:///path.db`` URL or any database URL Optuna
accepts; with a ``study_name`` and storage several processes or machines share one study
(each runs `auto_quantize` with this strategy, and each sampler sees the others' trials).
A second run on an existing study resumes it: it skips the binary seed and asks the
best passing plan stored in the study first instead.

Those first plans are kept in this process, never in Optuna's shared trial queue: on
SQLite two processes can pop the same enqueued trial (``SELECT ... FOR UPDATE`` is a no-op
there, optuna/optuna#4621), and the second ``tell`` then fails. They enter the study as
finished trials once evaluated. A trial that another worker finished anyway (a queue the
user filled) is added again as a new finished trial, never lost and never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from autoquant.errors import ConfigError
from autoquant.plan import FLOAT, QuantPlan, parse_scheme, plan_key, scheme_label
from autoquant.search.strategy import SearchContext, SearchStrategy, TrialRecord
from autoquant.strategies.binary import BinarySearchStrategy

__all__ = ["OptunaStrategy", "check_storage_url"]

logger = logging.getLogger(__name__)

_FAIL_OFFSET = 33.0  # a failing plan scores above any passing plan's effective bits (<= 32)


def check_storage_url(storage: str) -> None:
    """Check an Optuna storage URL up front, before a run writes anything.

    Parses it as SQLAlchemy does, loads its dialect and database driver, and for a SQLite
    file checks that its folder exists (SQLite creates the file, never the folder). Without
    this, a typo surfaces as a SQLAlchemy traceback only once the search starts, after the
    run has written its journal.

    Raises:
        ConfigError: naming the URL, what is wrong and the fix.
    """
    from pathlib import Path

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    example = "e.g. 'sqlite:///study.db' (a file) or 'postgresql://user@host/db'"
    try:
        url = make_url(storage)
        dialect = url.get_dialect()
    except ArgumentError as err:
        raise ConfigError(f"storage {storage!r} is not a database URL Optuna accepts "
                          f"({err}); use a URL, {example}") from err
    load_driver = getattr(dialect, "import_dbapi", None) or getattr(dialect, "dbapi", None)
    try:
        if load_driver is not None:
            load_driver()
    except ImportError as err:
        raise ConfigError(f"storage {storage!r}: the database driver for "
                          f"{url.drivername!r} is not installed ({err}); install it, or use "
                          "'sqlite:///study.db'") from err
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and \
            not database.startswith("file:"):
        folder = Path(database).expanduser().parent
        if not folder.is_dir():
            raise ConfigError(f"storage {storage!r}: the folder {str(folder.resolve())!r} of "
                              "the SQLite file does not exist (SQLite creates the file, not "
                              "its folder); create it, or point the URL at an existing "
                              "folder (three slashes: relative to the working directory, "
                              "four: absolute)")


class OptunaStrategy(SearchStrategy):
    """Per-layer precision search with Optuna's ask/tell, seeded with `binary`.

    Args:
        n_trials: Optuna trials this run asks for after the seed (cached plans included).
        objectives: ``"single"`` (effective bits, fail-penalised) or ``"multi"``
            (loss, effective bits).
        ladder: intermediate bit widths offered besides quantized and fallback, e.g. [16].
        storage: None (in memory), ``"sqlite:///file.db"`` or any Optuna storage URL.
        study_name: the study to create or resume (required to share a stored study).
        seed: the sampler's seed (runs are deterministic given the study's history).
        seed_with_binary: run the binary search first and ask its answer first.
    """

    name = "optuna"

    def __init__(self, n_trials: int = 30, objectives: str = "single",
                 ladder: Sequence[int] = (), storage: str | None = None,
                 study_name: str | None = None, seed: int = 0,
                 seed_with_binary: bool = True) -> None:
        if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 0:
            raise ConfigError(f"n_trials must be an int >= 0, got {n_trials!r}")
        if objectives not in ("single", "multi"):
            raise ConfigError(f"objectives must be 'single' or 'multi', got {objectives!r}")
        if storage is not None and not isinstance(storage, str):
            raise ConfigError(
                f"storage must be None or a URL such as 'sqlite:///study.db', got {storage!r}"
            )
        if storage is not None and study_name is None:
            raise ConfigError("a stored study needs a study_name, e.g. study_name='resnet-int8'")
        if isinstance(ladder, (str, bytes)) or not isinstance(ladder, Sequence) or not all(
                isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 16 for b in ladder):
            raise ConfigError(f"ladder must be a list of bit widths 2..16, e.g. [16], got "
                              f"{ladder!r:.60}")
        if study_name is not None and not isinstance(study_name, str):
            raise ConfigError(f"study_name must be a string or None, got {study_name!r:.60}")
        if not isinstance(seed_with_binary, bool):
            raise ConfigError(f"seed_with_binary must be true or false, got "
                              f"{seed_with_binary!r:.60}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 32:
            raise ConfigError(f"seed must be an int in [0, 2**32) (numpy seeds Optuna's "
                              f"samplers), got {seed!r}")
        if storage is not None:
            check_storage_url(storage)
        super().__init__(n_trials=n_trials, objectives=objectives, ladder=list(ladder),
                         storage=storage, study_name=study_name, seed=seed,
                         seed_with_binary=seed_with_binary)
        self.n_trials = n_trials
        self.objectives = objectives
        self.extra = [scheme_label(b, b) for b in ladder]
        self.storage = storage
        self.study_name = study_name
        self.seed = seed
        self.seed_with_binary = seed_with_binary

    # -- setup -----------------------------------------------------------------------------
    def setup(self, context: SearchContext) -> None:
        super().setup(context)
        import optuna

        self._optuna = optuna
        sampler: Any
        if self.objectives == "multi":
            sampler = optuna.samplers.NSGAIISampler(seed=self.seed)
            kwargs: dict[str, Any] = {"directions": ["minimize", "minimize"]}
        else:
            sampler = optuna.samplers.TPESampler(seed=self.seed)
            kwargs = {"direction": "minimize"}
        try:
            self.study = optuna.create_study(
                storage=self.storage, sampler=sampler, study_name=self.study_name,
                load_if_exists=True, **kwargs,
            )
        except (ValueError, ImportError, self._storage_errors()) as err:
            raise ConfigError(
                f"cannot open the Optuna study {self.study_name!r} at {self.storage!r}: {err}. "
                "Use a URL Optuna accepts (e.g. 'sqlite:///study.db') and the same "
                "objectives as the study was created with."
            ) from err
        expected = 2 if self.objectives == "multi" else 1
        if len(self.study.directions) != expected:
            raise ConfigError(
                f"the stored study {self.study_name!r} has {len(self.study.directions)} "
                f"objective(s) but objectives={self.objectives!r} needs {expected}; use the "
                "objectives it was created with, or a new study_name"
            )
        self.choices = {
            n: list(dict.fromkeys([context.quant_schemes[n], *self.extra,
                                   context.fallback_schemes[n]]))
            for n in context.ranking
        }
        self.dists = {n: optuna.distributions.CategoricalDistribution(c)
                      for n, c in self.choices.items()}
        done = [t for t in self.study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
        self._seeder: BinarySearchStrategy | None = None
        self._first: list[QuantPlan] = []  # asked before sampling; local to this process
        if self.seed_with_binary and not done:
            self._seeder = BinarySearchStrategy()
            self._seeder.setup(context)
        elif done:
            self._ask_best_stored_first(done)
        self._seed_plans: list[tuple[QuantPlan, TrialRecord]] = []
        self._pending: dict[str, list[Any]] = {}
        self._asked_trials = 0
        logger.info("optuna study %r: %d finished trial(s) already", self.study.study_name,
                    len(done))

    def _storage_errors(self) -> type[Exception]:
        """The database errors that opening a stored study can raise (a server that went
        away, a file that became read-only); ValueError when there is no storage."""
        if self.storage is None:
            return ValueError
        from sqlalchemy.exc import SQLAlchemyError

        return SQLAlchemyError

    def _ask_best_stored_first(self, done: list[Any]) -> None:
        passing = [t for t in done if t.user_attrs.get("passed")]
        if passing:
            best = min(passing, key=lambda t: t.user_attrs.get("effective_bits", 32.0))
            if set(best.params) == set(self.choices) and all(
                    best.params[n] in self.choices[n] for n in self.choices):
                self._first.append({n: best.params[n] for n in self.context.ranking})

    # -- objective -------------------------------------------------------------------------
    def _effective_bits(self, plan: QuantPlan) -> float:
        assert self.context is not None
        total = weight = 0.0
        for name, scheme in plan.items():
            size = float(self.context.params.get(name, 1))
            bits = parse_scheme(scheme)
            total += (32 if bits is None else bits[0]) * size
            weight += size
        return total / weight if weight else 32.0

    def _values(self, plan: QuantPlan, record: TrialRecord) -> list[float]:
        bits = self._effective_bits(plan)
        if self.objectives == "multi":
            return [record.loss, bits]
        return [bits if record.passed else _FAIL_OFFSET + min(max(record.loss, 0.0), 1e6)]

    def _attrs(self, plan: QuantPlan, record: TrialRecord) -> dict[str, Any]:
        return {"passed": record.passed, "loss": record.loss, "metric": record.metric,
                "effective_bits": self._effective_bits(plan),
                "fallback": sum(plan[n] == FLOAT for n in plan)}

    # -- ask/tell --------------------------------------------------------------------------
    def ask(self) -> list[QuantPlan]:
        assert self.context is not None
        if self._seeder is not None:
            plans = self._seeder.ask()
            if plans:
                return plans
            self._finish_seed()
        if self._asked_trials >= self.n_trials:
            return []
        plans = []
        for _ in range(min(self.context.workers, self.n_trials - self._asked_trials)):
            trial: Any = None
            if self._first:
                plan = self._first.pop(0)
            else:
                trial = self.study.ask(self.dists)
                plan = {n: trial.params[n] for n in self.context.ranking}
            self._pending.setdefault(plan_key(plan), []).append(trial)
            plans.append(plan)
            self._asked_trials += 1
        return plans

    def _finish_seed(self) -> None:
        assert self._seeder is not None
        for plan, record in self._seed_plans:
            self._add_finished(plan, record)
        best = [p for p, r in self._seed_plans if r.passed]
        if best:
            self._first.append(dict(best[-1]))  # the binary answer: its last pass
        self._seeder = None

    def _add_finished(self, plan: QuantPlan, record: TrialRecord,
                      extra: dict[str, Any] | None = None) -> None:
        """Store an evaluated plan in the study as a new finished trial."""
        self.study.add_trial(self._optuna.trial.create_trial(
            params=dict(plan), distributions=self.dists, values=self._values(plan, record),
            user_attrs={**self._attrs(plan, record), **(extra or {})},
        ))

    def tell(self, plan: QuantPlan, record: TrialRecord) -> None:
        if self._seeder is not None:
            self._seeder.tell(plan, record)
            self._seed_plans.append((plan, record))
            return
        trial = self._pending[plan_key(plan)].pop(0)
        extra = {"plan_index": record.index}
        if trial is None:
            self._add_finished(plan, record, extra)
            return
        try:
            for key, value in {**extra, **self._attrs(plan, record)}.items():
                trial.set_user_attr(key, value)
            self.study.tell(trial, self._values(plan, record))
        except (self._optuna.exceptions.UpdateFinishedTrialError, ValueError) as err:
            if trial.number not in self._finished_numbers():
                raise
            logger.warning("optuna trial %d was finished by another worker (%s); storing "
                           "this evaluation as a new trial", trial.number, err)
            self._add_finished(plan, record, extra)

    def _finished_numbers(self) -> set[int]:
        """Numbers of the study's finished trials (one storage read): a trial this process
        asked that is among them was finished by another worker."""
        return {t.number for t in self.study.get_trials(deepcopy=False)
                if t.state.is_finished()}

    def finish(self) -> None:
        # trials asked but never evaluated (the budget ran out) are marked failed, so a
        # stored study does not keep them RUNNING forever
        asked = [t for trials in self._pending.values() for t in trials if t is not None]
        finished = self._finished_numbers() if asked else set()
        for trial in asked:
            if trial.number not in finished:
                self.study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
        self._pending = {}
