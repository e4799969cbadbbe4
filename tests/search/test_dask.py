"""Trials on a real Dask cluster (two worker processes on this machine): the same search as
one worker, a worker killed mid-trial, and a stopped cluster then ``--resume``."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

import autoquant as aq
from autoquant.jobs.cli import EXIT_ERROR, EXIT_OK, main
from autoquant.jobs.journal import JOURNAL_FILE, read_journal
from autoquant.search.testing import SyntheticEvaluator, linear_stack, ranking_from_drops
from tests.helpers import jobhelpers
from tests.helpers.workerhelpers import WorkerFaultEvaluator

distributed = pytest.importorskip("distributed")

N = 12
DROPS = {str(i): ((7 * i) % N + 1) / 1024 for i in range(N)}
BINARY_ORDER = [12, 0, 4, 8, 5, 6]  # float layers of the trials of a 3-ary binary search
HELPERS = Path(__file__).resolve().parents[1] / "helpers"

pytestmark = pytest.mark.slow


def local_cluster():
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                    dashboard_address=":0", silence_logs=logging.ERROR)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as running:
        yield running


def search(evaluator, executor, workers=1):
    return aq.auto_quantize(linear_stack(N), evaluator, max_loss=30 / 1024,
                            ranking=ranking_from_drops(DROPS), executor=executor,
                            workers=workers)


def test_a_dask_cluster_runs_the_same_search_as_one_worker_on_both_workers(cluster):
    one = search(SyntheticEvaluator(DROPS), None)
    with distributed.Client(cluster) as client:
        by_client = search(SyntheticEvaluator(DROPS), client)  # width from the cluster: 2
    address = cluster.scheduler_address.replace("tcp://", "dask://")
    by_address = search(SyntheticEvaluator(DROPS), address)
    for result in (by_client, by_address):
        assert result.plan == one.plan and result.loss == one.loss
        assert result.checks["parallel"]["width"] == 2
    histories = [[(r.index, r.plan, r.metric) for r in x.history]
                 for x in (by_client, by_address)]
    assert histories[0] == histories[1]  # and test_parallel: the same as the local pool
    assert [len(r.fallback_layers) for r in by_client.history] == BINARY_ORDER
    assert by_address.settings.to_dict()["executor"] == address


def test_a_worker_killed_mid_trial_is_replaced_and_the_answer_is_unchanged(cluster, tmp_path):
    one = search(SyntheticEvaluator(DROPS), None)
    evaluator = WorkerFaultEvaluator(DROPS, fault="die", at=4, once=str(tmp_path / "died"))
    with distributed.Client(cluster) as client:
        result = search(evaluator, client)
    assert (tmp_path / "died").exists()  # the worker process really died
    assert result.plan == one.plan
    assert [len(r.fallback_layers) for r in result.history] == BINARY_ORDER


def write_job(folder: Path, executor: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(f"""\
python_path: [{HELPERS}]
model: {{factory: "jobhelpers:build_model", kwargs: {{depth: 6}}}}
evaluator:
  class: jobhelpers:TinyEvaluator
  kwargs: {{depth: 6, log: {folder / 'evals.log'}, delay: 0.3}}
example_inputs: [{{shape: [2, 8]}}]
quant: {{default: {{weight: {{bits: 6}}, activation: {{bits: 6}}}}}}
search: {{max_loss: 0.03, workers: {1 if executor is None else 2}, \
executor: {json.dumps(executor)}}}
output_dir: {folder / 'out'}
""", encoding="utf-8")
    return path


def test_a_stopped_cluster_then_resume_repeats_no_finished_evaluation(tmp_path):
    assert main(["run", str(write_job(tmp_path / "ref", None)), "-q"]) == EXIT_OK
    reference = json.loads((tmp_path / "ref" / "out" / "report.json").read_text())

    out = tmp_path / "run" / "out"
    first = local_cluster()
    job = write_job(tmp_path / "run", first.scheduler_address)

    def stop_after_three() -> None:
        while not (out / JOURNAL_FILE).exists() or \
                len(read_journal(out / JOURNAL_FILE).records) < 3:
            time.sleep(0.02)
        first.close()

    stopper = threading.Thread(target=stop_after_three, daemon=True)
    stopper.start()
    assert main(["run", str(job), "-q"]) == EXIT_ERROR
    stopper.join(timeout=60)
    journaled = {json.dumps(r.plan, sort_keys=True)
                 for r in read_journal(out / JOURNAL_FILE).records}
    assert 3 <= len(journaled) < reference["counts"]["evaluations"]
    before = len(jobhelpers.read_log(tmp_path / "run" / "evals.log"))

    with local_cluster() as second:  # a new cluster at a new address
        assert main(["run", str(job), "--resume", "--executor", second.scheduler_address,
                     "-q"]) == EXIT_OK
    new = jobhelpers.without_resume_check(
        jobhelpers.read_log(tmp_path / "run" / "evals.log")[before:])
    assert all(json.dumps(e["plan"], sort_keys=True) not in journaled for e in new)
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["reused_evaluations"] == len(journaled)
    for key in ("status", "plan", "fallback_layers", "metrics"):
        assert report[key] == reference[key], key
