"""`load_quantized`: the fake-quant model rebuilt from a folder `SearchResult.save` wrote (its
config and state dict), on a copy of the float model; no calibration data is needed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autoquant.config import QuantConfig
from autoquant.errors import ConfigError, ModelError
from autoquant.io.checkpoint import load_state_dict_file
from autoquant.io.names import CONFIG_FILE, STATE_FILE
from autoquant.quant.qmodel import QuantModel

__all__ = ["load_quantized"]


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the fake-quant model saved by `SearchResult.save` on a copy of `model`.

    Uses the saved config and qparams; no calibration data is needed.

    Example:
        >>> qmodel = load_quantized(build_model(), "out/search")
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, STATE_FILE):
        if not (directory / name).is_file():
            raise ConfigError(
                f"{directory} has no {name}; pass the folder written by SearchResult.save()"
            )
    cfg = QuantConfig.load(directory / CONFIG_FILE)
    qmodel = QuantModel(model, cfg)
    state = load_state_dict_file(directory / STATE_FILE, "the saved quantized model")
    try:
        qmodel.model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(
            f"{directory / STATE_FILE} does not fit this model with the saved config: {err}. "
            "Pass the same float model architecture the search was run on."
        ) from err
    _check_scales(qmodel.model, directory / STATE_FILE)
    qmodel.apply_plan(qmodel.quant_plan())
    return qmodel.model


def _check_scales(model: nn.Module, path: Path) -> None:
    """Every loaded quantization scale is finite and > 0 (a tampered or corrupt state dict
    with a zero scale divides by zero in every forward)."""
    for name, buf in model.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if buf.numel() and ("scale" in leaf) and buf.is_floating_point():
            bad = ~(torch.isfinite(buf) & (buf > 0))
            if bool(bad.any()):
                raise ModelError(
                    f"{path}: the quantization scale {name!r} holds {int(bad.sum())} value(s) "
                    "that are zero, negative, NaN or inf; the file is corrupt or was edited. "
                    "Save the result again with SearchResult.save()")
