"""Faults that must not lose work: crashes and hangs mid-search resume with zero repeats,
non-deterministic evaluators are caught, budgets in wall time hold, the user's model and
its train/eval modes are untouched, and a journal cut at any byte still resumes."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

import autoquant as aq
from autoquant.errors import ConfigError, EvaluatorError, EvaluatorTimeoutError
from autoquant.jobs.cli import EXIT_ERROR, EXIT_OK, main
from autoquant.jobs.job import load_job
from autoquant.jobs.journal import JOURNAL_FILE, Journal, read_journal
from autoquant.report.render import render_report
from autoquant.search.strategy import TrialRecord
from tests.helpers.synthetic import DropEvaluator, linear_names, mlp
from tests.test_faults import job_file

TESTS = Path(__file__).resolve().parents[1] / "helpers"  # the job files' modules
sys.path.insert(0, str(TESTS))
import faulthelpers  # noqa: E402
import jobhelpers  # noqa: E402

PARTS = {"model": "m", "quant": "q", "search": "s"}
CONFIG = {"default": {"weight": {"bits": 6}, "activation": {"bits": 6}}}


def logged_plans(log: Path) -> list[str]:
    return [json.dumps(json.loads(line)["plan"], sort_keys=True)
            for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_evaluator_crash_in_trial_k_keeps_trials_before_k_and_resume_repeats_none(
        tmp_path, capsys):
    flag, log = tmp_path / "fail_at", tmp_path / "evals.log"
    common = {"max_loss": 0.03, "depth": 6, "quant": str(CONFIG).replace("'", "")}
    job = job_file(tmp_path, evaluator="faulthelpers:CrashingEvaluator",
                   eval_kwargs=f"{{fail_flag: {flag}, depth: 6, log: {log}}}", **common)
    reference = job_file(tmp_path / "ref", eval_kwargs="{depth: 6}", **common)
    assert main(["run", str(reference), "-q"]) == EXIT_OK
    expected = json.loads((tmp_path / "ref" / "out" / "report.json").read_text())
    k = 2
    assert expected["counts"]["evaluations"] > k + 1  # the crash is mid-search
    flag.write_text(str(k))
    assert main(["run", str(job), "-q"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"evaluate() in trial {k} " in err and "simulated crash in evaluation 2" in err
    kept = read_journal(tmp_path / "out" / JOURNAL_FILE).records
    assert [r.index for r in kept] == list(range(k))  # every trial before k, nothing else
    assert len(logged_plans(log)) == k

    flag.unlink()  # the flaky service is back
    assert main(["run", str(job), "-q", "--resume"]) == EXIT_OK
    plans = logged_plans(log)
    # no trial repeats; only the float baseline is scored once more, to re-check it
    assert plans[k] == plans[0] and len(set(plans)) == expected["counts"]["evaluations"]
    assert len(plans) == expected["counts"]["evaluations"] + 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["run"]["reused_evaluations"] == k
    assert report["checks"]["resume"]["same"] is True
    assert report["plan"] == expected["plan"] and report["status"] == expected["status"]


def search_with_journal(folder: Path, evaluator, **kwargs):
    journal = Journal.open(folder, PARTS, resume=(folder / JOURNAL_FILE).exists())
    return aq.auto_quantize(jobhelpers.build_model(depth=6), evaluator, (torch.ones(2, 8),),
                            max_loss=0.03, config=CONFIG, on_record=journal.append_record,
                            preloaded=journal.records, **kwargs)


@pytest.mark.slow
def test_hung_evaluation_times_out_keeps_the_journal_and_resume_finishes(tmp_path):
    reference = aq.auto_quantize(jobhelpers.build_model(depth=6),
                                 jobhelpers.TinyEvaluator(depth=6), max_loss=0.03,
                                 config=CONFIG)
    hung = faulthelpers.BlockingEvaluator(block_at=3, hang=10.0, depth=6)
    try:
        with pytest.raises(EvaluatorTimeoutError, match="in trial 3 .*eval_timeout=0.5s"):
            search_with_journal(tmp_path, hung, eval_timeout=0.5)
    finally:
        hung.release.set()
    assert len(read_journal(tmp_path / JOURNAL_FILE).records) == 3
    fresh = jobhelpers.TinyEvaluator(depth=6, log=str(tmp_path / "evals.log"))
    resumed = search_with_journal(tmp_path, fresh, eval_timeout=30)
    # the trials after the third, plus the float baseline once to re-check it
    assert len(logged_plans(tmp_path / "evals.log")) == reference.num_evaluations - 3 + 1
    assert resumed.plan == reference.plan and resumed.status == reference.status
    assert resumed.checks["resume"]["same"] is True


def test_eval_timeout_does_not_change_the_result_of_a_fast_evaluator():
    names = linear_names(6)
    drops = dict.fromkeys(names, 0.0) | {names[1]: 0.5, names[4]: 0.5}
    plain = aq.auto_quantize(mlp(6), DropEvaluator(drops), max_loss=0.1)
    guarded = aq.auto_quantize(mlp(6), DropEvaluator(drops), max_loss=0.1, eval_timeout=60)
    assert guarded.plan == plain.plan
    assert [r.metric for r in guarded.history] == [r.metric for r in plain.history]
    assert guarded.settings.eval_timeout == 60


def test_error_inside_a_timed_evaluation_is_the_same_evaluator_error():
    class Broken(DropEvaluator):
        def evaluate(self, model):
            if self.calls == 1:
                raise KeyError("label")
            return super().evaluate(model)

    with pytest.raises(EvaluatorError, match=r"in trial 1 .*raised KeyError: 'label'"):
        aq.auto_quantize(mlp(3), Broken({}), max_loss=0.1, eval_timeout=60)


def test_determinism_check_is_off_by_default_and_costs_one_evaluation_when_on():
    off = DropEvaluator({})
    result = aq.auto_quantize(mlp(3), off, max_loss=0.1)
    assert result.determinism is None and off.calls == result.num_evaluations
    on = DropEvaluator({})
    result = aq.auto_quantize(mlp(3), on, max_loss=0.1, check_determinism=True)
    assert on.calls == result.num_evaluations + 1
    assert result.determinism["deterministic"] is True
    assert result.determinism["difference"] == 0.0 and result.determinism["extra_evaluations"] == 1


def test_non_deterministic_evaluator_is_warned_and_recorded_in_result_and_report(
        tmp_path, caplog):
    ev = faulthelpers.NoisyEvaluator(noise=1e-3, depth=3)
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        result = aq.auto_quantize(jobhelpers.build_model(depth=3), ev, max_loss=0.05,
                                  check_determinism=True)
    assert "not deterministic" in caplog.text
    det = result.determinism
    assert det["deterministic"] is False and det["difference"] == pytest.approx(1e-3)
    result.save(tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["determinism"]["deterministic"] is False
    render_report(report, tmp_path)
    assert "the evaluator is not deterministic" in (tmp_path / "report.md").read_text()


def test_max_seconds_stops_the_search_after_the_baseline_with_a_clear_reason():
    class Slow(DropEvaluator):
        def evaluate(self, model):
            import time
            time.sleep(0.05)
            return super().evaluate(model)

    names = linear_names(8)
    ev = Slow(dict.fromkeys(names, 0.5))
    result = aq.auto_quantize(mlp(8), ev, max_loss=0.1, max_seconds=0.01)
    assert result.status == "budget_exhausted" and "max_seconds" in result.reason
    assert result.num_evaluations == ev.calls == 1  # only the float baseline ran


def test_user_model_in_train_mode_keeps_every_modes_weights_and_is_evaluated_in_eval():
    model = faulthelpers.nested_mixed_mode_model()
    modes = faulthelpers.model_modes(model)
    assert len(set(modes.values())) == 2  # really mixed, nested
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ev = faulthelpers.ModeRecorder(depth=4)
    result = aq.auto_quantize(model, ev, (torch.ones(2, 8),), max_loss=0.5)
    assert faulthelpers.model_modes(model) == modes
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not any(type(m).__name__ == "QuantLayer" for m in model.modules())
    assert ev.saw_training and not any(ev.saw_training)  # calibration and every evaluate
    assert not any(m.training for m in result.model.modules())


def test_layers_calibration_never_runs_are_reported_and_left_float():
    class Skips(DropEvaluator):
        def calibration(self, model):
            model[0](self.inputs)  # only the first layer ever runs

        def evaluate(self, model):
            self.calls += 1
            return 1.0

    result = aq.auto_quantize(mlp(3), Skips({}), max_loss=0.1)
    assert result.skipped_layers == ["2", "4"]
    assert set(result.plan) == {"0"} and result.quantized_layers == ["0"]
    assert result.config.skip_layers == ["2", "4"]


@pytest.mark.slow
def test_journal_cut_at_any_byte_resumes_with_exactly_the_complete_lines(tmp_path):
    journal = Journal.open(tmp_path / "src", PARTS, resume=False)
    records = []
    for i in range(3):
        record = TrialRecord(i, f"t{i}", {"a": "w8a8"}, [], 0.5 + i, 0.1, True, 0.01)
        journal.append_record(record)
        records.append(record)
    data = (tmp_path / "src" / JOURNAL_FILE).read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    folder = tmp_path / "cut"
    folder.mkdir()
    for cut in range(len(data) + 1):
        (folder / JOURNAL_FILE).write_bytes(data[:cut])
        opened = Journal.open(folder, PARTS, resume=True)
        complete = sum(1 for end in ends if end <= cut)
        assert opened.records == records[:max(complete - 1, 0)], cut
        assert (folder / JOURNAL_FILE).read_bytes().endswith(b"\n")


def test_job_file_guard_settings_are_validated_and_do_not_change_the_fingerprint(tmp_path):
    bad = job_file(tmp_path / "bad", extra=", eval_timeout: -1")
    with pytest.raises(ConfigError, match=r"job\.yaml:6: search\.eval_timeout: must be a "
                                          r"number of seconds > 0"):
        load_job(bad)
    with pytest.raises(ConfigError, match=r"search\.check_determinism: must be"):
        load_job(job_file(tmp_path / "bad2", extra=", check_determinism: 3"))
    plain = load_job(job_file(tmp_path / "a"))
    guarded = load_job(job_file(tmp_path / "b", extra=", eval_timeout: 5, max_seconds: 60, "
                                                      "check_determinism: true"))
    assert guarded.settings().eval_timeout == 5
    assert guarded.settings().check_determinism is True
    assert guarded.settings().fingerprint() == plain.settings().fingerprint()
