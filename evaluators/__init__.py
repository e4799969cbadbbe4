"""Evaluators: the `Evaluator` base and ready-made evaluators."""

from evaluators.base import Evaluator
from evaluators.classification import ClassificationEvaluator
from evaluators.fidelity import FidelityEvaluator
from evaluators.perplexity import PerplexityEvaluator

__all__ = ["ClassificationEvaluator", "Evaluator", "FidelityEvaluator", "PerplexityEvaluator"]
