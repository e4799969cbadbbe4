"""Measured deployment figures of an exported ONNX model: size, latency, parity.

Used by `SearchResult.export_onnx`, `autoquant.export.export_saved` (the figures go into the
report's ``settings.deployment``) and ``benchmarks/deploy.py``. onnxruntime is optional
(the ``onnx`` extra) and imported only here, when a session is made.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoquant.errors import ConfigError, ExportError
from autoquant.io import atomic_write_text

__all__ = [
    "ort_session",
    "ort_feed",
    "ort_run",
    "median_ms",
    "flat_outputs",
    "parity",
    "deployment_figures",
    "record_deployment",
]

logger = logging.getLogger(__name__)


def ort_session(path: str | Path, threads: int = 2,
                config: Mapping[str, str] | None = None) -> Any:
    """An onnxruntime CPU session on `path` with `threads` intra-op threads (1 inter-op)
    and the session `config` entries (e.g. ``{"session.disable_quant_qdq": "1"}``)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConfigError(
            "onnxruntime is not installed; pip install 'autoquant[onnx]' to run ONNX models"
        ) from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _tensors(example_inputs: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    if isinstance(example_inputs, Mapping):
        leaves = tree_leaves(dict(example_inputs))
    elif isinstance(example_inputs, (tuple, list)):
        leaves = tree_leaves(tuple(example_inputs))
    else:
        leaves = [example_inputs]
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def ort_feed(session: Any, example_inputs: Any) -> dict[str, Any]:
    """The input dict of `session` for `example_inputs` (the tensors, in flattened order)."""
    tensors = _tensors(example_inputs)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ConfigError(
            f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}) but the example "
            f"inputs hold {len(tensors)} tensor(s); pass the inputs the model was exported with"
        )
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}


def ort_run(session: Any, example_inputs: Any) -> list[Any]:
    """Run `session` on `example_inputs`; the outputs as numpy arrays."""
    return session.run(None, ort_feed(session, example_inputs))


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple, list or dict), in flattened order."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def median_ms(fn: Callable[[], Any], repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` runs, after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _run_torch(model: nn.Module, example_inputs: Any) -> Any:
    from autoquant.qmodel import run_model

    with torch.no_grad():
        return run_model(model, example_inputs)


def parity(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict[str, float]:
    """How closely `outputs` (e.g. onnxruntime's) match `reference` (the torch model's).

    ``max_abs_diff``: the largest absolute difference; ``matching_outputs``: the fraction of
    elements within ``1e-4 * (1 + max|reference|)`` (the rest are the rare one-step rounding
    flips caused by a different float summation order).
    """
    ref = torch.cat([t.detach().float().reshape(-1) for t in reference])
    out = torch.cat([t.detach().float().reshape(-1) for t in outputs])
    if ref.numel() == 0:
        return {"max_abs_diff": 0.0, "matching_outputs": 1.0}
    diff = (out - ref).abs()
    tol = 1e-4 * (1.0 + float(ref.abs().max()))
    return {"max_abs_diff": float(diff.max()),
            "matching_outputs": float((diff <= tol).float().mean())}


def deployment_figures(model: nn.Module, onnx_path: str | Path, example_inputs: Any,
                       opset: int, threads: int = 2, repeats: int = 20) -> dict[str, Any]:
    """File size, latency (onnxruntime and the torch fake-quant model) and output parity.

    Latencies are medians over `repeats` runs on `example_inputs` (their batch) with
    `threads` threads; ``max_abs_diff`` and ``matching_outputs`` compare the ONNX outputs
    with the torch model's on the same inputs (see `parity`). Without onnxruntime only the
    size is recorded.
    """
    path = Path(onnx_path)
    figures: dict[str, Any] = {
        "onnx_path": str(path),
        "opset": opset,
        "file_bytes": path.stat().st_size,
        "threads": threads,
    }
    tensors = _tensors(example_inputs)
    if tensors and tensors[0].dim() >= 1:
        figures["batch"] = int(tensors[0].shape[0])
    try:
        session = ort_session(path, threads)
    except ConfigError as err:  # onnxruntime is not installed
        logger.info("no latency or parity figures: %s", err)
        return figures
    except Exception as err:  # onnxruntime's own error types
        raise ExportError(
            f"onnxruntime cannot load the exported {path}: {err}. The file is written; "
            "pass measure=False to skip this check, or report the model"
        ) from err
    try:
        ort_out = ort_run(session, example_inputs)
    except ConfigError:
        raise
    except Exception as err:
        raise ExportError(
            f"onnxruntime cannot run the exported {path} on the example inputs: {err}"
        ) from err
    torch_out = [t.detach().cpu().float() for t in flat_outputs(_run_torch(model,
                                                                            example_inputs))]
    if len(torch_out) == len(ort_out) and torch_out:
        figures.update(parity(torch_out, [torch.from_numpy(o) for o in ort_out]))
    feed = ort_feed(session, example_inputs)
    figures["onnxruntime_ms"] = median_ms(lambda: session.run(None, feed), repeats)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        figures["torch_fake_quant_ms"] = median_ms(lambda: _run_torch(model, example_inputs),
                                                   repeats)
    finally:
        torch.set_num_threads(previous)
    return figures


def record_deployment(report_path: str | Path, figures: Mapping[str, Any]) -> Path:
    """Write `figures` into ``settings.deployment`` of a saved ``report.json`` (atomically)."""
    path = Path(report_path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the report {path}: {err}") from err
    report.setdefault("settings", {})["deployment"] = dict(figures)
    return atomic_write_text(path, json.dumps(report, indent=2) + "\n")
