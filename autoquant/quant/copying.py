"""The user's model, copied for autoquant to work on: a deep copy that never touches the
original, parametrizations and pruning baked into plain weights, a ``torch.compile``
wrapper unwrapped, and the refusal of models whose tensors hold no data."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from autoquant.errors import ModelError

__all__ = ["copy_model", "bake_weight_reparametrizations", "uncompiled", "check_model_devices",
           "check_finite_weights"]

logger = logging.getLogger(__name__)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of `model`, or ModelError saying why it cannot be copied.

    Tensors held as plain attributes that are not graph leaves (``torch.nn.utils.prune``
    keeps ``weight = weight_orig * weight_mask`` so until a forward under no_grad) refuse
    ``copy.deepcopy``; the copy gets detached clones of them, the model is not touched.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    try:
        work = copy.deepcopy(model, memo)
    except Exception as err:
        raise ModelError(
            f"cannot deep-copy the model ({type(err).__name__}: {err}); autoquant works "
            "on a copy so your model is never changed. Make the model deep-copyable "
            "(no open file handles, generators or locks as attributes)."
        ) from err
    _refuse_shared(model, work)
    return work


def _refuse_shared(model: nn.Module, work: nn.Module) -> None:
    """A copy that still holds one of the original's modules or parameters (a custom
    ``__deepcopy__`` returning ``self``) would let autoquant change the user's model."""
    originals = {id(m): n for n, m in model.named_modules()}
    originals.update({id(p): n for n, p in model.named_parameters()})
    for name, obj in (*work.named_modules(), *work.named_parameters()):
        if id(obj) in originals:
            shown = name or type(model).__name__
            raise ModelError(
                f"copying the model kept {shown!r} ({type(obj).__name__}) as the very same "
                "object as in your model (its __deepcopy__ returns itself?), so quantizing "
                "the copy would change your model. Make copy.deepcopy return a new object "
                "for it, or remove its __deepcopy__")


def bake_weight_reparametrizations(model: nn.Module) -> None:
    """Replace parametrized (weight_norm, spectral_norm, orthogonal, ...) and pruned
    tensors of our copy by the values the model computes with them in eval mode.

    Why: a quantized layer must compute with its fake-quant weight as is. Substituting a
    weight under a parametrization goes through its ``right_inverse`` and re-applies it
    (spectral_norm would normalize the quantized weight again), and a pruning pre-hook
    overwrites ``weight`` on every call. Training needs them; quantization does not.
    """
    from torch.nn.utils import parametrizations, parametrize, prune

    baked = 0
    with torch.no_grad():
        for module in list(model.modules()):
            if parametrize.is_parametrized(module):
                # removing a parametrization edits the module's generated class, which the
                # copy shares with the user's model: give the copy a class of its own
                cls = type(module)
                module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
                for tensor_name in list(module.parametrizations):
                    parametrize.remove_parametrizations(module, tensor_name,
                                                        leave_parametrized=True)
                # weight_norm's hook for loading old weight_g/weight_v state dicts is a local
                # function: meaningless on a plain weight, and it cannot be pickled (workers)
                for key, hook in list(module._load_state_dict_pre_hooks.items()):
                    function = getattr(hook, "hook", hook)
                    if getattr(function, "__module__", "") == parametrizations.__name__:
                        del module._load_state_dict_pre_hooks[key]
                baked += 1
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    prune.remove(module, hook._tensor_name)
                    baked += 1
    if baked:
        logger.info("baked %d parametrized or pruned tensor(s) into plain weights (the "
                    "values the model computes in eval mode)", baked)


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiles, or `model` itself.

    Why: the search swaps layers and re-runs the model per trial; through the wrapper every
    trial would recompile, and layer names would carry its ``_orig_mod.`` prefix."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        logger.info("the model is a torch.compile wrapper: quantizing the %s it compiles "
                    "(compile the result again for speed)", type(inner).__name__)
        return inner
    return model


def check_model_devices(model: Any) -> None:
    """Refuse a model with parameters or buffers on the 'meta' device (they hold no data).

    Parameters on several real devices (model parallelism) are not refused: each layer's
    weight qparams are computed on the weight's device and its activation statistics on
    the device its input arrives on (not yet covered by a test on a multi-device machine).
    """
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers())
            if t.device.type == "meta"]
    if meta:
        shown = ", ".join(meta[:5]) + (" ..." if len(meta) > 5 else "")
        raise ModelError(
            f"{len(meta)} parameter(s)/buffer(s) are on the 'meta' device and hold no values "
            f"({shown}); materialise the model first, e.g. model.to_empty(device='cpu') "
            "then load_state_dict(...), or build it without device='meta'"
        )


def check_finite_weights(name: str, module: nn.Module) -> None:
    """NaN or inf in a weight makes every scale NaN and every quantized output NaN."""
    for pname, param in module.named_parameters():
        bad = int((~torch.isfinite(param.detach())).sum())
        if bad:
            raise ModelError(
                f"layer {name!r}: its parameter {pname!r} holds {bad} NaN or inf value(s), "
                "so its quantization scales and outputs would be NaN; fix the weights (the "
                "float model computes garbage with them too), or skip the layer")
