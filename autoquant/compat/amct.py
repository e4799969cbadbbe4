"""AMCT-style entry points for users migrating from Huawei AMCT:
`create_quant_config` and `accuracy_based_auto_calibration`, built on `auto_quantize`."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoquant.api import auto_quantize
from autoquant.config import QuantConfig
from autoquant.errors import ConfigError
from autoquant.io.atomic import atomic_write_text
from autoquant.quant.qmodel import QuantModel, find_quantizable_layers
from autoquant.result import SearchResult

__all__ = ["create_quant_config", "accuracy_based_auto_calibration"]

logger = logging.getLogger(__name__)

_AMCT_STRATEGIES = {"BinarySearch": "binary", "BinarySearchStrategy": "binary"}
_AMCT_SENSITIVITY = {"CosineSimilarity": "cosine"}


def _amct_inputs(input_data: Any) -> Any:
    if isinstance(input_data, torch.Tensor):
        return (input_data,)
    return input_data


def create_quant_config(
    config_file: str | Path,
    model: nn.Module,
    input_data: Any = None,
    skip_layers: Sequence[str] | None = None,
    batch_num: int = 1,
) -> QuantConfig:
    """Write the editable per-layer quant config of `model` to `config_file` (AMCT style).

    Every quantizable layer gets an explicit entry with the default settings, ready to edit.
    ``.json`` gives JSON, anything else YAML. `input_data` (a tensor or a tuple of inputs)
    checks that the model runs; `batch_num` is recorded for AMCT compatibility and is the
    number of calibration batches `accuracy_based_auto_calibration` expects to be run.
    """
    if isinstance(batch_num, bool) or not isinstance(batch_num, int) or batch_num < 1:
        raise ConfigError(f"batch_num must be an int >= 1, got {batch_num!r}")
    names = find_quantizable_layers(model)
    base = QuantConfig(skip_layers=list(skip_layers or []))
    base.check_layers(names)
    if input_data is not None:
        QuantModel(model, base, _amct_inputs(input_data))
    layers = {n: base.default.to_dict() for n in names if n not in set(base.skip_layers)}
    cfg = QuantConfig(default=base.default, layers=layers, skip_layers=base.skip_layers)
    cfg.save(config_file)
    logger.info("wrote the per-layer quant config of %d layers to %s", len(layers), config_file)
    return cfg


def accuracy_based_auto_calibration(
    model: nn.Module,
    model_evaluator: Any,
    config_file: str | Path,
    record_file: str | Path,
    save_dir: str | Path,
    input_data: Any = None,
    strategy: str = "BinarySearch",
    sensitivity: str = "CosineSimilarity",
    max_evaluations: int | None = None,
) -> SearchResult:
    """AMCT-compatible search: ``model_evaluator.metric_eval`` decides each trial.

    Reads the quant config from `config_file` (see `create_quant_config`), writes every
    trial record to `record_file` (JSON) and the result to `save_dir`. Layers are ranked by
    their own output, as AMCT ranks them. Unlike AMCT, it always returns the result, also
    when the goal is not met.
    """
    custom = getattr(model_evaluator, "metric_eval", None)
    if not callable(custom) or custom(0.0, 0.0) is NotImplemented:
        raise ConfigError(
            f"{type(model_evaluator).__name__} must implement metric_eval(original_metric, "
            "new_metric) -> (ok, loss) for accuracy_based_auto_calibration; or call "
            "autoquant.auto_quantize(..., max_loss=..., loss_type=...) instead"
        )
    result = auto_quantize(
        model,
        model_evaluator,
        _amct_inputs(input_data),
        strategy=_AMCT_STRATEGIES.get(strategy, strategy),
        sensitivity=_AMCT_SENSITIVITY.get(sensitivity, sensitivity),
        sensitivity_scope="layer",  # AMCT ranks by each layer's own output
        config=config_file,
        max_evaluations=max_evaluations,
    )
    records = {
        "status": result.status,
        "float_metric": result.float_metric,
        "ranking": [r.to_dict() for r in result.sensitivity],
        "trials": [r.to_dict() for r in result.history],
        "fallback_layers": result.fallback_layers,
    }
    atomic_write_text(record_file, json.dumps(records, indent=2) + "\n")
    result.save(save_dir)
    return result
