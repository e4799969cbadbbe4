"""Reports and progress: report.json schema, report.md/html with plots, tqdm bars."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

import autoquant as aq
from autoquant.jobs.journal import Journal, read_journal
from autoquant.jobs.progress import ProgressBars, bars_enabled
from autoquant.report.build import report_from_journal, report_schema
from autoquant.report.render import render_report, summary_lines, threshold_metric

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
import jobhelpers  # noqa: E402

CONFIG = {"default": {"weight": {"bits": 6}, "activation": {"bits": 6}}}


@pytest.fixture(scope="module")
def result():
    return aq.auto_quantize(jobhelpers.build_model(depth=6), jobhelpers.TinyEvaluator(depth=6),
                            (torch.ones(2, 8),), max_loss=0.03, config=CONFIG)


def test_report_of_a_library_search_validates_against_the_schema(result):
    report = result.to_report()
    jsonschema.validate(report, report_schema())
    assert report["schema_version"] == 2 and report["job"] is None
    assert report["fallback_layers"] == result.fallback_layers


def test_schema_rejects_a_report_missing_a_field_or_with_a_bad_status(result):
    report = result.to_report()
    broken = {k: v for k, v in report.items() if k != "metrics"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, report_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**report, "status": "great"}, report_schema())


def test_markdown_and_html_carry_summary_plots_and_the_layer_table(result, tmp_path):
    report = result.to_report()
    written = render_report(report, tmp_path)
    assert {p.name for p in written} == {"sensitivity.png", "trajectory.png", "report.md",
                                         "report.html"}
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    n = len(result.layers)
    assert f"Layers quantized: {len(result.quantized_layers)}/{n}" in md
    assert "![Sensitivity](plots/sensitivity.png)" in md
    for name in result.fallback_layers:
        assert f"| {name} | Linear |" in md and "fell back" in md
    assert html.count("<img alt=") == 2 and "src='plots/" not in html
    assert (tmp_path / "plots" / "trajectory.png").read_bytes()[:4] == b"\x89PNG"


def test_reports_render_without_matplotlib(result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    written = render_report(result.to_report(), tmp_path)
    assert {p.name for p in written} == {"report.md", "report.html"}
    assert "<img" not in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("higher, loss_type, expected", [
    (True, "absolute", 0.98), (False, "absolute", 1.02), (True, "relative", 0.98 * 1.0),
    (False, "relative", 1.02)])
def test_threshold_line_follows_direction_and_loss_type(higher, loss_type, expected):
    report = {"metrics": {"float": 1.0}, "settings": {"max_loss": 0.02, "loss_type": loss_type,
                                                      "higher_is_better": higher}}
    assert threshold_metric(report) == pytest.approx(expected)
    report["metrics"]["float"] = -2.0
    if loss_type == "relative":  # relative to |float|, never flipping the direction
        assert threshold_metric(report) == pytest.approx(-2.0 + (0.04 if not higher else -0.04))


def test_report_rebuilt_from_an_unfinished_journal_is_interrupted_and_schema_valid(tmp_path):
    journal = Journal.open(tmp_path, {"model": "m"}, resume=False)
    aq.auto_quantize(jobhelpers.build_model(depth=6), jobhelpers.TinyEvaluator(depth=6),
                     (torch.ones(2, 8),), max_loss=0.03, config=CONFIG, max_evaluations=3,
                     on_record=journal.append_record,
                     progress=lambda s, e, **i: journal.append_ranking(i["ranking"])
                     if (s, e) == ("sensitivity", "end") else None)
    report = report_from_journal(read_journal(journal.path), {"search": {"max_loss": 0.03}})
    jsonschema.validate(report, report_schema())
    assert report["status"] == "interrupted" and report["counts"]["evaluations"] == 3
    assert any("stopped after 3 evaluation" in line for line in summary_lines(report))
    render_report(report, tmp_path)
    assert "INTERRUPTED" in (tmp_path / "report.md").read_text()


def test_progress_bars_show_calibration_sensitivity_and_search(capsys):
    bars = ProgressBars(enabled=True)
    result = aq.auto_quantize(jobhelpers.build_model(depth=6), jobhelpers.TinyEvaluator(depth=6),
                              (torch.ones(2, 8),), max_loss=0.03, config=CONFIG, progress=bars)
    bars.close()
    err = capsys.readouterr().err
    assert "calibration: 3batch" in err  # TinyEvaluator calibrates on 3 batches
    # one pass over the 3 batches, or two (the gradient pass's second stage): done either way
    assert "sensitivity: 100%" in err and ("3/3" in err or "6/6" in err)
    n = result.num_evaluations
    assert "search: 100%" in err and f"{n}/{n}" in err


def test_bars_are_off_when_quiet_or_stderr_is_not_a_terminal(capsys):
    assert bars_enabled(quiet=True) is False
    assert bars_enabled() is False  # pytest captures stderr: not a TTY
    ProgressBars(enabled=False)("search", "start", total=3)
    assert capsys.readouterr().err == ""


def test_report_json_from_cli_run_round_trips_through_report_command(tmp_path, result, capsys):
    from autoquant.jobs.cli import main

    result.save(tmp_path)
    (tmp_path / "report.md").unlink(missing_ok=True)
    assert main(["report", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["status"] == result.status


HOSTILE = "<script>alert('x')</script> | cost$\\foo$ & more"


def test_hostile_layer_names_and_labels_are_text_in_html_markdown_and_plots(result, tmp_path):
    report = result.to_report()
    report["layers"][0]["name"] = HOSTILE
    report["fallback_layers"] = [HOSTILE]
    report["trials"][0]["label"] = "<img src=x onerror=alert(1)>"
    report["reason"] = "<b>bold</b>"
    written = render_report(report, tmp_path)  # matplotlib would fail on the mathtext
    assert "sensitivity.png" in {p.name for p in written}
    html = (tmp_path / "report.html").read_text()
    md = (tmp_path / "report.md").read_text()
    for page in (html, md):
        assert "<script>" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert "&lt;script&gt;" in html and "&lt;img src=x" in html
    assert "&lt;script&gt;alert('x')&lt;/script&gt; \\| cost$\\foo$ &amp; more" in md


def test_the_built_in_report_check_agrees_with_jsonschema(result):
    from autoquant.report.validate import schema_problem

    schema = report_schema()
    good = result.to_report()
    assert schema_problem(good, schema) is None
    cases = [("status", "great"), ("met", "yes"), ("counts", {"layers": 1}),
             ("trials", [{**good["trials"][0], "index": "<script>"}]),
             ("trials", [{**good["trials"][0], "passed": 1}]),
             ("metrics", {**good["metrics"], "final": "0.9"}),
             ("settings", {**good["settings"], "higher_is_better": "no"}),
             ("layers", [{**good["layers"][0], "rank": 1.5}]), ("schema_version", 3)]
    for key, value in cases:
        bad = {**good, key: value}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        assert schema_problem(bad, schema) is not None, key
    assert schema_problem({**good, "trials": [{**good["trials"][0], "index": 2.0}]},
                          schema) is None  # 2.0 is an integer to JSON Schema too


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_artifact_honours_the_umask(result, tmp_path, umask):
    previous = os.umask(umask)
    try:
        result.save(tmp_path / "saved")
        render_report(result.to_report(), tmp_path / "saved")
        Journal.open(tmp_path / "saved", {"model": "m"}, resume=False)
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "saved").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"quant_config.yaml", "model_state.pt", "report.json",
                                       "report.md", "report.html", "journal.jsonl",
                                       "sensitivity.png"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == \
        {p.name: oct(0o666 & ~umask) for p in files}


def test_report_names_the_ranking_used_with_its_audit_and_where_trials_ran(result, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    lines = summary_lines(result.to_report())
    assert "Ranking: cosine, auto: gradient scope (not audited: set audit=K" in "\n".join(lines)
    with ThreadPoolExecutor(2) as pool:
        audited = aq.auto_quantize(
            jobhelpers.build_model(depth=6), jobhelpers.TinyEvaluator(depth=6),
            (torch.ones(2, 8),), max_loss=0.03, config=CONFIG, sensitivity="mse",
            sensitivity_scope="output", audit=3, executor=pool, workers=2)
    render_report(audited.to_report(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    rho = audited.checks["audit"]["spearman_rho"]
    assert (f"Ranking: mse, output scope; audit of 3 layer(s) alone quantized: Spearman rho "
            f"{rho:.2f}") in md
    significant = audited.checks["audit"]["significant"]
    assert (f"{len(significant)} lose(s) a quarter of the budget or more alone" in md
            if significant else "no layer loses a quarter of the budget alone" in md)
    assert "Trials ran on ThreadPoolExecutor, 2 at a time" in md
