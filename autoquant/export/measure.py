"""What the exported file delivers in onnxruntime with default session options: which
quantized layers run integer kernels (read off the graph onnxruntime optimizes), and the
file size and latency, also as ratios to the float export (timed interleaved)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoquant.errors import ConfigError
from autoquant.export.runtime import (
    flat_outputs,
    interleaved_ms,
    median_ms,
    ort_feed,
    ort_run,
    ort_session,
    parity,
    run_torch,
    tensors_of,
)

__all__ = ["INTEGER_OPS", "kernel_coverage", "deployment_figures"]

logger = logging.getLogger(__name__)

# onnxruntime ops that compute on integers (what its QDQ fusions produce)
INTEGER_OPS = frozenset({
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger",
    "ConvInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention",
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearWhere", "QEmbedLayerNormalization", "QOrderedMatMul",
})


def kernel_coverage(onnx_path: str | Path, notes: Mapping[str, str | None]
                    ) -> dict[str, Any]:
    """Which quantized layers onnxruntime runs as integer kernels, read off the graph it
    optimizes with default options.

    Args:
        onnx_path: the exported file.
        notes: ``{layer: None or why it cannot run an integer kernel}`` for every exported
            quantized layer (`autoquant.export.onnx_export.kernel_notes`).

    Returns:
        ``{"integer": [layers], "float": {layer: reason}, "summary": "k of N ..."}``. A
        layer counts as integer when an integer op reads one of its initializers and no
        DequantizeLinear of its integer weights is left for a float op.
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(onnx_path, optimized_model=optimized)  # writes the optimized graph
        proto = onnx.load(str(optimized), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    integer: list[str] = []
    floats: dict[str, str] = {}
    for layer, note in notes.items():
        mine = [name for name in readers if name.startswith(f"{layer}.")]
        weights = [n for n in mine if ".weight_int" in n or ".wint_" in n]
        fused = any(readers[n] & INTEGER_OPS for n in mine)
        dequantized = any("DequantizeLinear" in readers[n] for n in weights)
        if fused and not dequantized:
            integer.append(layer)
        else:
            floats[layer] = note or ("onnxruntime did not fuse it into an integer kernel "
                                     "(its DequantizeLinear stays before a float op)")
    total = len(notes)
    return {"integer": integer, "float": floats,
            "summary": f"{len(integer)} of {total} quantized layers run integer kernels"}


def deployment_figures(model: nn.Module, onnx_path: str | Path, example_inputs: Any,
                       opset: int, threads: int | None = None, repeats: int = 20,
                       float_onnx: str | Path | None = None) -> dict[str, Any]:
    """File size, latency in onnxruntime (and as a ratio to the float export when
    `float_onnx` is given, timed interleaved) and of the torch fake-quant model, output
    parity on `example_inputs`. Without onnxruntime only the size is recorded."""
    path = Path(onnx_path)
    figures: dict[str, Any] = {"onnx_path": str(path), "opset": opset,
                               "file_bytes": path.stat().st_size, "threads": threads}
    tensors = tensors_of(example_inputs)
    if tensors and tensors[0].dim() >= 1:
        figures["batch"] = int(tensors[0].shape[0])
    try:
        session = ort_session(path, threads)
    except ConfigError as err:  # onnxruntime is not installed
        logger.info("no latency or parity figures: %s", err)
        return figures
    figures.update(parity(
        [t.detach().cpu().float() for t in flat_outputs(run_torch(model, example_inputs))],
        [torch.from_numpy(o) for o in ort_run(session, example_inputs)]))
    feed = ort_feed(session, example_inputs)
    runs = [lambda: session.run(None, feed)]
    if float_onnx is not None:
        figures["float_file_bytes"] = Path(float_onnx).stat().st_size
        figures["size_ratio"] = figures["file_bytes"] / figures["float_file_bytes"]
        float_session = ort_session(float_onnx, threads)
        float_feed = ort_feed(float_session, example_inputs)
        runs.append(lambda: float_session.run(None, float_feed))
    times = interleaved_ms(runs, repeats)
    figures["onnxruntime_ms"] = times[0]
    if float_onnx is not None:
        figures["float_onnxruntime_ms"] = times[1]
        figures["latency_ratio"] = times[0] / times[1]
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        figures["torch_fake_quant_ms"] = median_ms(lambda: run_torch(model, example_inputs),
                                                   repeats)
    finally:
        torch.set_num_threads(previous)
    return figures
