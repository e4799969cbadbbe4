"""The ``autoquant`` command line (also ``python -m autoquant``).

Subcommands: ``run`` (the search as a resumable batch job), ``init-config`` (write the
editable per-layer quant config), ``sensitivity`` (the ranking only), ``report`` (re-render
the reports of a finished or interrupted run) and ``export`` (ONNX from a finished run).

Exit codes: 0 success (``run``: the loss budget was met); 2 ``run`` finished without meeting
it (``not_met`` or ``budget_exhausted``; the best passing plan is still saved); 3 ``run``
found that only the float model meets it (``float_only``: nothing stays quantized); 1 an error
(message on stderr, no traceback unless ``-v``; bad command-line usage too); 130 interrupted
by SIGINT or SIGTERM (the journal is durable: rerun with ``--resume``).

An evaluation abandoned after its ``eval_timeout`` may still be running torch code when the
command ends; letting the interpreter finalize under it aborts the process (exit -6 instead
of 1). So when `main` runs as the program (``argv`` None) and such a thread is alive, it
flushes its output and ends the process with ``os._exit(code)``: every file is already
written atomically and the journal is fsync'd, so nothing is lost.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from autoquant import __version__
from autoquant.errors import AutoquantError
from autoquant.jobs.commands import (
    EXIT_ERROR,
    EXIT_FLOAT_ONLY,
    EXIT_INTERRUPTED,
    EXIT_NOT_MET,
    EXIT_OK,
    cmd_export,
    cmd_init_config,
    cmd_report,
    cmd_run,
    cmd_sensitivity,
)

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_NOT_MET",
           "EXIT_FLOAT_ONLY", "EXIT_INTERRUPTED"]


logger = logging.getLogger("autoquant.jobs.cli")



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
    parser.add_argument("--version", action="version", version=f"autoquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_run(sub)
    _add_init_config(sub)
    _add_sensitivity(sub)
    _add_report(sub)
    _add_export(sub)
    return parser


def _add_run(sub: Any) -> None:
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
    p.add_argument("--executor", metavar="ADDRESS",
                   help="where trials run, overriding search.executor: 'local', a Dask "
                        "scheduler 'dask://HOST:PORT' or 'ray' (may change on --resume)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="trials at once, overriding search.workers (may change on --resume)")
    _verbosity(p)
    p.set_defaults(func=cmd_run)


def _add_init_config(sub: Any) -> None:
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


def _add_sensitivity(sub: Any) -> None:
    p = sub.add_parser("sensitivity", help="calibrate and rank layers; no search",
                       description="Print the per-layer sensitivity ranking (most sensitive "
                                   "first) and save it as sensitivity.json in the output "
                                   "directory. No evaluation is run.")
    p.add_argument("job", type=Path, help="the job file (YAML)")
    p.add_argument("--output-dir", type=Path, help="override the job's output_dir")
    _verbosity(p)
    p.set_defaults(func=cmd_sensitivity)


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="re-render report.md/html of a run directory",
                       description="Render report.md and report.html from report.json; for "
                                   "an interrupted run (no report.json), first rebuild "
                                   "report.json from the journal (status 'interrupted').")
    p.add_argument("directory", type=Path, help="the output directory of a run")
    _verbosity(p)
    p.set_defaults(func=cmd_report)


def _add_export(sub: Any) -> None:
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


# -- main ------------------------------------------------------------------------------------


def _setup_logging(args: argparse.Namespace) -> None:
    # -v/-q set autoquant's own level; other libraries (matplotlib, onnxscript, optuna, ...)
    # only speak up at WARNING, also with -v (their debug lines would drown ours)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("autoquant").setLevel(level)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``autoquant`` command; return its exit code (see the module docstring).

    Called with ``argv=None`` it is the program (the ``autoquant`` script, ``python -m
    autoquant``): if a timed-out evaluation is still running it ends the process with the
    exit code at once (`_exit_past_abandoned_threads`). Called with a list, as from Python,
    it always returns.
    """
    code = _main(argv)
    if argv is None:
        _exit_past_abandoned_threads(code)
    return code


def _exit_past_abandoned_threads(code: int) -> None:
    """``os._exit(code)`` after flushing, if an abandoned evaluation thread is alive."""
    from autoquant.evaluation.guard import abandoned_evaluations

    if abandoned_evaluations():
        logger.debug("an abandoned evaluation is still running; exiting without waiting")
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or broken pipe: nothing left to save
                pass
        os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
