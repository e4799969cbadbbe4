"""Evaluators: the `Evaluator` base and ready-made evaluators."""

# imported as a top-level `evaluators` (the repository folder on sys.path): say so
if __name__ != "autoquant.evaluators":
    raise ImportError(
        f"this folder installs as autoquant.evaluators, not as a top-level package {__name__!r}: "
        "import autoquant.evaluators (or use the autoquant.* names), and pip install -e . first"
    )

from autoquant.evaluators.base import Evaluator
from autoquant.evaluators.classification import ClassificationEvaluator
from autoquant.evaluators.fidelity import FidelityEvaluator
from autoquant.evaluators.perplexity import PerplexityEvaluator

__all__ = ["ClassificationEvaluator", "Evaluator", "FidelityEvaluator", "PerplexityEvaluator"]
