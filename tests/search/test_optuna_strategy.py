"""The `optuna` strategy: binary seed, objectives, SQLite storage resume, two processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

import autoquant as aq  # noqa: E402
from autoquant.errors import ConfigError  # noqa: E402
from autoquant.search.testing import (  # noqa: E402
    SyntheticEvaluator,
    linear_stack,
    optimal_fallbacks,
    ranking_from_drops,
)
from autoquant.strategies.optuna_search import OptunaStrategy  # noqa: E402

N = 8
DROPS = {str(i): ((3 * i) % N + 1) / 1024 for i in range(N)}  # 1..8 / 1024
BUDGET = 12 / 1024
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(verbosity)


def run(strategy, **kwargs):
    return aq.auto_quantize(linear_stack(N), SyntheticEvaluator(DROPS), max_loss=BUDGET,
                            strategy=strategy, ranking=ranking_from_drops(DROPS), **kwargs)


def complete(study) -> list:
    return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def test_seeds_the_study_with_the_binary_search_and_keeps_its_answer() -> None:
    strategy = OptunaStrategy(n_trials=6, seed=0)
    result = run(strategy)
    assert set(result.fallback_layers) == optimal_fallbacks(DROPS, BUDGET)
    binary = run("binary")
    seed_plans = [r.plan for r in binary.history[1:]]
    assert [r.plan for r in result.history[1:len(seed_plans) + 1]] == seed_plans
    trials = complete(strategy.study)
    # the binary plans were added without re-evaluation, then 6 asked trials
    assert len(trials) == len(seed_plans) + 6
    assert trials[len(seed_plans)].params == binary.plan  # the enqueued binary answer
    assert result.num_evaluations <= 1 + len(seed_plans) + 6


def test_multi_objective_study_has_a_pareto_front() -> None:
    strategy = OptunaStrategy(n_trials=5, objectives="multi", ladder=[16], seed=1)
    result = run(strategy)
    assert result.met
    assert len(strategy.study.directions) == 2 and strategy.study.best_trials
    assert all(set(t.params.values()) <= {"w8a8", "w16a16", "float"}
               for t in complete(strategy.study))


@pytest.mark.slow
def test_budget_exhaustion_marks_pending_trials_failed(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    strategy = OptunaStrategy(n_trials=20, storage=storage, study_name="s", seed=0)
    result = run(strategy, max_evaluations=8, workers=1)
    assert result.status == "budget_exhausted" and result.num_evaluations == 8
    states = {t.state for t in strategy.study.get_trials()}
    assert optuna.trial.TrialState.RUNNING not in states


@pytest.mark.slow
def test_sqlite_study_resumes_from_the_best_stored_plan(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first_strategy = OptunaStrategy(n_trials=3, storage=storage, study_name="resume", seed=0)
    first = run(first_strategy)
    count = len(complete(first_strategy.study))
    second_strategy = OptunaStrategy(n_trials=3, storage=storage, study_name="resume", seed=1)
    second = run(second_strategy)
    study = optuna.load_study(study_name="resume", storage=storage)
    assert len(complete(study)) == count + 3
    # no second binary seed: the first trial re-checks the best plan stored by run 1
    assert second.history[1].plan == first.plan
    assert len(second.fallback_layers) <= len(first.fallback_layers) and second.met


def test_resuming_with_other_objectives_is_a_config_error(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=storage, study_name="one", direction="minimize")
    with pytest.raises(ConfigError, match="objective"):
        run(OptunaStrategy(storage=storage, study_name="one", objectives="multi"))


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="study_name"):
        OptunaStrategy(storage="sqlite:///x.db")
    with pytest.raises(ConfigError, match="objectives"):
        OptunaStrategy(objectives="both")
    with pytest.raises(ConfigError, match="n_trials"):
        OptunaStrategy(n_trials=-1)


WORKER = textwrap.dedent("""
    import json, sys
    import optuna
    import autoquant as aq
    from autoquant.search.testing import SyntheticEvaluator, linear_stack, ranking_from_drops
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    drops = json.loads(sys.argv[2])
    result = aq.auto_quantize(
        linear_stack(len(drops)), SyntheticEvaluator(drops), max_loss=float(sys.argv[3]),
        strategy="optuna", ranking=ranking_from_drops(drops),
        strategy_options={"n_trials": 5, "storage": sys.argv[1], "study_name": "shared",
                          "seed": int(sys.argv[4])})
    print(json.dumps({"met": result.met, "evaluations": result.num_evaluations}))
""")


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(storage=storage, study_name="shared", direction="minimize")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, storage, json.dumps(DROPS), str(BUDGET), str(seed)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in (1, 2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["met"]
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = complete(study)
    assert len(trials) >= 10  # 5 asked trials from each process (plus any seed trials)
    assert all(t.user_attrs.get("passed") is not None for t in trials)


def test_seed_plans_stay_out_of_the_shared_trial_queue(tmp_path) -> None:
    # a shared SQLite queue lets two processes pop the same trial (optuna#4621); the
    # binary answer and the best stored plan are asked by this process only
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for seed in (0, 1):  # a fresh study (binary seed), then a resumed one (best stored)
        strategy = OptunaStrategy(n_trials=2, storage=storage, study_name="q", seed=seed)
        result = run(strategy)
        assert result.met
    trials = strategy.study.get_trials()
    assert not [t.number for t in trials if "fixed_params" in t.system_attrs]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_a_trial_finished_by_another_worker_is_stored_again_not_fatal(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    strategy = OptunaStrategy(n_trials=2, storage=storage, study_name="race", seed=0,
                              seed_with_binary=False)
    original_ask = OptunaStrategy.ask

    def ask_then_lose_the_race(self):
        plans = original_ask(self)
        # another worker claims and finishes every trial this process just asked
        shared = optuna.load_study(study_name="race", storage=storage)
        for trials in self._pending.values():
            for trial in trials:
                if trial is not None:
                    shared.tell(trial.number, 99.0)
        return plans

    strategy.ask = ask_then_lose_the_race.__get__(strategy)
    result = run(strategy)
    done = complete(strategy.study)
    # each of the 2 asked trials: the other worker's result plus this worker's evaluation
    mine = [t for t in done if "plan_index" in t.user_attrs]
    assert len(done) == 4 and len(mine) == 2
    assert all(t.values[0] != 99.0 for t in mine)
    assert result.num_evaluations >= 2
