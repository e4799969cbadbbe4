"""autoquant: accuracy-driven auto-quantization search for PyTorch.

Find the most-quantized model that stays within an accuracy-loss budget, in as few full
evaluations as possible::

    import autoquant as aq
    result = aq.auto_quantize(model, MyEvaluator(), example_inputs=(x,), max_loss=0.01)
"""

from __future__ import annotations

import logging
from typing import Any

from autoquant import _layout  # noqa: F401 - finds autoquant.strategies/.evaluators first
from autoquant.api import auto_quantize, load_quantized, quantize, sensitivity_analysis
from autoquant.compat.amct import accuracy_based_auto_calibration, create_quant_config
from autoquant.config import LayerConfig, QuantConfig, QuantizerConfig
from autoquant.errors import (
    AutoquantError,
    ConfigError,
    EvaluatorError,
    ExportError,
    InternalError,
    ModelError,
    UserError,
)
from autoquant.evaluation.criterion import AccuracyCriterion
from autoquant.quant.kinds import QuantMatMul, convert_matmuls
from autoquant.result import SearchResult
from autoquant.search.strategy import SearchContext, SearchStrategy, TrialRecord, register_strategy
from autoquant.sensitivity.ranking import LayerSensitivity, SensitivityMetric, register_sensitivity

__version__ = "0.1.0"

__all__ = [
    "auto_quantize",
    "quantize",
    "sensitivity_analysis",
    "load_quantized",
    "create_quant_config",
    "accuracy_based_auto_calibration",
    "QuantConfig",
    "LayerConfig",
    "QuantizerConfig",
    "QuantMatMul",
    "convert_matmuls",
    "AccuracyCriterion",
    "SearchResult",
    "TrialRecord",
    "LayerSensitivity",
    "SearchStrategy",
    "SearchContext",
    "SensitivityMetric",
    "register_strategy",
    "register_sensitivity",
    "Evaluator",
    "AutoquantError",
    "UserError",
    "ConfigError",
    "ModelError",
    "EvaluatorError",
    "ExportError",
    "InternalError",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # `aq.Evaluator` is the base class from the `evaluators` package, imported on first use
    # so that the core never imports the evaluators package eagerly.
    if name == "Evaluator":
        from autoquant.evaluators.base import Evaluator

        return Evaluator
    raise AttributeError(f"module 'autoquant' has no attribute {name!r}")
