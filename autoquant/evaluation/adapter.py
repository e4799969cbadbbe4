"""`EvaluatorAdapter`: the one place where autoquant calls the user's evaluation code.

Every call goes through here: ``calibration`` (in eval mode, under no_grad), ``evaluate``
(with the ``eval_timeout`` guard and a check that it returned a finite number), the
pass/fail decision (``metric_eval`` if the evaluator defines one, else the accuracy
criterion), ``evaluate_holdout``, and ``worker_spec`` (how a worker process rebuilds the
evaluator). PTQ code never sees the evaluator: it gets the `calibrate` callable.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from autoquant.errors import ConfigError, EvaluatorError
from autoquant.evaluation.criterion import AccuracyCriterion, check_metric_value
from autoquant.evaluation.guard import run_with_timeout
from autoquant.registry import import_object

__all__ = ["EvaluatorAdapter", "call_user", "calibration_of"]


def call_user(evaluator: Any, method: str, model: nn.Module, where: str = "") -> Any:
    """Call ``evaluator.<method>(model)`` in eval mode under no_grad; wrap its errors."""
    func = getattr(evaluator, method, None)
    if not callable(func):
        raise EvaluatorError(
            f"the evaluator {type(evaluator).__name__} has no method {method}(model); "
            "subclass autoquant.Evaluator and implement it"
        )
    model.eval()
    try:
        with torch.no_grad():
            return func(model)
    except SystemExit as err:  # would end the run with nothing said
        raise EvaluatorError(
            f"{type(evaluator).__name__}.{method}() {where} called sys.exit({err.code!r}); "
            "return a metric (or raise an exception) instead"
        ) from err
    except Exception as err:
        suffix = f" {where}" if where else ""
        raise EvaluatorError(
            f"{type(evaluator).__name__}.{method}(){suffix} raised {type(err).__name__}: {err}"
        ) from err


def calibration_of(evaluator: Any) -> Callable[[nn.Module, str], None]:
    """The PTQ passes' ``calibrate(model, where)`` callable of an object with
    ``calibration(model)`` (an evaluator, or a calibration-only helper)."""
    if not callable(getattr(evaluator, "calibration", None)):
        raise EvaluatorError(f"the evaluator {type(evaluator).__name__} has no method "
                             "calibration(model); subclass autoquant.Evaluator")

    def calibrate(model: nn.Module, where: str = "") -> None:
        call_user(evaluator, "calibration", model, where)

    return calibrate


class EvaluatorAdapter:
    """Calls one user evaluator for a search (see the module docstring).

    Args:
        evaluator: an `autoquant.Evaluator`, or any object with ``calibration(model)`` and
            ``evaluate(model) -> float`` (``metric_eval``, ``evaluate_holdout``,
            ``worker_spec`` and ``higher_is_better`` are optional).
        criterion: the accuracy criterion used when the evaluator has no ``metric_eval``.
        timeout: seconds one ``evaluate`` may take (None: no limit).
    """

    def __init__(self, evaluator: Any, criterion: AccuracyCriterion | None = None,
                 timeout: float | None = None) -> None:
        if not callable(getattr(evaluator, "evaluate", None)):
            raise EvaluatorError(
                f"the evaluator {type(evaluator).__name__} has no method evaluate(model); "
                "subclass autoquant.Evaluator (or pass evaluate=fn and calibration_data=...)"
            )
        self.evaluator = evaluator
        self.name = type(evaluator).__name__
        direction = getattr(evaluator, "higher_is_better", True)
        if not isinstance(direction, (bool, np.bool_)):
            raise EvaluatorError(
                f"{self.name}.higher_is_better is {type(direction).__name__} {direction!r:.30}; "
                "it must be True or False (a string such as 'False' is truthy)")
        self.criterion = criterion or AccuracyCriterion(higher_is_better=bool(direction))
        self.timeout = timeout

    # -- calls -------------------------------------------------------------------------------
    def calibrate(self, model: nn.Module, where: str = "") -> None:
        """Run the evaluator's ``calibration`` on `model` (the PTQ passes' callable)."""
        call_user(self.evaluator, "calibration", model, where)

    def measure(self, model: nn.Module, where: str) -> tuple[float, float]:
        """``evaluate(model)`` under the timeout: ``(metric, seconds)``."""
        start = time.perf_counter()
        value = run_with_timeout(
            lambda: call_user(self.evaluator, "evaluate", model, where), self.timeout,
            f"{self.name}.evaluate() {where}")
        return self.check(value, where), time.perf_counter() - start

    def check(self, value: Any, where: str) -> float:
        """`value` (what ``evaluate`` returned, maybe in a worker) as a finite float."""
        return check_metric_value(value, f"{self.name}.evaluate() {where}")

    def decide(self, original: float, new: float) -> tuple[bool, float]:
        """``(passed, loss)``: the evaluator's ``metric_eval`` if it defines one (and does
        not return ``NotImplemented``), else the criterion."""
        custom = getattr(self.evaluator, "metric_eval", None)
        if callable(custom):
            try:
                out = custom(original, new)
            except Exception as err:
                raise EvaluatorError(
                    f"{self.name}.metric_eval({original!r}, {new!r}) raised "
                    f"{type(err).__name__}: {err}"
                ) from err
            if out is not NotImplemented:
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise EvaluatorError(
                        f"{self.name}.metric_eval() returned {out!r:.80}; expected a tuple "
                        "(ok: bool, loss: float)"
                    )
                ok, loss = out
                if not isinstance(ok, (bool, np.bool_)):
                    raise EvaluatorError(
                        f"{self.name}.metric_eval() returned ok={ok!r:.30} "
                        f"({type(ok).__name__}); it must be True or False (a string such as "
                        "'False' is truthy)")
                return bool(ok), check_metric_value(loss, "metric_eval() (its loss)")
        return self.criterion.check(original, new)

    @property
    def has_holdout(self) -> bool:
        """True when the evaluator has ``evaluate_holdout(model)``."""
        return callable(getattr(self.evaluator, "evaluate_holdout", None))

    def measure_holdout(self, model: nn.Module, where: str) -> float:
        """``evaluate_holdout(model)``, checked to be a finite number."""
        value = call_user(self.evaluator, "evaluate_holdout", model, where)
        return check_metric_value(value, f"{self.name}.evaluate_holdout() {where}")

    @property
    def has_subset(self) -> bool:
        """True when the evaluator has ``evaluate_subset(model)`` (a cheap metric for the
        ``subset`` sensitivity ranking)."""
        return callable(getattr(self.evaluator, "evaluate_subset", None))

    @property
    def ranks_by_subset(self) -> bool:
        """True when the default ranking (``sensitivity_scope="auto"``) should be the subset
        scope: the evaluator has ``evaluate_subset`` and has not marked it
        ``default_ranking = False`` (a proxy, not the metric itself)."""
        return self.has_subset and getattr(self.evaluator.evaluate_subset, "default_ranking",
                                           True) is not False

    @property
    def has_output_view(self) -> bool:
        """True when the evaluator has ``sensitivity_output(output) -> Tensor``: what its
        metric reads of the model's output, which the output-scope ranking compares."""
        return callable(getattr(self.evaluator, "sensitivity_output", None))

    def output_view(self, output: Any) -> torch.Tensor:
        """``sensitivity_output(output)``, checked to be a tensor, detached, as float."""
        try:
            value = self.evaluator.sensitivity_output(output)
        except Exception as err:
            raise EvaluatorError(f"{self.name}.sensitivity_output() raised "
                                 f"{type(err).__name__}: {err}") from err
        if not isinstance(value, torch.Tensor):
            raise EvaluatorError(
                f"{self.name}.sensitivity_output() returned {type(value).__name__}; return a "
                "tensor: what the metric reads of the model's output (decoded labels, "
                "pitch, box coordinates)")
        value = value.detach()
        return value if value.is_floating_point() else value.float()

    def measure_subset(self, model: nn.Module, where: str) -> float:
        """``evaluate_subset(model)`` under the timeout, checked to be a finite number."""
        what = f"{self.name}.evaluate_subset() {where}"
        value = run_with_timeout(
            lambda: call_user(self.evaluator, "evaluate_subset", model, where), self.timeout,
            what)
        return check_metric_value(value, what)

    # -- worker processes ---------------------------------------------------------------------
    def payload(self) -> tuple[str, Any]:
        """How a worker process gets the evaluator: ``("spec", (factory, kwargs))`` from its
        ``worker_spec()``, else ``("pickle", bytes)``; a ConfigError if neither works."""
        spec = getattr(self.evaluator, "worker_spec", None)
        if callable(spec):
            out = spec()
            if not (isinstance(out, (tuple, list)) and len(out) == 2
                    and isinstance(out[0], str) and isinstance(out[1], Mapping)):
                raise ConfigError(
                    f"{self.name}.worker_spec() returned {out!r:.80}; expected "
                    "('package.module:factory', {keyword arguments})"
                )
            import_object(out[0], "evaluator factory")  # fail here, not in every worker
            return "spec", (out[0], dict(out[1]))
        try:
            return "pickle", pickle.dumps(self.evaluator)
        except Exception as err:
            raise ConfigError(
                f"workers > 1 needs the evaluator in every worker process, but {self.name} "
                f"cannot be pickled ({type(err).__name__}: {err}). Give it a method "
                "worker_spec() returning ('package.module:factory', {kwargs}) that builds an "
                "equivalent evaluator, or use workers=1."
            ) from err

    @staticmethod
    def from_payload(payload: tuple[str, Any]) -> Any:
        """The evaluator a worker process rebuilds from `payload`."""
        kind, data = payload
        if kind == "spec":
            path, kwargs = data
            return import_object(path, "evaluator factory")(**kwargs)
        return pickle.loads(data)
