"""What every layer wrapper shares with the module it wraps: reads of the module's
attributes through the wrapper, the user's forward hooks around a quantized computation,
torch's encoder fast path kept out, and the hand-off of outputs to the sensitivity pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoquant.batches import primary_tensor

__all__ = ["DIRECT_KINDS", "ForwardsAttributes", "all_finite", "call_with_module_hooks",
           "compare", "forward_attribute", "no_fast_path"]

DIRECT_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # computed without module.__call__


def call_with_module_hooks(module: nn.Module, compute: Any, *args: Any, **kwargs: Any) -> Any:
    """``compute(*args, **kwargs)`` in place of `module`'s forward, with the module's own
    forward (pre-)hooks around it: a user's hook on a Linear still applies to the
    quantized Linear. Without hooks it is just the call."""
    if not (module._forward_hooks or module._forward_pre_hooks):
        return compute(*args, **kwargs)
    module.forward = compute  # an instance attribute shadows the class's forward
    try:
        return module(*args, **kwargs)
    finally:
        del module.forward


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of `t` is NaN or infinite. One min/max reduction (NaN and the
    infinities propagate to it): `torch.isfinite(t).all()` builds a mask of every element
    and costs about 15x more, which the sensitivity pass paid on every layer call."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def compare(layer: nn.Module, y: Any, y_q: Any) -> None:
    """Hand one call's float and quantized outputs to the layer's sensitivity accumulator;
    a quantized output with NaN or inf marks the layer broken instead (a NaN would score
    as identical to float)."""
    y, y_q = primary_tensor(y).detach(), primary_tensor(y_q).detach()
    if not all_finite(y_q):
        layer.nonfinite = True
        return
    layer.comparator.update(y, y_q)


def forward_attribute(wrapper: nn.Module, name: str) -> Any:
    """`name` read from the module `wrapper` wraps (its ``module`` child).

    Dunder names are never forwarded: ``copy.deepcopy`` looks up ``__deepcopy__``, and a
    parametrized module (weight_norm, spectral_norm) defines one, which would copy the
    wrapped float module in place of the wrapper."""
    inner = wrapper.__dict__.get("_modules", {}).get("module")
    if inner is None or (name.startswith("__") and name.endswith("__")):
        raise AttributeError(f"{type(wrapper).__name__!r} object has no attribute {name!r}")
    return getattr(inner, name)


class ForwardsAttributes:
    """Mixin (before `nn.Module`) for a module that wraps another as its ``module`` child:
    attributes it lacks are read from the wrapped module (`forward_attribute`), so parents
    that read ``self.fc.in_features`` or ``self.attn.batch_first`` keep working."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            return forward_attribute(self, name)  # type: ignore[arg-type]


def no_fast_path(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook; its presence disables torch's fused encoder fast path.

    Why: ``nn.TransformerEncoderLayer`` in eval mode may call a fused kernel that reads its
    children's raw float weights, skipping the quantized wrappers (search and export)."""
    return None
