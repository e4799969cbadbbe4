"""Benchmark: ``kill -9`` at random points of ``autoquant run``, then ``--resume`` until done.

For each run a small job (a 6-layer MLP, `TinyEvaluator` from ``tests/helpers`` with a delay
per evaluation, the binary search) starts in a fresh output directory as a subprocess and is
killed with SIGKILL at a uniformly random moment of an uninterrupted run's wall time (start-up,
calibration, sensitivity, evaluations, writing the results: anywhere). Then ``autoquant run
--resume`` is started, killed again at random up to ``--kills`` times, and finally let run to
the end (a run that finishes before its kill is due is done). The evaluator
(`StartLoggingEvaluator`) logs the start and the end of every ``evaluate()`` call, so the
benchmark prints per run:

- the kills and when they landed;
- cut: evaluations a kill interrupted (started, never returned); resume runs them again;
- repeated: evaluations that *returned* and still ran again after a resume (a kill after
  ``evaluate()`` returned but before its journal line was synced); the promise is cut +
  repeated <= one per kill (docs/guarantees.md), not counting the resume check;
- resume checks: a resumed run scores the float model once more to check the evaluator
  still agrees with the journal (an extra call outside the trial budget, by design);
- whether the final report (status, plan, fallback layers, metrics) equals the uninterrupted
  run's.

Usage::

    python benchmarks/resume.py                  # 20 runs (a few minutes on 2 CPUs)
    python benchmarks/resume.py --runs 5 --kills 1 --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "tests" / "helpers"
if str(HELPERS) not in sys.path:  # the evaluator below extends the tests' TinyEvaluator
    sys.path.insert(0, str(HELPERS))

from jobhelpers import TinyEvaluator  # noqa: E402

__all__ = ["main", "one_run", "write_job", "StartLoggingEvaluator"]


class StartLoggingEvaluator(TinyEvaluator):
    """`TinyEvaluator` that also appends ``{"pid", "start": plan}`` to `starts` when each
    ``evaluate()`` begins, so a call cut by a kill is visible."""

    def __init__(self, starts: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.starts = Path(starts)

    def evaluate(self, model: Any) -> float:
        from jobhelpers import plan_of

        with open(self.starts, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "plan": plan_of(model)}) + "\n")
        return super().evaluate(model)

COMPARED = ("status", "plan", "fallback_layers", "metrics")


def write_job(folder: Path, delay: float) -> Path:
    """The benchmark's job file in `folder` (its evaluator logs into ``folder/evals.log``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(f"""\
python_path: [{HELPERS}, {ROOT / 'benchmarks'}]
model: {{factory: "jobhelpers:build_model", kwargs: {{depth: 6}}}}
evaluator:
  class: resume:StartLoggingEvaluator
  kwargs: {{depth: 6, log: {folder / 'evals.log'}, starts: {folder / 'starts.log'},
           delay: {delay}}}
example_inputs: [{{shape: [2, 8]}}]
quant: {{default: {{weight: {{bits: 6}}, activation: {{bits: 6}}}}}}
search: {{max_loss: 0.03}}
output_dir: out
""", encoding="utf-8")
    return path


def _start(job: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "autoquant", "run", str(job), "-q", *flags],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _log(folder: Path, name: str = "evals.log") -> list[dict[str, Any]]:
    path = folder / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(plan: dict[str, str]) -> str:
    return json.dumps(plan, sort_keys=True)


def _counts(entries: list[dict[str, Any]]) -> tuple[int, int]:
    """(repeated evaluations, resume checks) of a run's evaluator log.

    A process after the first whose first float evaluation repeats the float plan is a
    resume check; any other call on a plan an earlier process evaluated is a repeat.
    """
    seen_before: set[str] = set()
    repeated = checks = 0
    pids = list(dict.fromkeys(e["pid"] for e in entries))
    for n, pid in enumerate(pids):
        mine = [e for e in entries if e["pid"] == pid]
        checked = False
        for entry in mine:
            key = _key(entry["plan"])
            is_float = all(s == "float" for s in entry["plan"].values())
            if n > 0 and is_float and not checked and key in seen_before:
                checked = True
                checks += 1
            elif key in seen_before:
                repeated += 1
        seen_before |= {_key(e["plan"]) for e in mine}
    return repeated, checks


def one_run(folder: Path, delay: float, reference_seconds: float, kills: int,
            rng: random.Random) -> dict[str, Any]:
    """One killed-and-resumed run; returns its figures."""
    job = write_job(folder, delay)
    landed: list[float] = []
    exits: list[int] = []
    for attempt in range(kills + 1):
        proc = _start(job, *(["--resume"] if attempt else []))
        if attempt < kills:
            at = rng.uniform(0.0, reference_seconds)
            try:
                proc.wait(timeout=at)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                landed.append(round(at, 2))
        _, stderr = proc.communicate(timeout=600)
        exits.append(proc.returncode)
        if proc.returncode in (0, 2):  # finished (before its kill was due, maybe)
            break
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"autoquant exited {proc.returncode}: {stderr}")
    if exits[-1] not in (0, 2):
        raise RuntimeError(f"the final resume did not finish (exit {exits[-1]})")
    repeated, checks = _counts(_log(folder))
    ends = Counter(e["pid"] for e in _log(folder))
    cut = sum(n - ends[pid] for pid, n in Counter(
        e["pid"] for e in _log(folder, "starts.log")).items())
    report = json.loads((folder / "out" / "report.json").read_text())
    return {"kills": landed, "cut": cut, "repeated": repeated, "resume_checks": checks,
            "evaluations": len(_log(folder, "starts.log")), "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=2, help="kills per run before the last "
                                                              "resume (default 2)")
    parser.add_argument("--delay", type=float, default=0.5,
                        help="seconds each evaluate() sleeps (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="aq-resume-") as tmp:
        start = time.perf_counter()
        ref_job = write_job(Path(tmp) / "reference", args.delay)
        proc = _start(ref_job)
        _, stderr = proc.communicate(timeout=600)
        seconds = time.perf_counter() - start
        if proc.returncode not in (0, 2):
            raise RuntimeError(f"the reference run failed: {stderr}")
        reference = json.loads((Path(tmp) / "reference" / "out" / "report.json").read_text())
        print(f"reference: {reference['counts']['evaluations']} evaluations, status "
              f"{reference['status']}, {seconds:.1f} s wall; {args.runs} runs, up to "
              f"{args.kills} kill(s) each at uniform random times in [0, {seconds:.1f}] s")
        print(f"{'run':>3}  {'kills at (s)':<18}{'cut':>4}{'repeated':>9}"
              f"{'resume checks':>14}{'evaluate calls':>15}  same answer")
        totals: Counter[str] = Counter()
        for i in range(args.runs):
            figures = one_run(Path(tmp) / f"run{i}", args.delay, seconds, args.kills, rng)
            same = all(figures["report"][k] == reference[k] for k in COMPARED)
            totals.update(kills=len(figures["kills"]), cut=figures["cut"],
                          repeated=figures["repeated"], checks=figures["resume_checks"],
                          same=int(same))
            print(f"{i:>3}  {str(figures['kills']):<18}{figures['cut']:>4}"
                  f"{figures['repeated']:>9}"
                  f"{figures['resume_checks']:>14}{figures['evaluations']:>15}  "
                  f"{'yes' if same else 'NO'}")
        print(f"total: {totals['kills']} kills, {totals['cut']} evaluation(s) cut by a kill "
              f"and run again, {totals['repeated']} finished evaluation(s) repeated, "
              f"{totals['checks']} resume check(s), {totals['same']}/{args.runs} runs with "
              "the uninterrupted run's answer")


if __name__ == "__main__":
    main()
