"""autoquant: accuracy-driven auto-quantization search for PyTorch.

Find the most-quantized model that stays within an accuracy-loss budget, in as few full
evaluations as possible::

    import autoquant as aq
    result = aq.auto_quantize(model, MyEvaluator(), example_inputs=(x,), max_loss=0.01)
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from autoquant import _layout  # noqa: F401 - finds autoquant.strategies/.evaluators first

__version__ = "0.1.0"

# public name -> the module that defines it; imported on first use, so `import autoquant`
# (and `autoquant --help`) does not import torch, and the core never imports a concrete
# evaluator (the ready ones resolve here, by name)
_EXPORTS = {
    "auto_quantize": "autoquant.api",
    "quantize": "autoquant.api",
    "sensitivity_analysis": "autoquant.api",
    "load_quantized": "autoquant.quant.saved",
    "create_quant_config": "autoquant.compat.amct",
    "accuracy_based_auto_calibration": "autoquant.compat.amct",
    "QuantConfig": "autoquant.config",
    "LayerConfig": "autoquant.config",
    "QuantizerConfig": "autoquant.config",
    "SearchSettings": "autoquant.settings",
    "QuantMatMul": "autoquant.quant.kinds",
    "convert_matmuls": "autoquant.quant.kinds",
    "register_layer_kind": "autoquant.quant.kind_registry",
    "AccuracyCriterion": "autoquant.evaluation.criterion",
    "SearchResult": "autoquant.result",
    "TrialRecord": "autoquant.search.strategy",
    "SearchStrategy": "autoquant.search.strategy",
    "SearchContext": "autoquant.search.strategy",
    "register_strategy": "autoquant.search.strategy",
    "LayerSensitivity": "autoquant.sensitivity.ranking",
    "SensitivityMetric": "autoquant.sensitivity.ranking",
    "register_sensitivity": "autoquant.sensitivity.ranking",
    "Evaluator": "autoquant.evaluation.base",
    "FunctionEvaluator": "autoquant.evaluation.functional",
    "ClassificationEvaluator": "autoquant.evaluators.classification",
    "FidelityEvaluator": "autoquant.evaluators.fidelity",
    "PerplexityEvaluator": "autoquant.evaluators.perplexity",
    "OnnxModule": "autoquant.export.ortmodule",
    "AutoquantError": "autoquant.errors",
    "UserError": "autoquant.errors",
    "ConfigError": "autoquant.errors",
    "ModelError": "autoquant.errors",
    "EvaluatorError": "autoquant.errors",
    "ExportError": "autoquant.errors",
    "InternalError": "autoquant.errors",
}

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
    "SearchSettings",
    "QuantMatMul",
    "convert_matmuls",
    "register_layer_kind",
    "AccuracyCriterion",
    "SearchResult",
    "TrialRecord",
    "SearchStrategy",
    "SearchContext",
    "register_strategy",
    "LayerSensitivity",
    "SensitivityMetric",
    "register_sensitivity",
    "Evaluator",
    "FunctionEvaluator",
    "ClassificationEvaluator",
    "FidelityEvaluator",
    "PerplexityEvaluator",
    "OnnxModule",
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

if TYPE_CHECKING:  # what type checkers and IDEs see
    from autoquant.api import auto_quantize, quantize, sensitivity_analysis
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
    from autoquant.evaluation.base import Evaluator
    from autoquant.evaluation.criterion import AccuracyCriterion
    from autoquant.evaluation.functional import FunctionEvaluator
    from autoquant.evaluators import (
        ClassificationEvaluator,
        FidelityEvaluator,
        PerplexityEvaluator,
    )
    from autoquant.export.ortmodule import OnnxModule
    from autoquant.quant.kind_registry import register_layer_kind
    from autoquant.quant.kinds import QuantMatMul, convert_matmuls
    from autoquant.quant.saved import load_quantized
    from autoquant.result import SearchResult
    from autoquant.search.strategy import (
        SearchContext,
        SearchStrategy,
        TrialRecord,
        register_strategy,
    )
    from autoquant.sensitivity.ranking import (
        LayerSensitivity,
        SensitivityMetric,
        register_sensitivity,
    )
    from autoquant.settings import SearchSettings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autoquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
