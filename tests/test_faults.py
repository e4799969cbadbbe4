"""Every fault autoquant promises to survive: one row per case, with the exception class and
the message it must raise, and the promise that nothing on disk changed or was half-written.

Each row's `case(tmp_path, monkeypatch)` prepares files and returns the action; the test
snapshots every file under ``tmp_path``, runs the action, checks the error, then checks that
no ``*.tmp`` file remains and every file is byte-for-byte what it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.config import QuantConfig
from autoquant.errors import (
    ConfigError,
    EvaluatorError,
    EvaluatorTimeoutError,
    ModelError,
    OutputError,
)
from autoquant.jobs.cli import build_parser
from autoquant.jobs.job import load_job
from autoquant.jobs.journal import JOURNAL_FILE, Journal, JournalMismatchError
from autoquant.search.strategy import TrialRecord
from tests.helpers.synthetic import DropEvaluator, ListEvaluator, linear_names, mlp

TESTS = Path(__file__).resolve().parent / "helpers"  # the job files' modules
sys.path.insert(0, str(TESTS))
import faulthelpers  # noqa: E402
import jobhelpers  # noqa: E402

PARTS = {"model": "m", "quant": "q", "search": "s"}


def search(evaluator, model=None, **kwargs):
    model = model if model is not None else mlp(3)
    kwargs.setdefault("max_loss", 0.1)
    return lambda: aq.auto_quantize(model, evaluator, **kwargs)


def job_file(folder: Path, *, evaluator: str = "jobhelpers:TinyEvaluator",
             eval_kwargs: str = "{depth: 3}", max_loss: float = 0.05, extra: str = "",
             model_extra: str = "", quant: str = "{default: {weight: {bits: 6}}}",
             depth: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(f"""\
python_path: [{TESTS}]
model: {{factory: "jobhelpers:build_model", kwargs: {{depth: {depth}}}{model_extra}}}
evaluator: {{class: "{evaluator}", kwargs: {eval_kwargs}}}
example_inputs: [{{shape: [2, 8]}}]
quant: {quant}
search: {{max_loss: {max_loss}{extra}}}
output_dir: out
""", encoding="utf-8")
    return path


def cli_run(job: Path, *flags: str):
    """The action of ``autoquant run JOB FLAGS`` that raises instead of printing (cmd_run)."""
    args = build_parser().parse_args(["run", str(job), "-q", *flags])
    return lambda: args.func(args)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A folder with a job and the output directory of its finished run."""
    folder = tmp_path_factory.mktemp("finished")
    job = job_file(folder)
    cli_run(job)()
    return folder


def copy_run(finished: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    text = (target / "job.yaml").read_text().replace(str(finished), str(target))
    (target / "job.yaml").write_text(text)
    return target


def fail_os_call(monkeypatch, target, name: str, code: int, after: int = 0) -> None:
    """Make `target.name` raise OSError(`code`) from its (after+1)-th call on."""
    real = getattr(target, name)
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, broken)


# -- the cases -------------------------------------------------------------------------------

def evaluator_raises_in_trial_2(tmp, mp):
    return search(ListEvaluator([0.9, 0.5, RuntimeError("boom")]))


def evaluator_returns(value, label: str):
    def case(tmp, mp):
        return search(ListEvaluator([value]))
    case.__name__ = f"evaluator_returns_{label}"
    return case


def evaluator_returns_nan_in_trial_1(tmp, mp):
    return search(ListEvaluator([0.9, float("nan")]))


def calibration_raises(tmp, mp):
    class Broken(DropEvaluator):
        def calibration(self, model):
            raise OSError("dataset missing")
    return search(Broken({}))


def calibration_runs_nothing(tmp, mp):
    class Lazy(DropEvaluator):
        def calibration(self, model):
            pass
    return search(Lazy({}))


def metric_eval_returns_junk(tmp, mp):
    class Junk(DropEvaluator):
        def metric_eval(self, original, new):
            return "yes"
    return search(Junk({}))


def evaluator_hangs_past_eval_timeout(tmp, mp):
    ev = faulthelpers.BlockingEvaluator(block_at=1, hang=5.0, depth=3)
    model = jobhelpers.build_model(depth=3)
    action = search(ev, model, eval_timeout=0.3)

    def run():
        try:
            action()
        finally:
            ev.release.set()  # let the abandoned evaluation end
    return run


def eval_timeout_is_negative(tmp, mp):
    return search(DropEvaluator({}), eval_timeout=-1)


def max_seconds_is_a_string(tmp, mp):
    return search(DropEvaluator({}), max_seconds="10")


def model_without_quantizable_layers(tmp, mp):
    return search(DropEvaluator({}), nn.Sequential(nn.ReLU(), nn.Tanh()))


def model_on_the_meta_device(tmp, mp):
    with torch.device("meta"):
        model = mlp(2)
    return search(DropEvaluator({}), model)


def model_partly_on_the_meta_device(tmp, mp):
    model = mlp(2)
    model[2] = nn.Linear(8, 8, device="meta")
    return search(DropEvaluator({}), model)


def model_does_not_run_on_example_inputs(tmp, mp):
    return search(DropEvaluator({}), mlp(2), example_inputs=(torch.ones(2, 5),))


def model_is_not_a_module(tmp, mp):
    return search(DropEvaluator({}), lambda x: x)


def model_is_torchscript(tmp, mp):
    return search(DropEvaluator({}), torch.jit.script(mlp(2)))


def saved_result(tmp: Path) -> Path:
    result = aq.auto_quantize(mlp(3), DropEvaluator({"0": 0.5}), max_loss=0.1)
    return result, result.save(tmp / "saved")


def read_only_output_dir(tmp, mp):
    result, out = saved_result(tmp)
    fail_os_call(mp, tempfile, "mkstemp", errno.EROFS)
    return lambda: result.save(out)


def disk_full_while_saving_over_a_previous_result(tmp, mp):
    result, out = saved_result(tmp)
    fail_os_call(mp, os, "fsync", errno.ENOSPC)
    return lambda: result.save(out)


class _FillsUp:
    """A file handle on a disk that fills up after `room` bytes."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def disk_full_in_the_middle_of_writing_the_model(tmp, mp):
    result, out = saved_result(tmp)
    real = os.fdopen
    mp.setattr(os, "fdopen", lambda fd, *a, **k: _FillsUp(real(fd, *a, **k), room=2000))
    assert (out / "quant_config.yaml").stat().st_size < 2000 < (out / "model_state.pt").stat(
    ).st_size  # the config fits, the model does not
    return lambda: result.save(out)


def disk_full_while_journaling(tmp, mp, after: int = 0):
    journal = Journal.open(tmp / "out", PARTS, resume=False)
    fail_os_call(mp, os, "fsync", errno.ENOSPC, after=after)  # `after` trials are journaled
    names = linear_names(4)
    return search(DropEvaluator(dict.fromkeys(names, 0.2)), mlp(4),
                  on_record=journal.append_record)


def output_dir_of_another_job_without_resume(tmp, mp):
    run = copy_run(_FINISHED[0], tmp)
    return cli_run(job_file(tmp / "other", max_loss=0.2), "--output-dir", str(run / "out"))


def output_dir_of_another_job_with_resume(tmp, mp):
    run = copy_run(_FINISHED[0], tmp)
    return cli_run(job_file(tmp / "other", max_loss=0.2), "--output-dir", str(run / "out"),
                   "--resume")


def output_dir_in_use_by_a_running_job(tmp, mp):
    from autoquant.jobs.rundir import lock_output_dir

    run = copy_run(_FINISHED[0], tmp)
    action = cli_run(run / "job.yaml", "--resume")

    def run_while_locked():
        with lock_output_dir(run / "out"):  # what the other process holds while it runs
            action()
    return run_while_locked


def output_dir_with_results_but_no_journal(tmp, mp):
    saved_result(tmp)
    return cli_run(job_file(tmp / "job"), "--output-dir", str(tmp / "saved"))


def cli_report(folder: Path):
    args = build_parser().parse_args(["report", str(folder), "-q"])
    return lambda: args.func(args)


def report_json_is_not_a_report(tmp, mp):
    (tmp / "report.json").write_text("[1, 2, 3]\n")
    return cli_report(tmp)


def yaml_bomb_in_the_job_copy_of_an_interrupted_run(tmp, mp):
    journal(tmp, [])
    (tmp / "job.yaml").write_text(BOMB + "\n")
    return cli_report(tmp)


def journal(tmp: Path, lines: list[str]) -> Path:
    Journal.open(tmp, PARTS, resume=False).append_record(
        TrialRecord(0, "float", {"0": "float"}, [], 1.0, 0.0, True, 0.1))
    path = tmp / JOURNAL_FILE
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


def journal_with_a_corrupt_middle_line(tmp, mp):
    journal(tmp, ["{not json", '{"type": "trial", "record": {}}'])
    return lambda: Journal.open(tmp, PARTS, resume=True)


def journal_with_an_invalid_record(tmp, mp):
    journal(tmp, ['{"type": "trial", "record": {"index": 1}}'])
    return lambda: Journal.open(tmp, PARTS, resume=True)


def journal_without_a_header(tmp, mp):
    (tmp / JOURNAL_FILE).write_text('{"type": "trial", "record": {}}\n{}\n')
    return lambda: Journal.open(tmp, PARTS, resume=True)


def journal_of_binary_garbage(tmp, mp):
    (tmp / JOURNAL_FILE).write_bytes(bytes(range(11, 256)) + b"\n" * 2 + b"{}\n")
    return lambda: Journal.open(tmp, PARTS, resume=True)


def checkpoint(tmp: Path, obj, raw: bytes | None = None) -> Path:
    path = tmp / "weights.pt"
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(obj, path)
    job = job_file(tmp, model_extra=", checkpoint: weights.pt")
    return lambda: load_job(job).build_model()


def checkpoint_is_a_pickled_full_model(tmp, mp):
    return checkpoint(tmp, jobhelpers.build_model(depth=3))


def checkpoint_is_a_list(tmp, mp):
    return checkpoint(tmp, [torch.zeros(2)])


def checkpoint_is_a_training_checkpoint(tmp, mp):
    return checkpoint(tmp, {"state_dict": jobhelpers.build_model(depth=3).state_dict(),
                            "epoch": 3})


def checkpoint_is_garbage(tmp, mp):
    return checkpoint(tmp, None, raw=b"\x00not a checkpoint" * 10)


def checkpoint_of_another_architecture(tmp, mp):
    return checkpoint(tmp, jobhelpers.build_model(depth=5).state_dict())


def saved_model_state_is_not_a_state_dict(tmp, mp):
    _, out = saved_result(tmp)
    torch.save(["not", "a", "state", "dict"], out / "model_state.pt")
    return lambda: aq.load_quantized(mlp(3), out)


BOMB = "\n".join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)])


def yaml_bomb_job_file(tmp, mp):
    path = tmp / "bomb.yaml"
    path.write_text(BOMB + "\n")
    return lambda: load_job(path)


def yaml_bomb_quant_config(tmp, mp):
    path = tmp / "quant.yaml"
    path.write_text(BOMB + "\n")
    job = job_file(tmp, quant=str(path))
    return lambda: load_job(job).quant_config()


# -- hostile or mistaken input files ---------------------------------------------------------

NESTED = "[" * 200_000


def job_file_in_latin_1(tmp, mp):
    job = job_file(tmp)
    job.write_bytes(job.read_bytes() + "# r\u00e9sum\u00e9 of the run\n".encode("latin-1"))
    return cli_run(job)


def quant_config_file_in_latin_1(tmp, mp):
    (tmp / "quant.yaml").write_bytes("# caf\u00e9\ndefault: {weight: {bits: 6}}\n".encode(
        "latin-1"))
    return cli_run(job_file(tmp, quant=str(tmp / "quant.yaml")))


def job_file_nested_200000_deep(tmp, mp):
    return cli_run(job_file(tmp, eval_kwargs=NESTED))


def quant_config_nested_200000_deep(tmp, mp):
    (tmp / "quant.yaml").write_text(f"default: {NESTED}\n")
    return cli_run(job_file(tmp, quant=str(tmp / "quant.yaml")))


def example_inputs_of_absurd_size(tmp, mp):
    job = job_file(tmp)
    job.write_text(job.read_text().replace("[2, 8]", "[100000, 100000, 100000]"))
    return cli_run(job)


def seed_beyond_64_bits(tmp, mp):
    job = job_file(tmp)
    job.write_text(f"seed: {2 ** 70}\n" + job.read_text())
    return cli_run(job)


def optuna(storage: str, label: str):
    def case(tmp, mp):
        mp.chdir(tmp)
        return cli_run(job_file(tmp, extra=f", strategy: optuna, strategy_options: "
                                            f"{{storage: '{storage}', study_name: s}}"))
    case.__name__ = f"optuna_storage_{label}"
    return case


def strategy_that_fails_only_when_the_run_builds_it(tmp, mp):
    from autoquant.settings import SearchSettings

    real, calls = SearchSettings.make_strategy, []

    def flaky(self):  # passes the job file's check, fails when the run builds it
        calls.append(1)
        if len(calls) > 1:
            raise ConfigError("strategy option storage: the database went away")
        return real(self)

    mp.setattr(SearchSettings, "make_strategy", flaky)
    return cli_run(job_file(tmp))


def journal_jsonl_is_a_folder(tmp, mp, *flags: str):
    (tmp / "out" / JOURNAL_FILE).mkdir(parents=True)
    (tmp / "out" / JOURNAL_FILE / "keep").write_text("not a journal\n")
    return cli_run(job_file(tmp), *flags)


def journal_jsonl_is_a_folder_with_resume(tmp, mp):
    return journal_jsonl_is_a_folder(tmp, mp, "--resume")


def saving_a_result_onto_an_existing_file(tmp, mp):
    result = aq.auto_quantize(mlp(3), DropEvaluator({"0": 0.5}), max_loss=0.1)
    (tmp / "result").write_text("my notes\n")
    return lambda: result.save(tmp / "result")


def report_json(tmp: Path, edit) -> Path:
    """A finished run's report.json, copied into `tmp` and changed by `edit(report)`."""
    report = json.loads((_FINISHED[0] / "out" / "report.json").read_text())
    edit(report)
    (tmp / "report.json").write_text(json.dumps(report))
    return cli_report(tmp)


def report_json_with_a_script_as_trial_index(tmp, mp):
    return report_json(tmp, lambda r: r["trials"][0].update(index="<script>alert(1)</script>"))


def report_json_with_a_string_metric(tmp, mp):
    return report_json(tmp, lambda r: r["metrics"].update(final="0.9"))


def report_json_with_a_string_max_loss(tmp, mp):
    return report_json(tmp, lambda r: r["settings"].update(max_loss="a lot"))


def report_json_nested_200000_deep(tmp, mp):
    (tmp / "report.json").write_text(NESTED)
    return cli_report(tmp)


def tampered_journal(field: str, value, label: str):
    """Resume a copy of the finished run whose second trial line says ``field: value``."""
    def case(tmp, mp):
        run = copy_run(_FINISHED[0], tmp)
        path = run / "out" / JOURNAL_FILE
        lines = path.read_text().splitlines()
        trials = [i for i, line in enumerate(lines) if '"type": "trial"' in line]
        entry = json.loads(lines[trials[1]])
        entry["record"][field] = value
        lines[trials[1]] = json.dumps(entry)
        path.write_text("\n".join(lines) + "\n")
        return cli_run(run / "job.yaml", "--resume")
    case.__name__ = f"journal_record_with_{label}"
    return case


FAULTS = [
    # evaluator faults
    (evaluator_raises_in_trial_2, EvaluatorError,
     r"ListEvaluator\.evaluate\(\) in trial 2 \(.*\) raised RuntimeError: boom"),
    (evaluator_returns(float("nan"), "nan"), EvaluatorError,
     r"evaluate\(\) in trial 0 .*returned nan"),
    (evaluator_returns_nan_in_trial_1, EvaluatorError, r"in trial 1 .*returned nan"),
    (evaluator_returns(float("inf"), "inf"), EvaluatorError, r"returned inf; expected a finite"),
    (evaluator_returns(None, "none"), EvaluatorError,
     r"returned NoneType .*expected a real number"),
    (evaluator_returns("0.9", "str"), EvaluatorError, r"returned str '0\.9'"),
    (evaluator_returns(torch.tensor(0.9), "tensor"), EvaluatorError,
     r"a tensor or array: return float"),
    (evaluator_returns(True, "bool"), EvaluatorError, r"returned bool"),
    (calibration_raises, EvaluatorError, r"calibration\(\) raised OSError: dataset missing"),
    (calibration_runs_nothing, EvaluatorError, r"ran no forward pass"),
    (metric_eval_returns_junk, EvaluatorError, r"metric_eval\(\) returned 'yes'"),
    (evaluator_hangs_past_eval_timeout, EvaluatorTimeoutError,
     r"evaluate\(\) in trial 1 .* did not finish within eval_timeout=0\.3s"),
    (eval_timeout_is_negative, ConfigError, r"eval_timeout must be a number of seconds > 0"),
    (max_seconds_is_a_string, ConfigError, r"max_seconds must be a number of seconds > 0"),
    # model oddities
    (model_without_quantizable_layers, ModelError, r"no quantizable layer"),
    (model_on_the_meta_device, ModelError, r"on the 'meta' device .*to_empty"),
    (model_partly_on_the_meta_device, ModelError, r"2 parameter\(s\)/buffer\(s\) .*meta"),
    (model_does_not_run_on_example_inputs, ModelError, r"does not run on example_inputs"),
    (model_is_not_a_module, ModelError, r"must be a torch\.nn\.Module"),
    (model_is_torchscript, ModelError, r"TorchScript module .*pass the Python nn\.Module"),
    # files
    (read_only_output_dir, OutputError, r"quant_config\.yaml.*read-only"),
    (disk_full_while_saving_over_a_previous_result, OutputError, r"disk is full"),
    (disk_full_in_the_middle_of_writing_the_model, OutputError,
     r"model_state\.pt.*disk is full"),
    (disk_full_while_journaling, OutputError, r"journal\.jsonl.*disk is full"),
    (output_dir_of_another_job_without_resume, ConfigError,
     r"already exists from an earlier run; pass --resume"),
    (output_dir_of_another_job_with_resume, JournalMismatchError,
     r"written by a different run: the search settings"),
    (output_dir_in_use_by_a_running_job, ConfigError,
     r"another autoquant run is writing into .*/run/out right now"),
    (output_dir_with_results_but_no_journal, ConfigError,
     r"already holds results \(report\.json, quant_config\.yaml, model_state\.pt\) but no "
     r"journal"),
    (report_json_is_not_a_report, ConfigError, r"report\.json is not an autoquant report"),
    (yaml_bomb_in_the_job_copy_of_an_interrupted_run, ConfigError, r"YAML alias \*a"),
    (journal_with_a_corrupt_middle_line, ConfigError, r"line 3 is corrupt"),
    (journal_with_an_invalid_record, ConfigError, r"line 3 is not a valid trial entry"),
    (journal_without_a_header, ConfigError, r"first line is not a journal header"),
    (journal_of_binary_garbage, ConfigError, r"line 1 is corrupt"),
    (checkpoint_is_a_pickled_full_model, ModelError,
     r"cannot be loaded as a state dict \(UnpicklingError.*arbitrary code"),
    (checkpoint_is_a_list, ModelError, r"holds a list, not a state dict"),
    (checkpoint_is_a_training_checkpoint, ModelError, r"use its 'state_dict' entry"),
    (checkpoint_is_garbage, ModelError, r"cannot be loaded as a state dict"),
    (checkpoint_of_another_architecture, ModelError, r"cannot load checkpoint .* into the "
                                                     r"model"),
    (saved_model_state_is_not_a_state_dict, ModelError, r"saved quantized model .*holds a list"),
    (yaml_bomb_job_file, ConfigError, r"bomb\.yaml: line 2: YAML alias \*a is not allowed"),
    (yaml_bomb_quant_config, ConfigError, r"quant\.yaml: line 2: YAML alias \*a"),
    # hostile or mistaken input files
    (job_file_in_latin_1, ConfigError,
     r"job\.yaml: line 8: byte 0xe9 is not UTF-8; .*Re-save it as UTF-8"),
    (quant_config_file_in_latin_1, ConfigError,
     r"quant\.yaml: line 1: byte 0xe9 is not UTF-8; a quant config must be UTF-8"),
    (job_file_nested_200000_deep, ConfigError, r"job\.yaml: line 3: the YAML nests deeper "
                                               r"than 100 levels"),
    (quant_config_nested_200000_deep, ConfigError, r"quant\.yaml: line 1: the YAML nests "
                                                   r"deeper than 100 levels"),
    (example_inputs_of_absurd_size, ConfigError,
     r"job\.yaml:4: example_inputs\.0\.shape: \[100000, 100000, 100000\] makes 1e\+15 "
     r"elements .*use a small batch"),
    (seed_beyond_64_bits, ConfigError, r"job\.yaml:1: seed: 1180591620717411303424 is out of "
                                       r"range: torch\.manual_seed takes a 64-bit seed"),
    (optuna("sqlite:///missing/folder/x.db", "in_a_missing_folder"), ConfigError,
     r"search\.strategy_options: .*the folder '.*/missing/folder' of the SQLite file does "
     r"not exist .*create it"),
    (optuna("study.db", "that_is_not_a_url"), ConfigError,
     r"search\.strategy_options: .*storage 'study\.db' is not a database URL .*sqlite:///"),
    (strategy_that_fails_only_when_the_run_builds_it, ConfigError, r"the database went away"),
    (journal_jsonl_is_a_folder, ConfigError,
     r"out/journal\.jsonl is a folder .*not a journal; remove or rename it"),
    (journal_jsonl_is_a_folder_with_resume, ConfigError,
     r"out/journal\.jsonl is a folder .*not a journal; remove or rename it"),
    (saving_a_result_onto_an_existing_file, OutputError,
     r"cannot write into '.*/result': it is a file, but .* must be a folder"),
    (report_json_with_a_script_as_trial_index, ConfigError,
     r"report\.json is not an autoquant report: trials\[0\]\.index: expected an integer, "
     r"got str '<script>"),
    (report_json_with_a_string_metric, ConfigError,
     r"metrics\.final: expected a number or null, got str '0\.9'.*rerun `autoquant run`"),
    (report_json_with_a_string_max_loss, ConfigError, r"settings\.max_loss: expected a number"),
    (report_json_nested_200000_deep, ConfigError, r"report\.json: report is nested absurdly "
                                                  r"deep"),
    (tampered_journal("passed", "false", "passed_as_a_string"), ConfigError,
     r"journal\.jsonl: line 4 is not a valid trial entry .*passed must be true or false .*"
     r"got str 'false'"),
    (tampered_journal("metric", float("nan"), "a_nan_metric"), ConfigError,
     r"line 4 is not a valid trial entry .*metric must be a finite number, got float nan"),
    (tampered_journal("plan", {"0": "w99a8", "2": "float", "4": "float"}, "an_unknown_scheme"),
     ConfigError, r"line 4 is not a valid trial entry .*plan\['0'\]: scheme 'w99a8' has a "
                  r"bit width outside"),
]

_FINISHED: list[Path] = []


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("case, error, pattern",
                         [pytest.param(*row, id=row[0].__name__) for row in FAULTS])
def test_fault_raises_a_clear_error_and_changes_no_file(case, error, pattern, tmp_path,
                                                        monkeypatch, finished_run):
    _FINISHED[:] = [finished_run]
    action = case(tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    with pytest.raises(error, match=pattern):
        action()
    monkeypatch.undo()
    after = snapshot(tmp_path)
    assert not [name for name in after if name.endswith(".tmp")]
    assert after == before  # nothing half-written, nothing overwritten, nothing new


def test_every_fault_row_is_unique_and_named():
    names = [row[0].__name__ for row in FAULTS]
    assert len(names) == len(set(names))


def test_disk_full_journal_keeps_every_line_before_the_failure(tmp_path, monkeypatch):
    action = disk_full_while_journaling(tmp_path, monkeypatch, after=2)
    with pytest.raises(OutputError):
        action()
    monkeypatch.undo()
    lines = (tmp_path / "out" / JOURNAL_FILE).read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["header", "trial", "trial"]
    assert len(Journal.open(tmp_path / "out", PARTS, resume=True).records) == 2


def test_real_read_only_directory_is_an_output_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the monkeypatched row covers it")
    result, out = saved_result(tmp_path)
    before = snapshot(out)
    out.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="ermission denied"):
            result.save(out)
    finally:
        out.chmod(0o755)
    assert snapshot(out) == before


def test_yaml_bomb_is_refused_before_any_expansion():
    with pytest.raises(ConfigError, match="alias"):
        QuantConfig.from_yaml(BOMB)


def test_cli_reports_a_full_disk_as_an_error_without_a_traceback(tmp_path, monkeypatch,
                                                                  capsys):
    from autoquant.jobs.cli import EXIT_ERROR, main

    job = job_file(tmp_path)
    fail_os_call(monkeypatch, os, "fsync", errno.ENOSPC)
    assert main(["run", str(job), "-q"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "autoquant: error: cannot write" in err and "disk is full" in err
    assert "Traceback" not in err and "internal error" not in err
    assert not list((tmp_path / "out").glob("*.tmp")) if (tmp_path / "out").exists() else True
