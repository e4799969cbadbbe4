"""Deployment: the ONNX export in the QDQ patterns runtimes fuse into integer kernels, its
graph signature (names, dynamic axes), and the checks and figures of the exported file
in onnxruntime (parity, integer kernels, size, latency, `ortmodule.OnnxModule`)."""

from autoquant.export.onnx_export import (
    DEFAULT_OPSET,
    export_checked,
    export_float_onnx,
    export_measured,
    export_onnx,
    export_saved,
)

__all__ = ["DEFAULT_OPSET", "export_onnx", "export_checked", "export_measured",
           "export_float_onnx", "export_saved"]
