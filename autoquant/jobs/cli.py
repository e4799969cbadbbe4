"""The ``autoquant`` command line (also ``python -m autoquant``).

Subcommands: ``run`` (the search as a resumable batch job), ``init-config`` (write the
editable per-layer quant config), ``sensitivity`` (the ranking only), ``report`` (re-render
the reports of a finished or interrupted run) and ``export`` (ONNX from a finished run).

Exit codes: 0 success (``run``: the loss budget was met); 2 ``run`` finished without meeting
it (``not_met`` or ``budget_exhausted``; the best plan found is still saved); 1 an error
(message on stderr, no traceback unless ``-v``; bad command-line usage too); 130 interrupted
by SIGINT or SIGTERM (the journal is durable: rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from autoquant.errors import AutoquantError, ConfigError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_NOT_MET", "EXIT_INTERRUPTED"]

logger = logging.getLogger("autoquant.jobs.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_MET = 2
EXIT_INTERRUPTED = 130
JOB_COPY = "job.yaml"
SENSITIVITY_FILE = "sensitivity.json"


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with EXIT_ERROR, keeping 2 for "threshold not met"."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="debug logging, and tracebacks on errors")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="warnings and errors only, no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``autoquant`` command."""
    parser = _Parser(prog="autoquant",
                     description="Accuracy-driven auto-quantization search as resumable "
                                 "batch jobs.",
                     epilog="exit codes: 0 met/success, 2 run finished without meeting the "
                            "budget, 1 error, 130 interrupted (resume with --resume)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="run the search of a YAML job (resumable)",
                       description="Calibrate, rank layers, search, save the result and "
                                   "the reports into the output directory. Every evaluation "
                                   "is journaled, so a killed run resumes with --resume.",
                       epilog="exit codes: 0 the loss budget was met, 2 not met or the "
                              "evaluation budget ran out (the best plan is saved anyway), "
                              "1 error, 130 interrupted")
    p.add_argument("job", type=Path, help="the job file (YAML)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the journal and sensitivity ranking of an interrupted run in "
                        "the output directory (checked against a fingerprint)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing journal in the output directory and start over")
    p.add_argument("--output-dir", type=Path, help="override the job's output_dir")
    _verbosity(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("init-config", help="write the editable per-layer quant config",
                       description="Write every quantizable layer of the job's model with "
                                   "its settings (from the job's inline quant section or the "
                                   "defaults) to a YAML file you can edit; point the job's "
                                   "`quant:` at it.")
    p.add_argument("job", type=Path, help="the job file (YAML)")
    p.add_argument("-o", "--output", type=Path,
                   help="where to write (default: the file the job's `quant:` names, else "
                        "quant.yaml next to the job file)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    _verbosity(p)
    p.set_defaults(func=cmd_init_config)

    p = sub.add_parser("sensitivity", help="calibrate and rank layers; no search",
                       description="Print the per-layer sensitivity ranking (most sensitive "
                                   "first) and save it as sensitivity.json in the output "
                                   "directory. No evaluation is run.")
    p.add_argument("job", type=Path, help="the job file (YAML)")
    p.add_argument("--output-dir", type=Path, help="override the job's output_dir")
    _verbosity(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("report", help="re-render report.md/html of a run directory",
                       description="Render report.md and report.html from report.json; for "
                                   "an interrupted run (no report.json), first rebuild "
                                   "report.json from the journal (status 'interrupted').")
    p.add_argument("directory", type=Path, help="the output directory of a run")
    _verbosity(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export a finished run to ONNX",
                       description="Export the quantized model saved in DIR to ONNX (QDQ). "
                                   "The float model and example inputs are rebuilt from "
                                   "DIR/job.yaml, which `autoquant run` writes.")
    p.add_argument("directory", type=Path, help="the output directory of a finished run")
    p.add_argument("--onnx", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 21)")
    p.add_argument("--input-names", nargs="+", metavar="NAME",
                   help="names of the graph inputs, in order")
    p.add_argument("--output-names", nargs="+", metavar="NAME",
                   help="names of the graph outputs, in order")
    p.add_argument("--dynamic-axes", metavar="YAML",
                   help="dynamic axes as YAML/JSON, e.g. '{images: {0: batch, 2: h, 3: w}}'")
    p.add_argument("--no-strict", action="store_true",
                   help="warn instead of failing when onnxruntime's outputs miss the parity "
                        "tolerance")
    _verbosity(p)
    p.set_defaults(func=cmd_export)
    return parser


# -- run ---------------------------------------------------------------------------------------

def _fingerprint_settings(job: Any) -> dict[str, Any]:
    # Budgets and guards do not change what a record means: a resume may change them. The
    # deploy check does: it rejects plans the fake-quant trials passed.
    search = {k: v for k, v in job.config.search.items()
              if k not in ("max_evaluations", "eval_timeout", "max_seconds", "check_determinism")}
    verify = bool(job.config.export and job.config.export["verify_deploy"])
    return {"evaluator": job.config.evaluator, "search": search, "verify_deploy": verify}


def cmd_run(args: argparse.Namespace) -> int:
    """``autoquant run``: the search as a resumable batch job (one run per output dir)."""
    from autoquant.evaluation.guard import lock_output_dir
    from autoquant.jobs.job import load_job

    job = load_job(args.job)
    out = (args.output_dir or job.config.output_dir).resolve()
    with lock_output_dir(out):  # a second run into the same folder would mix journals
        return _run_locked(args, job, out)


def _run_locked(args: argparse.Namespace, job: Any, out: Path) -> int:
    from autoquant.api import auto_quantize
    from autoquant.evaluation.guard import check_output_dir
    from autoquant.io.atomic import atomic_write_text
    from autoquant.jobs.journal import JOURNAL_FILE, Journal, fingerprint
    from autoquant.jobs.progress import ProgressBars, bars_enabled
    from autoquant.report.build import build_report
    from autoquant.report.render import render_report
    from autoquant.result import REPORT_FILE

    kwargs = job.search_kwargs()  # reads the quant config: fail before anything heavy
    model = job.build_model()
    evaluator = job.build_evaluator()
    inputs = job.example_inputs()
    from autoquant.quant.target import resolve_target

    config = kwargs["config"]  # records are only valid for the target they were made on
    parts = fingerprint(model, {**config.to_dict(), "target": resolve_target(config.target)},
                        _fingerprint_settings(job))
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
            result = auto_quantize(model, evaluator, inputs, on_record=journal.append_record,
                                   preloaded=journal.records, ranking=journal.ranking,
                                   progress=progress, **kwargs)
    finally:
        bars.close()
    spec = job.config.export
    if spec is not None:  # the deployed artifact, checked and measured, into the report
        target = Path(spec["path"]).expanduser()
        result.export_onnx(target if target.is_absolute() else out / target,
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
          "model_state.pt)")
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
    from autoquant.io.atomic import atomic_write_text
    from autoquant.jobs.job import load_job
    from autoquant.jobs.progress import ProgressBars, bars_enabled
    from autoquant.quant.qmodel import QuantModel
    from autoquant.sensitivity.ranking import compute_sensitivity

    job = load_job(args.job)
    out = (args.output_dir or job.config.output_dir).resolve()
    cfg = job.quant_config()
    model, evaluator = job.build_model(), job.build_evaluator()
    qmodel = QuantModel(model, cfg, job.example_inputs())
    bars = ProgressBars(bars_enabled(args.quiet))
    start = time.perf_counter()
    try:
        with bars.logging_redirected():
            bars("calibration", "start", model=qmodel.model)
            qmodel.calibrate(evaluator)
            bars("calibration", "end")
            bars("sensitivity", "start", model=qmodel.model)
            ranking = compute_sensitivity(qmodel, evaluator, job.config.search["sensitivity"])
            bars("sensitivity", "end")
    finally:
        bars.close()
    rows = {r["name"]: r for r in qmodel.layer_rows()}
    data = {"sensitivity": job.config.search["sensitivity"],
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
    """``autoquant report``: render the reports of a run directory."""
    import yaml

    from autoquant.io.atomic import atomic_write_text
    from autoquant.io.yamlsafe import safe_load_no_aliases
    from autoquant.jobs.journal import JOURNAL_FILE, read_journal
    from autoquant.report.build import report_from_journal
    from autoquant.report.render import render_report
    from autoquant.result import REPORT_FILE

    directory = args.directory.resolve()
    report_path = directory / REPORT_FILE
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read {report_path}: {err}") from err
        if not isinstance(report, dict) or not {"status", "metrics", "counts"} <= set(report):
            raise ConfigError(f"{report_path} is not an autoquant report (no status, metrics "
                              "and counts); rerun `autoquant run`, or delete it to rebuild it "
                              "from the journal")
    elif (directory / JOURNAL_FILE).is_file():
        job = None
        if (directory / JOB_COPY).is_file():
            try:
                job = safe_load_no_aliases((directory / JOB_COPY).read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                raise ConfigError(f"{directory / JOB_COPY} is not valid YAML: {err}") from err
        report = report_from_journal(read_journal(directory / JOURNAL_FILE), job)
        report["run"]["journal"] = str(directory / JOURNAL_FILE)
        atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
        logger.info("no report.json: rebuilt it from the journal (status 'interrupted')")
    else:
        raise ConfigError(f"{directory} has neither {REPORT_FILE} nor {JOURNAL_FILE}; pass "
                          "the output directory of `autoquant run`")
    for path in render_report(report, directory):
        print(f"wrote {path}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """``autoquant export``: ONNX from a finished run (needs ``autoquant.export.onnx_export``)."""
    import importlib

    from autoquant.jobs.job import load_job

    try:
        export = importlib.import_module("autoquant.export.onnx_export")
    except ModuleNotFoundError as err:
        if err.name != "autoquant.export.onnx_export":
            raise
        raise ConfigError("ONNX export is not available in this autoquant installation "
                          "(the autoquant.export.onnx_export module is missing)") from err
    directory = args.directory.resolve()
    if not (directory / JOB_COPY).is_file():
        raise ConfigError(f"{directory} has no {JOB_COPY}; pass the output directory of "
                          "`autoquant run`")
    job = load_job(directory / JOB_COPY)
    options = job.export_options()  # the job's export section, overridden by the flags
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
    path = export.export_saved(directory, args.onnx, example_inputs=job.example_inputs(),
                               **options)
    print(f"wrote {path or args.onnx}")
    return EXIT_OK


# -- main ------------------------------------------------------------------------------------

def _setup_logging(args: argparse.Namespace) -> None:
    # -v/-q set autoquant's own level; other libraries (onnxscript, optuna, ...) only speak
    # up at WARNING, unless -v asks for everything.
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("autoquant").setLevel(level)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``autoquant`` command; return its exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("autoquant: interrupted; every finished evaluation is in the journal, rerun "
              "with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except AutoquantError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"autoquant: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except Exception:  # a bug: keep the traceback, it is what a report needs
        traceback.print_exc()
        print("autoquant: internal error (above); please report it", file=sys.stderr)
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)


def _entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
