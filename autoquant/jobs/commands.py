"""What each ``autoquant`` subcommand does (`autoquant.jobs.cli` parses the arguments).

Heavy imports (torch, the search) happen inside each command, so ``autoquant --help`` and
``--version`` stay instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from autoquant.errors import ConfigError
from autoquant.io.names import JOB_COPY, REPORT_FILE, SENSITIVITY_FILE

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_NOT_MET", "EXIT_FLOAT_ONLY", "EXIT_INTERRUPTED",
           "cmd_run", "cmd_init_config", "cmd_sensitivity", "cmd_report", "cmd_export"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_MET = 2
EXIT_FLOAT_ONLY = 3  # only the float model met the budget: nothing stays quantized
EXIT_INTERRUPTED = 130


# -- run ---------------------------------------------------------------------------------------

def _fingerprint(job: Any, model: Any, settings: Any, config: Any) -> dict[str, str]:
    """The journal fingerprint: the model's weights, the quant config for the resolved
    deploy target (records are only valid for the target they were made on), the
    evaluator and the settings a record depends on (`SearchSettings.fingerprint`)."""
    from autoquant.jobs.journal import fingerprint
    from autoquant.quant.target import resolve_target

    quant = {**config.to_dict(), "target": resolve_target(config.target)}
    return fingerprint(model, quant, {"evaluator": job.config.evaluator,
                                      "search": settings.fingerprint()})


def cmd_run(args: argparse.Namespace) -> int:
    """``autoquant run``: the search as a resumable batch job (one run per output dir)."""
    from autoquant.jobs.job import load_job
    from autoquant.jobs.rundir import lock_output_dir

    job = load_job(args.job)
    out = (args.output_dir or job.config.output_dir).resolve()
    with lock_output_dir(out):  # a second run into the same folder would mix journals
        return _run_locked(args, job, out)


def _run_locked(args: argparse.Namespace, job: Any, out: Path) -> int:
    from autoquant.api import auto_quantize
    from autoquant.io.atomic import atomic_write_text
    from autoquant.io.names import JOURNAL_FILE
    from autoquant.jobs.journal import Journal
    from autoquant.jobs.progress import ProgressBars, bars_enabled
    from autoquant.jobs.rundir import check_output_dir
    from autoquant.report.build import build_report
    from autoquant.report.render import render_report

    settings, config = job.settings(), job.quant_config()  # fail before anything heavy
    overrides = {k: v for k in ("executor", "workers")
                 if (v := getattr(args, k, None)) is not None}
    settings = settings.replace(**overrides) if overrides else settings
    settings.make_strategy()  # bad strategy options fail before the journal exists
    model = job.build_model()
    evaluator = job.build_evaluator()
    inputs = job.example_inputs()
    parts = _fingerprint(job, model, settings, config)
    check_output_dir(out, out / JOURNAL_FILE, resume=args.resume, overwrite=args.overwrite)
    journal = Journal.open(out, parts, resume=args.resume, overwrite=args.overwrite,
                           meta={"job": str(job.path)})
    job.save(out / JOB_COPY)
    # A report of an earlier run would now describe the wrong run (`autoquant report` must
    # rebuild from the journal if this one is interrupted).
    (out / REPORT_FILE).unlink(missing_ok=True)
    bars = ProgressBars(bars_enabled(args.quiet))

    def progress(stage: str, event: str, **info: Any) -> None:
        if stage == "sensitivity" and event == "end" and not info.get("reused"):
            journal.append_ranking(info["ranking"])
        bars(stage, event, **info)

    reused = len(journal.records)
    try:
        with bars.logging_redirected():
            result = auto_quantize(model, evaluator, inputs, settings, config=config,
                                   on_record=journal.append_record, preloaded=journal.records,
                                   ranking=journal.ranking, progress=progress)
    finally:
        bars.close()
    spec, onnx_file = job.config.export, None
    if spec is not None:  # the deployed artifact, checked and measured, into the report
        target = Path(spec["path"]).expanduser()
        onnx_file = result.export_onnx(target if target.is_absolute() else out / target,
                                       strict=spec["strict"], **job.export_options())
    result.save(out)
    reused_records = [r for r in result.history if r in journal.records]
    run = {"resumed": bool(args.resume and reused), "reused_evaluations": len(reused_records),
           "new_evaluations": result.num_evaluations - len(reused_records),
           "reused_evaluator_seconds": sum(r.seconds for r in reused_records),
           "journal": str(journal.path)}
    report = build_report(result, job=job.resolved(), run=run)
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    render_report(report, out)
    print(result.summary())
    print(f"results in {out} (report.html, report.md, report.json, quant_config.yaml, "
          "model_state.pt)" + (f"; the ONNX model in {onnx_file}" if onnx_file else ""))
    if result.status == "float_only":
        return EXIT_FLOAT_ONLY
    return EXIT_OK if result.met else EXIT_NOT_MET


# -- init-config / sensitivity ---------------------------------------------------------------

def cmd_init_config(args: argparse.Namespace) -> int:
    """``autoquant init-config``: the editable per-layer quant config of the job's model."""
    from autoquant.config import QuantConfig
    from autoquant.jobs.job import load_job
    from autoquant.quant.qmodel import QuantModel, find_quantizable_layers

    job = load_job(args.job)
    quant = job.config.quant
    if args.output is not None:
        target = args.output.resolve()
    elif isinstance(quant, Path):
        target = quant
    else:
        target = job.path.parent / "quant.yaml"
    if target.exists() and not args.force:
        raise ConfigError(f"{target} already exists; pass --force to overwrite it or -o to "
                          "write elsewhere")
    base = QuantConfig.from_dict(quant) if isinstance(quant, dict) else QuantConfig()
    model = job.build_model()
    names = find_quantizable_layers(model)
    base.check_layers(names)
    QuantModel(model, base, job.example_inputs())  # the model runs on the example inputs
    skipped = set(base.skip_layers)
    layers = {n: base.layer_config(n).to_dict() for n in names if n not in skipped}
    cfg = QuantConfig(default=base.default, layers=layers, skip_layers=base.skip_layers,
                      fold_bn=base.fold_bn)
    cfg.save(target)
    print(f"wrote the quant config of {len(layers)} layer(s) to {target}")
    if not isinstance(quant, Path) or quant != target:
        print(f"to use it, set `quant: {target}` in {job.path}")
    return EXIT_OK


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """``autoquant sensitivity``: calibrate and rank layers, no search."""
    from autoquant.calibration.refine import calibrate_model
    from autoquant.evaluation.adapter import EvaluatorAdapter
    from autoquant.io.atomic import atomic_write_text
    from autoquant.jobs.job import load_job
    from autoquant.jobs.progress import ProgressBars, bars_enabled
    from autoquant.quant.qmodel import QuantModel
    from autoquant.sensitivity.output import rank_layers

    job = load_job(args.job)
    out = (args.output_dir or job.config.output_dir).resolve()
    cfg = job.quant_config()
    model, adapter = job.build_model(), EvaluatorAdapter(job.build_evaluator())
    qmodel = QuantModel(model, cfg, job.example_inputs())
    bars = ProgressBars(bars_enabled(args.quiet))
    start = time.perf_counter()
    try:
        with bars.logging_redirected():
            bars("calibration", "start", model=qmodel.model)
            calibrate_model(qmodel, adapter.calibrate)  # as `run` calibrates
            bars("calibration", "end")
            bars("sensitivity", "start", model=qmodel.model)
            ranking = rank_layers(qmodel, adapter.calibrate, job.config.search["sensitivity"],
                                  scope=job.config.search["sensitivity_scope"],
                                  evaluator=adapter,
                                  fraction=job.config.search["sensitivity_fraction"])
            bars("sensitivity", "end")
    finally:
        bars.close()
    rows = {r["name"]: r for r in qmodel.layer_rows()}
    data = {"sensitivity": job.config.search["sensitivity"],
            "sensitivity_scope": job.config.search["sensitivity_scope"],
            "seconds": time.perf_counter() - start,
            "ranking": [{**r.to_dict(), "type": rows[r.name]["type"],
                         "parameters": rows[r.name]["parameters"]} for r in ranking]}
    path = atomic_write_text(out / SENSITIVITY_FILE, json.dumps(data, indent=2) + "\n")
    width = max((len(r.name) for r in ranking), default=5)
    print(f"{'rank':>4}  {'layer':<{width}}  {'type':<16} {'score':>10}")
    for r in ranking:
        print(f"{r.rank:>4}  {r.name:<{width}}  {rows[r.name]['type']:<16} {r.score:>10.6f}")
    print(f"saved {path}")
    return EXIT_OK


# -- report / export -------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    """``autoquant report``: render the reports of a run directory.

    Every file read here may have been edited by hand (or by someone else): report.json is
    validated against the report schema and the job copy must be a mapping, so a bad field
    is a ConfigError naming it, never a traceback or unescaped text in report.html.
    """
    from autoquant.io.atomic import atomic_write_text
    from autoquant.io.names import JOURNAL_FILE
    from autoquant.jobs.journal import read_journal
    from autoquant.report.build import report_from_journal
    from autoquant.report.render import render_report
    from autoquant.report.validate import check_report, read_report

    directory = args.directory.resolve()
    report_path = directory / REPORT_FILE
    if report_path.is_file():
        report = read_report(report_path)
    elif (directory / JOURNAL_FILE).is_file():
        job = _read_job_copy(directory / JOB_COPY)
        report = report_from_journal(read_journal(directory / JOURNAL_FILE), job)
        report["run"]["journal"] = str(directory / JOURNAL_FILE)
        check_report(report, f"the report rebuilt from {directory / JOURNAL_FILE} and "
                             f"{directory / JOB_COPY}")
        atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
        logger.info("no report.json: rebuilt it from the journal (status 'interrupted')")
    else:
        raise ConfigError(f"{directory} has neither {REPORT_FILE} nor {JOURNAL_FILE}; pass "
                          "the output directory of `autoquant run`")
    for path in render_report(report, directory):
        print(f"wrote {path}")
    return EXIT_OK


def _read_job_copy(path: Path) -> dict[str, Any] | None:
    """The job copy of a run directory as data (None if there is none), checked to be a
    mapping whose ``search`` section, if any, is a mapping."""
    import yaml

    from autoquant.io.reading import read_text_file
    from autoquant.io.yamlsafe import MAX_YAML_BYTES, safe_load_no_aliases

    if not path.is_file():
        return None
    text = read_text_file(path, "job file", max_bytes=MAX_YAML_BYTES)
    try:
        job = safe_load_no_aliases(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if job is None:
        return None
    if not isinstance(job, dict) or not isinstance(job.get("search") or {}, dict):
        raise ConfigError(f"{path} is not an autoquant job (expected a mapping with a "
                          "`search:` mapping); restore it from the original job file, or "
                          "delete it to render the report without the job's settings")
    return job


def cmd_export(args: argparse.Namespace) -> int:
    """``autoquant export``: ONNX from a finished run; the float model and the example
    inputs are rebuilt from the run's job file, the job's ``export:`` section gives the
    defaults and the flags override them."""
    import importlib

    from autoquant.jobs.job import load_job

    try:
        export = importlib.import_module("autoquant.export")
    except ModuleNotFoundError as err:
        if err.name != "autoquant.export":
            raise
        raise ConfigError("ONNX export is not available in this autoquant installation "
                          "(the autoquant.export module is missing)") from err
    directory = args.directory.resolve()
    if not (directory / JOB_COPY).is_file():
        raise ConfigError(f"{directory} has no {JOB_COPY}; pass the output directory of "
                          "`autoquant run`")
    job = load_job(directory / JOB_COPY)
    options = _export_options(job, args)
    path = export.export_saved(directory, args.onnx, job.build_model(), job.example_inputs(),
                               **options)
    print(f"wrote {path or args.onnx}")
    return EXIT_OK


def _export_options(job: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The job's ``export:`` options with the command-line flags over them."""
    options = job.export_options()
    if job.config.export is not None:
        options["strict"] = job.config.export["strict"]
    for key in ("opset", "input_names", "output_names"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.dynamic_axes is not None:
        import yaml

        from autoquant.io.yamlsafe import safe_load_no_aliases
        from autoquant.jobs.schema import dynamic_axes_from_data

        try:
            options["dynamic_axes"] = dynamic_axes_from_data(
                safe_load_no_aliases(args.dynamic_axes))
        except (ConfigError, yaml.YAMLError) as err:
            raise ConfigError(f"--dynamic-axes: {err}") from err
    if args.no_strict:
        options["strict"] = False
    return options
