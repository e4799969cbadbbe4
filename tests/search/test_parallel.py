"""workers=N: the plans of one ask() are evaluated in spawned processes, same answers."""

from __future__ import annotations

import sys
import time
import types

import pytest

import autoquant as aq
from autoquant.errors import ConfigError
from autoquant.search.testing import SyntheticEvaluator, linear_stack, ranking_from_drops

N = 12
DROPS = {str(i): ((7 * i) % N + 1) / 1024 for i in range(N)}


class SpecEvaluator(SyntheticEvaluator):
    """Rebuilt in each worker from an import path instead of being pickled."""

    def worker_spec(self):
        return "autoquant.search.testing:SyntheticEvaluator", {"drops": self.drops}


def run(strategy, evaluator, workers, **kwargs):
    return aq.auto_quantize(
        linear_stack(N), evaluator, max_loss=30 / 1024, strategy=strategy,
        ranking=ranking_from_drops(DROPS), workers=workers, **kwargs,
    )


@pytest.mark.slow
def test_two_workers_give_the_same_answer_in_fewer_rounds() -> None:
    # one pool for the whole test (spawning workers costs seconds): binary, then the audit
    one = run("binary", SyntheticEvaluator(DROPS), 1, audit=3)
    two = run("binary", SpecEvaluator(DROPS), 2, audit=3)
    assert two.plan == one.plan and two.loss == one.loss
    # 3-ary search: k=0, then {4 fail, 8 pass}, then {5 pass, 6 pass}: 3 rounds, not 5
    assert [len(r.fallback_layers) for r in two.history[:6]] == [12, 0, 4, 8, 5, 6]
    assert [r.index for r in two.history] == list(range(9))
    assert two.checks["audit"] == one.checks["audit"]  # evaluated in the workers
    assert two.settings.workers == 2


def test_unpicklable_evaluator_is_a_config_error_naming_the_fix() -> None:
    evaluator = SyntheticEvaluator(DROPS)
    evaluator.hook = lambda m: m  # lambdas do not pickle
    with pytest.raises(ConfigError, match="worker_spec"):
        run("binary", evaluator, 2)
    with pytest.raises(ConfigError, match="workers"):
        run("binary", SyntheticEvaluator(DROPS), 0)


# -- faults inside workers: each one used to hang the search ---------------------------------
BINARY_ORDER = [12, 0, 4, 8, 5, 6]  # float layers of the trials of a 3-ary binary search


def faulty(**kwargs):
    from tests.helpers.workerhelpers import WorkerFaultEvaluator

    return WorkerFaultEvaluator(DROPS, **kwargs)


@pytest.mark.slow
def test_a_worker_that_dies_mid_trial_is_requeued_once_and_the_answer_is_unchanged(tmp_path):
    one = run("binary", SyntheticEvaluator(DROPS), 1)
    two = run("binary", faulty(fault="die", at=4, once=str(tmp_path / "died")), 2)
    assert (tmp_path / "died").exists()  # the worker really died
    assert two.plan == one.plan and two.status == "met"
    assert [len(r.fallback_layers) for r in two.history] == BINARY_ORDER
    assert two.checks["parallel"]["requeued"] >= 1


@pytest.mark.slow
def test_a_trial_that_kills_every_worker_is_an_error_naming_it_not_a_hang(tmp_path):
    from autoquant.errors import EvaluatorError

    journal = []
    start = time.monotonic()
    with pytest.raises(EvaluatorError, match=r"trial 2 \(fallback 4 .*lost its worker twice"):
        run("binary", faulty(fault="die", at=4), 2, on_record=journal.append)
    assert time.monotonic() - start < 60
    # the trial evaluated beside it finished and was recorded before the error
    assert [len(r.fallback_layers) for r in journal] == [12, 0, 8]


@pytest.mark.slow
def test_eval_timeout_stops_an_evaluation_that_hangs_in_a_worker() -> None:
    from autoquant.errors import EvaluatorTimeoutError

    start = time.monotonic()
    with pytest.raises(EvaluatorTimeoutError, match="eval_timeout=2s"):
        run("binary", faulty(fault="hang", at=4), 2, eval_timeout=2)
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_an_evaluator_class_workers_cannot_import_is_a_config_error_not_a_respawn_loop():
    # a class only this process knows, as one defined in `python -c` is to a spawned worker
    module = types.ModuleType("autoquant_test_nowhere")
    module.Hidden = type("Hidden", (SyntheticEvaluator,), {"__module__": module.__name__})
    sys.modules[module.__name__] = module
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError, match="cannot rebuild the model and the evaluator.*"
                                              "importable module"):
            run("binary", module.Hidden(DROPS), 2)
        assert time.monotonic() - start < 60
    finally:
        del sys.modules[module.__name__]


def test_no_evaluation_starts_after_max_seconds_with_workers(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers.workerhelpers import read_calls

    log = tmp_path / "calls.jsonl"
    start = time.time()
    # 3 s per call: float, k=0, then {4, 8} at ~6 s (2.5 s before the deadline, for a loaded
    # CI machine); {5, 6} could start at 9 s at the earliest, after the 8.5 s deadline
    with ThreadPoolExecutor(2) as pool:
        result = run("binary", faulty(log=str(log), seconds=3.0), 2, max_seconds=8.5,
                     executor=pool)
    calls = read_calls(log)
    assert result.status == "budget_exhausted"
    assert [c["fallbacks"] for c in calls] in ([12, 0, 4, 8], [12, 0, 8, 4])
    assert max(c["start"] for c in calls) < start + 8.5  # {5, 6} were never started
    assert len(result.history) == len(calls)  # every evaluation that ran is a record


def test_any_concurrent_futures_executor_runs_the_same_search() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        result = run("binary", SyntheticEvaluator(DROPS), 3, executor=pool)
    local = run("binary", SyntheticEvaluator(DROPS), 1)
    assert result.plan == local.plan
    assert result.checks["parallel"]["width"] == 3
    assert result.settings.to_dict()["executor"] == "ThreadPoolExecutor"
    with pytest.raises(ConfigError, match="executor must be"):
        run("binary", SyntheticEvaluator(DROPS), 2, executor="spark://nowhere")


@pytest.mark.parametrize("rescue", [False, True])
def test_refinement_and_rescue_with_workers_choose_the_plan_one_worker_chooses(rescue):
    from concurrent.futures import ThreadPoolExecutor

    from autoquant.search.testing import optimal_fallbacks

    if rescue:  # every prefix fails (the last-ranked layer hurts); 3 harmless layers next
        drops = {str(i): (0 if i in (8, 9, 10) else 12) / 1024 for i in range(N)}
        budget, options = 1 / 1024, {"rescue": 3}
    else:  # harmless layers misplaced among the sensitive ones
        drops = {str(i): (0 if i % 3 else 12) / 1024 for i in range(N)}
        budget, options = 30 / 1024, {"refine": True}
    ranking = [aq.LayerSensitivity(str(i), i / N, i, 1) for i in range(N)]

    def search(executor, workers):
        return aq.auto_quantize(linear_stack(N), SyntheticEvaluator(drops), max_loss=budget,
                                ranking=ranking, strategy_options=options,
                                executor=executor, workers=workers)

    one = search(None, 1)
    with ThreadPoolExecutor(3) as pool:
        three = search(pool, 3)
    assert three.plan == one.plan and three.status == one.status == "met"
    if rescue:
        assert sorted(three.quantized_layers) == ["10", "8", "9"]
    else:
        assert set(three.fallback_layers) == optimal_fallbacks(drops, budget)


def test_a_worker_without_the_model_asks_for_it_then_keeps_it(monkeypatch) -> None:
    from autoquant.evaluation.adapter import EvaluatorAdapter
    from autoquant.quant.qmodel import QuantModel
    from autoquant.search import worker
    from autoquant.settings import SearchSettings

    model = linear_stack(3)
    qmodel = QuantModel(model, aq.QuantConfig())
    evaluator = SyntheticEvaluator({str(i): 1 / 1024 for i in range(3)})
    qmodel.calibrate(lambda m, where: evaluator.calibration(m))
    adapter = EvaluatorAdapter(evaluator, SearchSettings().criterion(True))
    bundle = worker.pack(qmodel, adapter.payload())
    task = worker.Task("token-1", qmodel.quant_plan(), None, "cpu", "in trial 1 (test)")
    assert worker.run_trial(task).kind == "need"  # a worker that joined late
    first = worker.run_trial(task, bundle)
    assert (first.kind, first.value, first.device) == ("ok", 1 - 3 / 1024, "cpu")
    again = worker.run_trial(worker.Task("token-1", qmodel.float_plan(), None, "cpu", "t2"))
    assert (again.kind, again.value) == ("ok", 1.0)  # kept: no bundle needed any more
    broken = worker.run_trial(worker.Task("token-2", {}, None, "cpu", "t3"), b"not a bundle")
    assert broken.kind == "setup" and "cannot rebuild" in broken.message


def test_a_worker_evaluates_on_its_own_device(monkeypatch) -> None:
    import torch

    from autoquant.search import worker

    assert worker.worker_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():  # a CUDA model's worker without a GPU stays on CPU
        assert worker.worker_device("cuda") == torch.device("cpu")
    # local worker K of a machine with G GPUs owns cuda:(K mod G)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setitem(worker._SLOT, "index", 3)
    assert worker.worker_device("cuda") == torch.device("cuda", 1)
    assert worker.worker_device("cpu") == torch.device("cpu")  # a CPU search stays on CPU
    monkeypatch.setenv("AUTOQUANT_DEVICE", "cpu")
    assert worker.worker_device("cuda") == torch.device("cpu")
