"""The `Evaluator` base class; the contract lives in the core (`autoquant.evaluation.base`),
so that the ready evaluators here and the core share one class."""

from autoquant.evaluation.base import Evaluator

__all__ = ["Evaluator"]
