"""The `autoquant` CLI: runs, exit codes, errors, kill -9 / SIGTERM then --resume, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jsonschema
import pytest

from autoquant.jobs.cli import (
    EXIT_ERROR,
    EXIT_FLOAT_ONLY,
    EXIT_INTERRUPTED,
    EXIT_NOT_MET,
    EXIT_OK,
    main,
)
from autoquant.jobs.journal import JOURNAL_FILE, read_journal
from autoquant.report.build import report_schema

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests" / "helpers"  # the job files' modules
sys.path.insert(0, str(TESTS))
import jobhelpers  # noqa: E402


def write_job(folder: Path, *, max_loss: float = 0.03, budget: int | None = None,
              hang_on_call: int | None = None, quant: str | None = None,
              out: str = "out", export: str | None = None, search: str = "",
              evaluator: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    quant_text = quant or "{default: {weight: {bits: 6}, activation: {bits: 6}}}"
    text = f"""\
python_path: [{TESTS}]
model: {{factory: "jobhelpers:build_model", kwargs: {{depth: 6}}}}
evaluator:
  class: jobhelpers:TinyEvaluator
  kwargs: {{depth: 6, log: {folder / 'evals.log'}, hang_on_call: {hang_on_call or 'null'}\
{evaluator}}}
example_inputs: [{{shape: [2, 8]}}]
quant: {quant_text}
search: {{max_loss: {max_loss}, max_evaluations: {'null' if budget is None else budget}{search}}}
output_dir: {out}
"""
    if export is not None:
        text += f"export: {export}\n"
    path = folder / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "autoquant", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def evaluations(folder: Path) -> list[dict]:
    return jobhelpers.read_log(folder / "evals.log")


def plan_key(plan: dict) -> str:
    return json.dumps(plan, sort_keys=True)


def journal_trials(out: Path) -> int:
    path = out / JOURNAL_FILE
    if not path.exists():
        return 0
    return sum('"type": "trial"' in line for line in path.read_text().splitlines())


def wait_for_trials(out: Path, count: int, proc: subprocess.Popen, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while journal_trials(out) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


@pytest.mark.slow
def test_run_in_a_subprocess_writes_every_artifact_and_a_schema_valid_report(tmp_path):
    job = write_job(tmp_path)
    proc = cli("run", str(job))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_OK, stderr
    assert "status: met" in stdout and "Traceback" not in stderr
    out = tmp_path / "out"
    for name in ("report.json", "report.html", "report.md", "plots/sensitivity.png",
                 "plots/trajectory.png", "quant_config.yaml", "model_state.pt",
                 JOURNAL_FILE, "job.yaml"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    assert report["job"]["search"]["max_loss"] == 0.03
    assert report["run"] == {"resumed": False, "reused_evaluations": 0,
                             "new_evaluations": report["counts"]["evaluations"],
                             "reused_evaluator_seconds": 0,
                             "journal": str(out / JOURNAL_FILE)}
    assert report["counts"]["fallback"] == len(report["fallback_layers"]) > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # self-contained
    assert "**MET**" in (out / "report.md").read_text()
    assert len(evaluations(tmp_path)) == report["counts"]["evaluations"]


def test_budget_exhausted_exits_2_and_still_saves_the_best_plan(tmp_path, capsys):
    job = write_job(tmp_path, budget=2)
    assert main(["run", str(job), "-q"]) == EXIT_NOT_MET
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "budget_exhausted"
    assert (tmp_path / "out" / "model_state.pt").is_file()


def test_only_the_float_model_passing_exits_3_float_only_not_0(tmp_path, capsys):
    job = write_job(tmp_path, max_loss=1e-12,
                    quant="{default: {weight: {bits: 2}, activation: {bits: 2}}}")
    assert main(["run", str(job), "-q"]) == EXIT_FLOAT_ONLY
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["status"], report["met"]) == ("float_only", False)
    assert report["counts"]["quantized"] == 0
    jsonschema.validate(report, report_schema())


def test_malformed_job_exits_1_with_file_line_and_no_traceback(tmp_path):
    job = write_job(tmp_path)
    job.write_text(job.read_text().replace("max_loss", "max_los"))
    proc = cli("run", str(job))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_ERROR
    assert f"autoquant: error: {job}:8: search.max_los: unknown key" in stderr
    assert "Traceback" not in stderr


def test_verbose_error_shows_the_traceback(tmp_path, capsys):
    job = write_job(tmp_path, quant="missing.yaml")
    assert main(["run", str(job), "-v"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and "init-config" in err


def test_usage_error_exits_1_not_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == EXIT_ERROR


@pytest.mark.slow
def test_kill_9_mid_search_then_resume_repeats_no_evaluation_and_gives_the_same_result(
        tmp_path):
    assert main(["run", str(write_job(tmp_path / "ref")), "-q"]) == EXIT_OK
    reference = json.loads((tmp_path / "ref" / "out" / "report.json").read_text())

    job = write_job(tmp_path / "run", hang_on_call=4)  # 3 trials journaled, then hangs
    out = tmp_path / "run" / "out"
    proc = cli("run", str(job))
    wait_for_trials(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    journaled = {plan_key(r.plan) for r in read_journal(out / JOURNAL_FILE).records}
    assert len(journaled) == 3 < reference["counts"]["evaluations"]
    before = len(evaluations(tmp_path / "run"))

    assert main(["run", str(job), "--resume", "-q"]) == EXIT_OK
    new = jobhelpers.without_resume_check(evaluations(tmp_path / "run")[before:])
    assert all(plan_key(e["plan"]) not in journaled for e in new)  # zero repeats
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["resumed"] is True
    assert report["run"]["reused_evaluations"] == len(journaled)
    assert report["run"]["new_evaluations"] == len(new)
    for key in ("status", "plan", "fallback_layers", "metrics"):
        assert report[key] == reference[key], key
    assert [t["metric"] for t in report["trials"]] == \
        [t["metric"] for t in reference["trials"]]


@pytest.mark.slow
def test_sigterm_exits_130_then_report_renders_the_interrupted_run_and_resume_finishes(
        tmp_path, capsys):
    job = write_job(tmp_path, hang_on_call=4)
    out = tmp_path / "out"
    proc = cli("run", str(job))
    wait_for_trials(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "--resume" in stderr

    assert main(["report", str(out)]) == EXIT_OK
    partial = json.loads((out / "report.json").read_text())
    jsonschema.validate(partial, report_schema())
    assert partial["status"] == "interrupted"
    assert partial["counts"]["evaluations"] == journal_trials(out)
    assert (out / "report.html").is_file()

    assert main(["run", str(job), "--resume", "-q"]) == EXIT_OK
    assert json.loads((out / "report.json").read_text())["status"] == "met"


def test_resume_with_a_changed_threshold_is_a_fingerprint_error(tmp_path, capsys):
    job = write_job(tmp_path)
    assert main(["run", str(job), "-q"]) == EXIT_OK
    write_job(tmp_path, max_loss=0.02)
    assert main(["run", str(job), "--resume", "-q"]) == EXIT_ERROR
    assert "search settings" in capsys.readouterr().err
    assert main(["run", str(job), "-q"]) == EXIT_ERROR  # neither --resume nor --overwrite
    assert main(["run", str(job), "-q", "--overwrite"]) == EXIT_OK


def test_resume_of_a_finished_run_with_a_torn_last_line_evaluates_nothing(tmp_path, capsys):
    job = write_job(tmp_path)
    assert main(["run", str(job), "-q"]) == EXIT_OK
    count = len(evaluations(tmp_path))
    with open(tmp_path / "out" / JOURNAL_FILE, "a") as handle:
        handle.write('{"type": "trial", "rec')
    assert main(["run", str(job), "--resume"]) == EXIT_OK
    assert jobhelpers.without_resume_check(evaluations(tmp_path)[count:]) == []
    assert "torn" in capsys.readouterr().err


def test_init_config_writes_the_per_layer_file_the_job_then_runs_with(tmp_path, capsys):
    job = write_job(tmp_path, quant="quant.yaml")
    assert main(["init-config", str(job)]) == EXIT_OK
    import yaml

    written = yaml.safe_load((tmp_path / "quant.yaml").read_text())
    assert sorted(written["layers"]) == ["0", "10", "2", "4", "6", "8"]
    assert main(["init-config", str(job)]) == EXIT_ERROR  # no silent overwrite
    assert main(["run", str(job), "-q"]) == EXIT_OK


def test_sensitivity_prints_the_ranking_and_saves_it_without_evaluating(tmp_path, capsys):
    job = write_job(tmp_path)
    assert main(["sensitivity", str(job), "-q"]) == EXIT_OK
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert [r["rank"] for r in data["ranking"]] == list(range(6))
    assert data["ranking"][0]["name"] in printed and "Linear" in printed
    assert evaluations(tmp_path) == []


def test_sensitivity_with_the_output_scope_scores_at_the_model_output(tmp_path, capsys):
    job = write_job(tmp_path, search=", sensitivity_scope: output")
    assert main(["sensitivity", str(job), "-q"]) == EXIT_OK
    data = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert data["sensitivity_scope"] == "output" and len(data["ranking"]) == 6
    assert evaluations(tmp_path) == []  # calibration passes only, no evaluation


def test_sensitivity_calibrates_as_run_does_so_both_rank_the_same_scores(tmp_path, capsys):
    quant = "{default: {weight: {bits: 4}, activation: {bits: 6}}, bias_correction: true}"
    job = write_job(tmp_path, quant=quant)
    assert main(["sensitivity", str(job), "-q"]) == EXIT_OK
    ranked = json.loads((tmp_path / "out" / "sensitivity.json").read_text())["ranking"]
    assert main(["run", str(job), "-q"]) == EXIT_OK
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    searched = {row["name"]: row["score"] for row in report["layers"]}
    assert {r["name"]: r["score"] for r in ranked} == pytest.approx(searched, rel=1e-9)


def test_export_without_the_export_module_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "autoquant.export", None)
    assert main(["export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx")]) == EXIT_ERROR
    assert "ONNX export is not available" in capsys.readouterr().err


def test_export_calls_export_saved_with_the_run_directory_and_inputs(tmp_path, monkeypatch):
    job = write_job(tmp_path)
    assert main(["run", str(job), "-q"]) == EXIT_OK
    calls = []
    fake = types.ModuleType("autoquant.export")
    fake.export_saved = lambda d, p, model, example_inputs, **options: calls.append(
        (d, p, options.get("opset"), example_inputs)) or p
    monkeypatch.setitem(sys.modules, "autoquant.export", fake)
    onnx = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "out"), "--onnx", str(onnx), "--opset", "17"]) == 0
    (directory, path, opset, inputs), = calls
    assert directory == tmp_path / "out" and path == onnx and opset == 17
    assert inputs[0].shape == (2, 8)


def test_job_export_section_writes_the_checked_onnx_file_and_the_deployed_metric(tmp_path,
                                                                                 capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    job = write_job(tmp_path, export="{input_names: [x], output_names: [y], "
                                     "dynamic_axes: {x: {0: n}}}", search=", verify_deploy: true")
    assert main(["run", str(job), "-q"]) == EXIT_OK
    out = tmp_path / "out"
    assert f"the ONNX model in {out / 'model_qdq.onnx'}" in capsys.readouterr().out
    graph = onnx.load(str(out / "model_qdq.onnx")).graph
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["y"]
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, report_schema())
    assert report["deployment"]["met_on_deploy"] is True
    figures = report["deployment"]["export"]
    assert figures["parity_ok"] and "integer kernels" in figures["integer_kernels"]["summary"]
    assert "latency_ratio" in figures and "Deployed in onnxruntime" in (out / "report.md"
                                                                       ).read_text()
    # `autoquant export` takes the job's export section, the flags override it
    again = tmp_path / "again.onnx"
    assert main(["export", str(out), "--onnx", str(again), "--input-names", "inputs",
                 "--dynamic-axes", "{inputs: [0]}", "-q"]) == EXIT_OK
    assert [i.name for i in onnx.load(str(again)).graph.input] == ["inputs"]


def test_bad_export_section_is_an_error_naming_the_line(tmp_path, capsys):
    job = write_job(tmp_path, export="{dynamic_axes: {x: {zero: n}}}")
    assert main(["run", str(job), "-q"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "job.yaml:" in err and "export.dynamic_axes" in err and "integer axes" in err


def test_ctrl_c_exits_130_and_report_then_describes_the_interrupted_run_not_an_old_one(
        tmp_path, capsys, monkeypatch):
    import jobhelpers

    job = write_job(tmp_path)
    assert main(["run", str(job), "-q"]) == EXIT_OK
    calls = []
    original = jobhelpers.TinyEvaluator.evaluate

    def interrupted(self, model):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, model)

    monkeypatch.setattr(jobhelpers.TinyEvaluator, "evaluate", interrupted)
    assert main(["run", str(job), "-q", "--overwrite"]) == EXIT_INTERRUPTED
    assert "--resume" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "out"), "-q"]) == EXIT_OK
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "interrupted" and report["counts"]["evaluations"] == 2


def test_version_and_help_answer_without_importing_torch():
    for flag in ("--version", "--help"):
        code = (f"import sys, runpy; sys.argv = ['autoquant', {flag!r}]\n"
                "try:\n    runpy.run_module('autoquant', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout
        assert out.strip().endswith("False"), out
        if flag == "--version":
            assert "autoquant 0.1.0" in out


def test_verbose_shows_autoquant_debug_lines_not_other_libraries(tmp_path, capsys):
    import logging

    from autoquant.jobs.cli import _setup_logging as setup
    from autoquant.jobs.cli import build_parser

    args = build_parser().parse_args(["report", str(tmp_path), "-v"])
    setup(args)
    logging.getLogger("matplotlib.font_manager").debug("font noise")
    logging.getLogger("autoquant.search").debug("our detail")
    err = capsys.readouterr().err
    assert "our detail" in err and "font noise" not in err


def test_eval_timeout_in_the_cli_exits_1_cleanly_while_the_abandoned_evaluation_computes(
        tmp_path):
    # the second evaluation computes in torch for 60 s; the CLI gives up on it after 0.5 s
    job = write_job(tmp_path, search=", eval_timeout: 0.5",
                    evaluator=", spin_on_call: 2, spin_seconds: 60")
    start = time.monotonic()
    proc = cli("run", str(job), "-q")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_ERROR, stderr  # not -6 (abort) from the shutdown
    assert "did not finish within eval_timeout=0.5s" in stderr
    assert "terminate called" not in stderr and "Traceback" not in stderr
    assert time.monotonic() - start < 40  # it did not wait for the abandoned call
    assert journal_trials(tmp_path / "out") == 1  # the float baseline is kept for --resume


KILL_BEFORE_JOURNALING = """\
import os, signal, sys
from autoquant.jobs.cli import main
from autoquant.jobs.journal import Journal
real, seen = Journal.append_record, []
def append_record(self, record):
    seen.append(record)
    if len(seen) == {k}:  # evaluate() returned; its journal line is not written yet
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, record)
Journal.append_record = append_record
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_after_evaluate_returns_before_its_journal_line_repeats_only_that_evaluation(
        tmp_path):
    assert main(["run", str(write_job(tmp_path / "ref")), "-q"]) == EXIT_OK
    reference = json.loads((tmp_path / "ref" / "out" / "report.json").read_text())
    job, folder = write_job(tmp_path / "run"), tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_JOURNALING.format(k=3), "run",
                           str(job), "-q"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    finished = [plan_key(e["plan"]) for e in evaluations(folder)]
    assert len(finished) == 3 and journal_trials(folder / "out") == 2  # the 3rd is lost

    assert main(["run", str(job), "--resume", "-q"]) == EXIT_OK
    new = jobhelpers.without_resume_check(evaluations(folder)[len(finished):])
    repeated = [plan_key(e["plan"]) for e in new if plan_key(e["plan"]) in finished]
    assert repeated == [finished[2]]  # exactly the evaluation whose line was not synced
    report = json.loads((folder / "out" / "report.json").read_text())
    for key in ("status", "plan", "fallback_layers", "metrics"):
        assert report[key] == reference[key], key


def test_a_layer_named_with_mathtext_and_html_runs_and_is_reported_as_text(tmp_path, capsys):
    job = write_job(tmp_path, quant="{default: {weight: {bits: 3}}}")
    job.write_text(job.read_text().replace(
        '"jobhelpers:build_model", kwargs: {depth: 6}',
        '"jobhelpers:build_renamed_model", kwargs: {depth: 6, first: "<i>cost$\\\\foo$"}'))
    assert main(["run", str(job), "-q"]) in (EXIT_OK, EXIT_NOT_MET)  # not an internal error
    out = tmp_path / "out"
    assert (out / "plots" / "sensitivity.png").is_file()
    assert "&lt;i&gt;cost$\\foo$" in (out / "report.html").read_text()
    assert "<i>" not in (out / "report.html").read_text() + (out / "report.md").read_text()
    assert main(["report", str(out), "-q"]) == EXIT_OK
