"""The copy an export traces: every active quantized layer swapped for its export-time QDQ
module (`autoquant.export.qdq`), float layers unwrapped; what the copy's layers need of the
runtime (`kernel_notes`) and which deploy target they were quantized for."""

from __future__ import annotations

from torch import nn

from autoquant.errors import ConfigError, ExportError, InternalError, ModelError
from autoquant.export.qdq import QDQLayer, QDQMultiLayer, QDQSigmoid
from autoquant.quant.activations import QuantSigmoid, QuantSiLU, sigmoid_range
from autoquant.quant.copying import copy_model
from autoquant.quant.kinds.base import MultiQuantLayer
from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.target import TARGETS, runs_exactly_on

__all__ = ["export_copy", "refuse_unexportable", "kernel_notes", "model_target",
           "check_target"]


def export_copy(model: nn.Module, quantized: bool) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `model` with every QuantLayer swapped for a `QDQLayer` (if active and
    `quantized`) or for its float module; returns it and ``{layer: storage bits}``."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy_model(model)  # export works on a copy: the search result never changes
    work.eval()
    refuse_unexportable(work)
    layers: dict[str, int] = {}
    for name, module in list(work.named_modules()):
        if not isinstance(module, QuantLayer):
            continue
        active = (quantized and module.state is QuantState.QUANTIZE
                  and module.active)
        new: nn.Module = module.module
        if active:
            new = QDQMultiLayer(module) if isinstance(module, MultiQuantLayer) \
                else QDQLayer(module)
        if active:
            layers[name] = new.storage_bits  # type: ignore[assignment]
        parent_name, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent_name) if parent_name else work, child, new)
    _export_sigmoids(work, quantized)
    return work, layers


def _export_sigmoids(work: nn.Module, quantized: bool) -> None:
    """Each `QuantSigmoid`/`QuantSiLU` becomes a `QDQSigmoid` where its quantizer is on
    (and `quantized`), else the plain torch module (one replacement per shared object)."""
    memo: dict[int, nn.Module] = {}
    for parent in list(work.modules()):
        for key, child in parent._modules.items():
            if not isinstance(child, (QuantSigmoid, QuantSiLU)):
                continue
            if id(child) not in memo:
                silu = isinstance(child, QuantSiLU)
                span = sigmoid_range(child) if quantized else None
                out = child.output_qparams() if silu and span is not None else None
                memo[id(child)] = QDQSigmoid(silu, span, out) if span is not None else \
                    nn.SiLU(child.inplace) if silu else nn.Sigmoid()
            parent._modules[key] = memo[id(child)]


def refuse_unexportable(work: nn.Module) -> None:
    """Raise ExportError for a module ONNX cannot express, before a broken file is made.

    An ``nn.LSTM`` with ``proj_size`` has no ONNX counterpart (the LSTM op has no
    projection); torch.onnx writes a graph onnxruntime cannot run, even for a float model.
    """
    for name, module in work.named_modules():
        if isinstance(module, nn.LSTM) and module.proj_size > 0:
            layer = name.removesuffix(".module")
            raise ExportError(
                f"layer {layer!r} is an nn.LSTM with proj_size={module.proj_size}, which ONNX "
                "cannot express (its LSTM op has no projection; torch.onnx writes a graph "
                "onnxruntime refuses, even in float). Use proj_size=0 with an nn.Linear after "
                "the LSTM, or deploy the fake-quant model with torch; the search result is "
                "unchanged."
            )


def kernel_notes(model: nn.Module) -> dict[str, str | None]:
    """``{layer: None or why it cannot run an integer kernel}`` of every active quantized
    layer of the fake-quant `model` (see `QuantLayer.kernel_note`)."""
    notes: dict[str, str | None] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer) and module.active and \
                id(module) not in seen:
            seen.add(id(module))
            notes[name] = module.kernel_note()
    return notes


def model_target(model: nn.Module) -> str | None:
    """The deploy target the fake-quant `model` was quantized for (None: no layer)."""
    targets = {m.target for m in model.modules() if isinstance(m, QuantLayer)}
    if len(targets) > 1:
        raise InternalError(f"the model's layers were quantized for several targets: "
                            f"{sorted(targets)}")
    return next(iter(targets), None)


def check_target(searched: str | None, target: str | None, allow_mismatch: bool) -> None:
    if target is None or searched is None:
        return
    if target not in TARGETS or target == "auto":
        raise ConfigError(f"target must be one of {', '.join(t for t in TARGETS if t != 'auto')}"
                          f", got {target!r}")
    if not runs_exactly_on(searched, target) and not allow_mismatch:
        raise ExportError(
            f"the model was searched for target {searched!r}, whose 8-bit weights saturate "
            f"onnxruntime's kernels on {target!r}: what you would deploy is not what was "
            "searched. Search again with QuantConfig.target 'x86_avx2' (exact on every CPU) "
            "or the deploy CPU's target, or pass allow_target_mismatch=True to export anyway"
        )
