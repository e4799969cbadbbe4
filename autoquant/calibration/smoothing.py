"""SmoothQuant-style outlier smoothing for Linear layers fed by a LayerNorm.

Activation outliers sit in a few input channels of a Linear layer (after LayerNorm in
transformers) and force a coarse per-tensor activation scale. Smoothing divides input
channel ``j`` by ``s_j = max|X_j|**alpha / max|W[:, j]|**(1 - alpha)`` and multiplies the
weight's column ``j`` by ``s_j``: ``(X / s) (W * s)^T = X W^T``, so the float function is
unchanged while the activation range flattens (the weight, quantized per output channel,
absorbs the scale).

The division is folded into the LayerNorm's affine parameters (``gamma / s``,
``beta / s``), so the smoothed model is an ordinary model (LayerNorm, Linear) with ordinary
fake-quant wrappers, and export needs nothing special. The structure is found with
`torch.fx`; a model that does not trace, or a Linear whose input is not exactly a LayerNorm
output used only by Linear layers, is simply not smoothed (logged, never fatal). Several
Linear layers reading the same LayerNorm (Q, K, V) share one ``s`` computed from the
largest weight column over all of them.

Statistics: one extra forward pass over ``Evaluator.calibration`` collects the per-channel
max |x| of the smoothable layers' inputs, before the activation observers calibrate (once)
on the smoothed model.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.qmodel import Calibrate, QuantModel

__all__ = ["find_smoothable", "smoothing_scales", "smooth_model", "apply_smoothing"]

logger = logging.getLogger(__name__)


def _inner(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, QuantLayer) else module


def find_smoothable(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``[(layernorm_name, [linear names])]``: LayerNorms whose output feeds only Linear
    layers (wrapped or not) as their input, each module called once. Empty if the model
    does not trace with `torch.fx`."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, QuantLayer) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # any tracing failure only disables smoothing
        logger.info("smoothing disabled: the model does not trace with torch.fx (%s: %s)",
                    type(err).__name__, err)
        return []
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    groups: list[tuple[str, list[str]]] = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[str(node.target)] != 1:
            continue
        norm = model.get_submodule(str(node.target))
        if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine
                and norm.weight is not None and len(norm.normalized_shape) == 1):
            continue
        users = list(node.users)
        ok = bool(users)
        for user in users:
            mod = model.get_submodule(str(user.target)) if user.op == "call_module" else None
            ok = ok and mod is not None and isinstance(_inner(mod), nn.Linear) and \
                calls[str(user.target)] == 1 and user.args[:1] == (node,) and \
                node not in user.args[1:] and node not in user.kwargs.values() and \
                _inner(mod).in_features == norm.normalized_shape[0]
        if ok:
            groups.append((str(node.target), [str(u.target) for u in users]))
    return groups


def smoothing_scales(
    act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """``s_j = act_amax_j**alpha / max_k max|W_k[:, j]|**(1 - alpha)``; 1 where either
    statistic is zero (a dead channel keeps its scale)."""
    w_amax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    act = act_amax.float().to(w_amax.device)
    scales = act.pow(alpha) / w_amax.pow(1.0 - alpha)
    ok = (act > 0) & (w_amax > 0) & torch.isfinite(scales)
    return torch.where(ok, scales.clamp(min=1e-5), torch.ones_like(scales))


@torch.no_grad()
def apply_smoothing(
    model: nn.Module, norm_name: str, linear_names: list[str], scales: torch.Tensor
) -> None:
    """Divide the LayerNorm's affine parameters by `scales`, multiply the Linear weights'
    input columns by them (in place; the float function is unchanged)."""
    norm = model.get_submodule(norm_name)
    scales = scales.to(norm.weight.device)
    norm.weight.div_(scales.to(norm.weight.dtype))
    if norm.bias is not None:
        norm.bias.div_(scales.to(norm.bias.dtype))
    for name in linear_names:
        linear = _inner(model.get_submodule(name))
        linear.weight.mul_(scales.to(linear.weight.dtype).reshape(1, -1))


def smooth_model(qmodel: QuantModel, calibrate: Calibrate, alpha: float
                 ) -> list[tuple[str, list[str]]]:
    """Smooth every smoothable LayerNorm→Linear group of `qmodel` (its own copy).

    Runs one statistics pass over the calibration batches; returns the groups smoothed.
    """
    groups = find_smoothable(qmodel.model)
    if not groups:
        logger.info("smoothing: no LayerNorm -> Linear structure found; nothing smoothed")
        return []
    amax: dict[str, torch.Tensor] = {}

    def observe(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            cur = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)
        return hook

    firsts = {linears[0]: norm for norm, linears in groups}
    handles = [qmodel.model.get_submodule(name).register_forward_pre_hook(observe(name))
               for name in firsts]
    qmodel.calibration_pass(calibrate, QuantState.FLOAT, "(smoothing statistics)", handles)
    done = []
    for norm_name, linears in groups:
        if linears[0] not in amax:
            continue
        weights = [_inner(qmodel.model.get_submodule(n)).weight for n in linears]
        apply_smoothing(qmodel.model, norm_name, linears,
                        smoothing_scales(amax[linears[0]], weights, alpha))
        for name in linears:
            module = qmodel.model.get_submodule(name)
            if isinstance(module, QuantLayer):
                module.smoothed = True
        done.append((norm_name, linears))
    logger.info("smoothed %d LayerNorm -> Linear group(s) (alpha %.2f): %s", len(done), alpha,
                ", ".join(f"{n} -> {'/'.join(ls)}" for n, ls in done))
    return done
