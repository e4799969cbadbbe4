"""Shared by the export tests: run an exported file in onnxruntime and compare it with the
torch fake-quant model under one stated tolerance.

The tolerance, with m = 1 + max|y|: at least 90% of the outputs within 1e-4 * m, all within
5e-2 * m (an activation rounding to the other integer step may move a few outputs).
Import this module after ``pytest.importorskip("onnxruntime")``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


def ort_run(path, x: torch.Tensor) -> torch.Tensor:
    """The first output of the ONNX file at `path` run in onnxruntime on the input `x`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def optimized_ops(path, tmp_path: Path) -> set[str]:
    """The op types of the graph onnxruntime optimizes the ONNX file at `path` into (default
    session options), written under `tmp_path`."""
    import onnx

    from autoquant.export.ortmodule import ort_session

    optimized = tmp_path / "optimized.onnx"
    ort_session(path, optimized_model=optimized)
    return {n.op_type for n in onnx.load(str(optimized)).graph.node}


def check_parity(qmodel: nn.Module, path, x: torch.Tensor) -> None:
    """Assert onnxruntime computes what `qmodel` computes on `x`, within the tolerance."""
    with torch.no_grad():
        ref = qmodel(x)
    if isinstance(ref, tuple):
        ref = ref[0]
    diff = (ort_run(path, x) - ref).abs()
    scale = 1.0 + float(ref.abs().max())
    close = float((diff <= 1e-4 * scale).float().mean())
    assert close >= 0.9, f"only {close:.4f} of the outputs match (max diff {diff.max()})"
    assert float(diff.max()) <= 5e-2 * scale, f"max abs diff {diff.max()}"


def check_parity_catches_a_scale_error(qmodel: nn.Module, path, x: torch.Tensor,
                                       initializer: str, tmp_path: Path) -> None:
    """The tolerance has teeth: a 1% error in the initializer `initializer` (an activation
    scale) of a copy of the file at `path` breaks `check_parity`."""
    import onnx
    import onnx.numpy_helper

    broken = onnx.load(str(path))
    for init in broken.graph.initializer:
        if init.name == initializer:
            value = onnx.numpy_helper.to_array(init) * 1.01
            init.CopyFrom(onnx.numpy_helper.from_array(value, init.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(AssertionError, match="outputs match"):
        check_parity(qmodel, tmp_path / "broken.onnx", x)
