"""Which module types autoquant quantizes: each kind's weight axis (per output channel) and
the wrapper class that fake-quantizes it (`QuantLayer`, or a subclass from
`autoquant.quant.kinds`); third parties add kinds with `register_layer_kind`."""

from __future__ import annotations

import torch
from torch import nn

from autoquant.quant.layers import QuantLayer

__all__ = ["register_layer_kind", "layer_kinds", "weight_axis_of", "wrapper_class_of",
           "unquantized_weight_modules"]


# module type -> output-channel axis of its weight (per-channel quantization axis)
_LAYER_KINDS: dict[type[nn.Module], int] = {
    nn.Linear: 0,
    nn.Conv1d: 0,
    nn.Conv2d: 0,
    nn.Conv3d: 0,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 1,
}


# module type -> wrapper class, for kinds that need more than `QuantLayer`
# (see autoquant.quant.kinds)
_WRAPPERS: dict[type[nn.Module], type[QuantLayer]] = {}


def register_layer_kind(
    module_type: type[nn.Module], weight_axis: int, wrapper: type[QuantLayer] | None = None
) -> None:
    """Make `module_type` (and its subclasses) quantizable; its ``weight`` has
    output channels on `weight_axis`. `wrapper` is the `QuantLayer` subclass that wraps it
    (default: `QuantLayer` itself)."""
    _LAYER_KINDS[module_type] = weight_axis
    if wrapper is not None:
        _WRAPPERS[module_type] = wrapper
    else:
        _WRAPPERS.pop(module_type, None)


def wrapper_class_of(module: nn.Module) -> type[QuantLayer]:
    """The wrapper class registered for `module`'s kind (most specific type first)."""
    for kind in type(module).__mro__:
        if kind in _WRAPPERS:
            return _WRAPPERS[kind]
    return QuantLayer


def layer_kinds() -> dict[type[nn.Module], int]:
    """A copy of the registered quantizable module types and their weight axes."""
    return dict(_LAYER_KINDS)


def weight_axis_of(module: nn.Module) -> int | None:
    """The weight's output-channel axis if `module` is a quantizable kind, else None."""
    for kind, axis in _LAYER_KINDS.items():
        if isinstance(module, kind):
            return axis
    return None


# normalizations scale elementwise: a weight of 2+ dimensions there (a LayerNorm over
# (channels, bins)) is no matrix product
_NORMALIZATIONS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d,
                   nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def unquantized_weight_modules(model: nn.Module, quantized: set[str]) -> dict[str, list[str]]:
    """Modules that own a floating weight of 2 or more dimensions (a matrix product or a
    convolution, most likely) but are no quantizable kind, by class name: they stay float
    silently unless someone says so. Modules inside a quantizable one, and torch's
    normalizations, are left out."""
    found: dict[str, list[str]] = {}
    inside = tuple(f"{name}." for name in quantized)
    for name, module in model.named_modules():
        if not name or name in quantized or name.startswith(inside) or \
                weight_axis_of(module) is not None or isinstance(module, _NORMALIZATIONS):
            continue
        weight = module._parameters.get("weight")
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() >= 2:
            found.setdefault(type(module).__name__, []).append(name)
    return found
