"""Saving a `SearchResult` to a folder: the final config, the fake-quant state dict and the
report, each written atomically; `autoquant.load_quantized` reads the first two back."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autoquant.io.atomic import atomic_torch_save, atomic_write_text, ensure_directory
from autoquant.io.names import CONFIG_FILE, REPORT_FILE, STATE_FILE
from autoquant.report.build import build_report

__all__ = ["save_result", "record_deployment"]

logger = logging.getLogger(__name__)


def save_result(result: Any, directory: str | Path) -> Path:
    """Write `result`'s (an `autoquant.result.SearchResult`) config, state dict and
    ``report.json`` into `directory`.

    Example:
        >>> save_result(result, "out/search")

    Raises:
        OutputError: `directory` is a file, or a file cannot be written (nothing is
            half-written; see `autoquant.io.atomic`).
    """
    out = ensure_directory(directory, "the folder a result is saved into")
    result.config.save(out / CONFIG_FILE)
    atomic_torch_save(out / STATE_FILE, result.model.state_dict())
    atomic_write_text(out / REPORT_FILE, json.dumps(build_report(result), indent=2) + "\n")
    logger.info("saved %s, %s and %s to %s", CONFIG_FILE, STATE_FILE, REPORT_FILE, out)
    return out


def record_deployment(report_path: str | Path, figures: Mapping[str, Any]) -> Path:
    """Write an export's `figures` into ``deployment.export`` of a saved ``report.json``
    (atomically)."""
    from autoquant.report.validate import read_report

    path = Path(report_path)
    report = read_report(path)
    report.setdefault("deployment", {})["export"] = dict(figures)
    return atomic_write_text(path, json.dumps(report, indent=2) + "\n")
