"""Fold eval-mode BatchNorm layers into the convolution that feeds them.

Folding ``conv -> bn`` into a single convolution before quantization removes a
layer whose statistics would otherwise be quantized separately, and gives the
quantizer the weights the deployed model will actually use.

Patterns are discovered with :func:`torch.fx.symbolic_trace`, but every change is
made on the caller's own module by qualified name, so module names are unchanged:
the convolution keeps its name with folded weight and bias, and the BatchNorm is
replaced by :class:`torch.nn.Identity` at its own name. Models that do not trace
are left untouched.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.parameter import is_lazy

__all__ = ["fold_conv_bn", "fold_pair"]

logger = logging.getLogger(__name__)

# Convolution type -> number of spatial dimensions.
_CONV_DIMS: dict[type[nn.Module], int] = {
    nn.Conv1d: 1,
    nn.Conv2d: 2,
    nn.Conv3d: 3,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 2,
    nn.ConvTranspose3d: 3,
}
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# BatchNorm type -> number of spatial dimensions it expects after it.
_BN_DIMS: dict[type[nn.Module], int] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
}


def _dims(module: nn.Module, table: dict[type[nn.Module], int]) -> int | None:
    """Return the spatial dimensionality of ``module`` if its type is in ``table``.

    Args:
        module: The module to classify.
        table: Mapping of supported module types to their spatial dimensionality.

    Returns:
        The dimensionality, or ``None`` when ``module`` is not a supported type.
    """
    for cls, dims in table.items():
        if isinstance(module, cls):
            return dims
    return None


def _first_line(exc: BaseException) -> str:
    """Return ``"ExcType: first line of the message"`` for a log line.

    Args:
        exc: The exception to summarise.

    Returns:
        The exception type name followed by the first line of its message.
    """
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _skip_reason(conv: _ConvNd, bn: _BatchNorm) -> str | None:
    """Return why ``conv`` and ``bn`` cannot be folded, or ``None`` if they can.

    Args:
        conv: A supported convolution module.
        bn: A supported BatchNorm module.

    Returns:
        A short human-readable reason, or ``None`` when folding is valid.
    """
    if _dims(conv, _CONV_DIMS) != _dims(bn, _BN_DIMS):
        return f"dimensionality differs ({type(conv).__name__} vs {type(bn).__name__})"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "BatchNorm has no running statistics"
    if bn.training:
        return "BatchNorm is in training mode (call model.eval() first)"
    if conv.out_channels != bn.num_features:
        return f"conv out_channels {conv.out_channels} != BatchNorm num_features {bn.num_features}"
    if is_lazy(conv.weight) or (conv.bias is not None and is_lazy(conv.bias)):
        return "convolution parameters are not initialized yet"
    return None


def _fold_into(conv: _ConvNd, bn: _BatchNorm) -> None:
    """Fold ``bn``'s eval-mode affine transform into ``conv``'s weight and bias, in place.

    The arithmetic is done in float64 and cast back to the parameters' dtype; the
    device of the convolution weight is kept.

    Args:
        conv: The convolution whose weight and bias are rewritten.
        bn: The BatchNorm that follows it, with running statistics.
    """
    assert bn.running_mean is not None and bn.running_var is not None
    weight = conv.weight
    device, dtype = weight.device, weight.dtype
    f64 = {"device": device, "dtype": torch.float64}

    with torch.no_grad():
        mean = bn.running_mean.to(**f64)
        var = bn.running_var.to(**f64)
        gamma = bn.weight.to(**f64) if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.to(**f64) if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)

        w = weight.to(**f64)
        kernel_ones = [1] * (w.dim() - 2)
        if isinstance(conv, _TRANSPOSED):
            # Weight is (in, out // groups, *k); out channel g * (out // groups) + j
            # lives at [group g's input rows, j].
            groups = conv.groups
            in_per, out_per = w.shape[0] // groups, w.shape[1]
            w = w.reshape(groups, in_per, out_per, *w.shape[2:])
            w = w * scale.reshape(groups, 1, out_per, *kernel_ones)
            w = w.reshape(weight.shape)
        else:
            # Weight is (out, in // groups, *k): scale along dim 0.
            w = w * scale.reshape(-1, 1, *kernel_ones)

        b = conv.bias.to(**f64) if conv.bias is not None else torch.zeros_like(mean)
        b = (b - mean) * scale + beta

        weight.copy_(w.to(dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(b.to(dtype=dtype), requires_grad=weight.requires_grad)
        else:
            conv.bias.copy_(b.to(dtype=conv.bias.dtype))


def _replace_with_identity(model: nn.Module, qualified_name: str) -> None:
    """Replace the submodule at ``qualified_name`` with :class:`torch.nn.Identity`.

    Args:
        model: The root module.
        qualified_name: Dotted path of the submodule, e.g. ``"features.1"``.
    """
    parent_name, _, child_name = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    # setattr registers under the same key in ``_modules``; this covers
    # nn.Sequential / nn.ModuleList children addressed by index ("1").
    setattr(parent, child_name, nn.Identity())


def fold_pair(model: nn.Module, conv: _ConvNd, bn: _BatchNorm) -> bool:
    """Fold `bn` into `conv` and put an ``nn.Identity`` at each of `bn`'s names in `model`,
    for a pair found without fx (a forward pass saw `bn` read `conv`'s output only);
    False, with nothing changed, when the pair cannot fold (`_skip_reason`)."""
    if not _runs_torch_forward(conv) or not _runs_torch_forward(bn) or \
            _dims(conv, _CONV_DIMS) is None or _dims(bn, _BN_DIMS) is None or \
            _skip_reason(conv, bn) is not None:
        return False
    _fold_into(conv, bn)
    for name in [n for n, m in model.named_modules(remove_duplicate=False) if m is bn]:
        _replace_with_identity(model, name)
    return True


def _runs_torch_forward(module: nn.Module) -> bool:
    """A convolution or BatchNorm subclass that only changes construction (Hugging Face's
    ``EfficientNetDepthwiseConv2d``) computes what its torch base does, so it folds; one
    with a forward of its own may transform the weight, so it does not."""
    if isinstance(module, _BatchNorm):
        return type(module).forward is _BatchNorm.forward
    for base in _CONV_DIMS:
        if isinstance(module, base):
            return type(module).forward is base.forward and \
                type(module)._conv_forward is base._conv_forward  # type: ignore[attr-defined]
    return False


class _FoldTracer(torch.fx.Tracer):
    """fx's tracer with such subclasses as leaves (fx traces into any module outside
    torch.nn, so the pair would not show as two module calls)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _runs_torch_forward(m) or super().is_leaf_module(m, module_qualified_name)


def fold_conv_bn(model: nn.Module) -> list[tuple[str, str]]:
    """Fold eval-mode BatchNorm layers into their preceding convolutions, in place.

    Supported pairs are ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d`` (any
    ``groups``) followed directly by the ``nn.BatchNorm1d/2d/3d`` of the same
    dimensionality. For each folded pair the convolution's weight and bias are
    replaced by the folded values (a bias Parameter is created if the convolution
    had none) and the BatchNorm is replaced by ``nn.Identity()`` at its qualified
    name. A pair is skipped, with a ``logger.debug`` line, when the BatchNorm has
    no running statistics or is in training mode, the convolution's output has
    another user, either module is called at more than one place, or the channel
    counts differ.

    If the model does not trace with :func:`torch.fx.symbolic_trace` (for example
    data-dependent control flow), nothing is changed, one ``logger.info`` line is
    emitted and ``[]`` is returned.

    Args:
        model: The model to fold. It is modified in place; pass a copy to keep
            the original.

    Returns:
        The ``(conv_qualified_name, bn_qualified_name)`` pairs that were folded,
        in graph order.
    """
    try:
        graph = _FoldTracer().trace(model)
    except Exception as exc:  # any trace failure means "skip", never fatal
        logger.info(
            "Conv-BN folding skipped: the model does not trace with torch.fx (%s)",
            _first_line(exc),
        )
        return []

    nodes = list(graph.nodes)
    modules = dict(model.named_modules(remove_duplicate=False))
    # Count calls per module object, so a module registered under two names and
    # called through both is still seen as shared.
    calls = Counter(
        id(modules[node.target])
        for node in nodes
        if node.op == "call_module" and node.target in modules
    )

    folded: list[tuple[str, str]] = []
    for node in nodes:
        if node.op != "call_module" or node.target not in modules:
            continue
        bn = modules[node.target]
        if not isinstance(bn, _BatchNorm) or _dims(bn, _BN_DIMS) is None:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if src.target not in modules:
            continue
        conv = modules[src.target]
        if not isinstance(conv, _ConvNd) or _dims(conv, _CONV_DIMS) is None:
            continue

        conv_name, bn_name = str(src.target), str(node.target)
        reason: str | None
        if len(src.users) > 1:
            reason = "the convolution output has more than one user"
        elif calls[id(conv)] > 1:
            reason = "the convolution module is called at more than one place"
        elif calls[id(bn)] > 1:
            reason = "the BatchNorm module is called at more than one place"
        else:
            reason = _skip_reason(conv, bn)
        if reason is not None:
            logger.debug("Not folding %s into %s: %s", bn_name, conv_name, reason)
            continue

        _fold_into(conv, bn)
        _replace_with_identity(model, bn_name)
        folded.append((conv_name, bn_name))
        logger.debug("Folded %s into %s", bn_name, conv_name)

    return folded
