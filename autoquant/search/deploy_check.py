"""The deployed metric: the chosen plan exported to ONNX and scored by the user's own
evaluator in onnxruntime (default session options), before the search reports ``met``.

`evaluate_deployed` exports one plan and runs ``Evaluator.evaluate`` on an
`autoquant.export.ortmodule.OnnxModule` of the file; it counts as one evaluation. When the
deployed model misses the budget the plan is marked failed in the trial cache and the
search goes on (`autoquant.api`): the strategy replays its cached trials for free and
proposes the next plan, so what is reported as met is what is shipped.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoquant.errors import ConfigError
from autoquant.evaluation.adapter import EvaluatorAdapter
from autoquant.plan import QuantPlan
from autoquant.quant.qmodel import QuantModel

__all__ = ["DeployCheck", "evaluate_deployed"]

logger = logging.getLogger(__name__)


@dataclass
class DeployCheck:
    """One plan scored in the runtime.

    Attributes:
        trial: the index of the fake-quant trial whose plan was deployed.
        metric: the evaluator's metric on the deployed ONNX model.
        loss: its loss against the float metric.
        passed: whether that loss is within the budget.
        seconds: wall time of the export and the evaluation.
        export: the export's check figures (parity, integer kernels; see
            `autoquant.export.onnx_export.export_checked`).
    """

    trial: int
    metric: float
    loss: float
    passed: bool
    seconds: float
    export: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-ready)."""
        return asdict(self)


def evaluate_deployed(qmodel: QuantModel, plan: QuantPlan, trial: int,
                      evaluator: EvaluatorAdapter, example_inputs: Any, float_metric: float,
                      export_options: Mapping[str, Any] | None = None) -> DeployCheck:
    """Export `plan` of `qmodel` to a temporary ONNX file and score it with the user's
    ``evaluate`` in onnxruntime, judged against `float_metric` as the trials are."""
    from autoquant.export.onnx_export import export_checked
    from autoquant.export.ortmodule import OnnxModule

    inputs = example_inputs
    if inputs is None:
        if not qmodel.calibration_inputs:
            raise ConfigError("verify_deploy needs example_inputs (or a calibration() that "
                              "calls model(...)) to export the model")
        inputs = qmodel.calibration_inputs[0]
    start = time.perf_counter()
    qmodel.apply_plan(plan)
    options = {"strict": False, "check_inputs": qmodel.calibration_inputs,
               **dict(export_options or {})}
    with tempfile.TemporaryDirectory() as tmp:
        path, figures = export_checked(qmodel.model, Path(tmp) / "deployed.onnx", inputs,
                                       **options)
        deployed = OnnxModule(path, qmodel.model, inputs)
        metric, _ = evaluator.measure(deployed, f"on the deployed ONNX model of trial {trial}")
    passed, loss = evaluator.decide(float_metric, metric)
    check = DeployCheck(trial, metric, loss, passed, time.perf_counter() - start,
                        {k: v for k, v in figures.items() if k != "onnx_path"})
    logger.info("trial %d deployed in onnxruntime: metric %.6g, loss %.6g -> %s", trial,
                metric, loss, "pass" if passed else "FAIL: the search continues")
    return check


def search_until_deployed(runner: Any, new_strategy: Any, context: Any, float_plan: QuantPlan,
                          deploy: Any, progress: Any = None) -> tuple[Any, list[DeployCheck]]:
    """`autoquant.search.loop.run_search` until its chosen plan also passes once deployed.

    `new_strategy()` makes a fresh strategy per round; `deploy(record)` returns the
    `DeployCheck` of a record's plan (or None when the check is off). A plan that fails
    deployed is rejected in the runner's cache and the search runs again: cached trials
    replay without evaluations, so the strategy continues where the rejected plan was.
    A chosen plan that keeps every layer float deploys exactly and is not checked.
    """
    from autoquant.plan import FLOAT
    from autoquant.search.loop import run_search

    checks: list[DeployCheck] = []
    while True:
        outcome = run_search(runner, new_strategy(), context, float_plan, progress=progress)
        best = outcome.best
        if best is None or not best.passed or all(s == FLOAT for s in best.plan.values()):
            return outcome, checks
        if not runner.budget_left():
            outcome.status = "budget_exhausted"
            outcome.reason = ("the budget ran out before the chosen plan could be checked in "
                              "the runtime; it passed in the searched (fake-quant) model")
            return outcome, checks
        check = deploy(best)
        if check is None:
            return outcome, checks
        runner.extra_evaluations += 1
        checks.append(check)
        if check.passed:
            return outcome, checks
        runner.reject(best, "failed once deployed")
