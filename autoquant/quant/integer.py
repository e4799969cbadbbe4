"""What the deploy runtime runs as an integer kernel: the layer kinds onnxruntime's CPU
provider fuses into QGemm / QLinearConv, and the int32 bias such a kernel adds."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoquant.plan import parse_scheme

__all__ = ["INTEGER_KERNEL_KINDS", "CONV_KINDS", "bias_ints", "runs_torch_forward",
           "slow_integer_kernel", "has_integer_kernel", "kernel_note_of"]

INTEGER_KERNEL_KINDS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_KINDS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INT32 = (-(2**31), 2**31 - 1)


def bias_ints(bias: torch.Tensor, act_scale: torch.Tensor, weight_scale: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 bias, its float32 scale ``act_scale * weight_scale``) as an integer kernel
    adds it to its int32 accumulator; ``q.float() * scale`` is the bias it computes with.

    Runtimes fuse a bias into QLinearConv/QGemm only at exactly this scale (zero point 0)."""
    scale = (act_scale.detach().float().reshape(()) * weight_scale.detach().float()).reshape(-1)
    scale = scale.to(bias.device)
    q = torch.round(bias.detach().double() / scale.double()).clamp(*_INT32)
    return q.to(torch.int32), scale


def runs_torch_forward(module: nn.Module) -> bool:
    """True for a module of an `INTEGER_KERNEL_KINDS` type that runs torch's own forward
    (a subclass with its own forward may do anything after the bias)."""
    for base in INTEGER_KERNEL_KINDS:
        if isinstance(module, base):
            return type(module).forward is base.forward
    return False


def slow_integer_kernel(module: nn.Module) -> str | None:
    """Why onnxruntime's integer convolution would be slower than its float one for
    `module` (a 3-D or a grouped, not depthwise, convolution: QLinearConv has no fast path
    there, about 3x its float Conv); None where it is not."""
    if isinstance(module, nn.Conv3d):
        return ("a 3-D convolution: onnxruntime's QLinearConv is about 3x slower than its "
                "float Conv there, so it runs float on dequantized weights")
    if isinstance(module, CONV_KINDS) and module.groups > 1 and not (
            module.groups == module.in_channels):
        return (f"a grouped convolution (groups={module.groups}, not depthwise): "
                "onnxruntime's QLinearConv is about 3x slower than its float Conv there, so "
                "it runs float on dequantized weights")
    return None


def has_integer_kernel(module: nn.Module) -> bool:
    """Whether onnxruntime runs `module` as a fast integer kernel once its input and weight
    quantize as that kernel needs: torch's own Linear/Conv forward, not a convolution form
    whose integer kernel is slower than the float one (`slow_integer_kernel`)."""
    return runs_torch_forward(module) and slow_integer_kernel(module) is None


def kernel_note_of(layer: Any) -> str | None:
    """None when onnxruntime's CPU provider is expected to run the active `QuantLayer` `layer`
    as an integer kernel; else the reason it runs in float on dequantized weights."""
    module, mode = layer.module, layer.config.mode
    if not layer.active:
        return "float"
    if not runs_torch_forward(module):
        if isinstance(module, INTEGER_KERNEL_KINDS):
            return (f"{type(module).__name__} subclass with its own forward(): exported "
                    "on dequantized weights")
        return (f"onnxruntime's CPU provider has no integer {type(module).__name__} "
                "kernel: it runs on dequantized weights")
    slow = slow_integer_kernel(module)
    if slow is not None:
        return slow
    if mode == "weight_only":
        return "weight-only: the input stays float, the op runs on dequantized weights"
    if mode == "dynamic":
        return ("dynamic: the input qparams are computed in the graph, which onnxruntime "
                "does not fuse into an integer kernel")
    bits = parse_scheme(layer.scheme)
    if bits is not None and max(bits) > 8:
        return f"{layer.scheme}: onnxruntime's CPU provider has no 16-bit integer kernel"
    if layer.act_range is not None and layer.act_range[2] is not None:
        return "per-channel input scales: QGemm/QLinearConv take one input scale"
    if not layer.requant and layer.requant_note:
        return layer.requant_note
    return None
