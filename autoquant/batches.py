"""Calling a model on a batch, whatever its shape: a tensor, a tuple or list of positional
inputs, or a dict of keyword inputs; moving a batch to the model's device; and reading the
tensor a metric is computed on from any output (a tensor, a tuple, a dict or a Hugging
Face ``ModelOutput`` with ``logits``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from autoquant.errors import ModelError

__all__ = ["call_model", "takes_the_dict_whole", "forward_signature", "to_device", "model_device",
           "row_slice", "first_tensor", "primary_tensor"]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple or list, ``model(**inputs)`` for a dict (e.g.
    ``input_ids``, ``attention_mask``), else ``model(inputs)``; a dict goes in whole to a
    forward that takes one argument and no parameter named after any of its keys."""
    if isinstance(inputs, Mapping):
        return model(inputs) if takes_the_dict_whole(forward_signature(model), inputs) else \
            model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def takes_the_dict_whole(signature: inspect.Signature | None, keys: Any) -> bool:
    """Whether a forward of `signature` reads a dict with `keys` as one argument
    (``forward(self, batch)``): no ``**kwargs`` and no parameter named after a key, so that
    calling it with the keys as keywords could only raise a TypeError."""
    if signature is None:
        return False
    params = list(signature.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params) or \
            {p.name for p in params if p.kind is not p.VAR_POSITIONAL} & set(keys):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind not in (
        p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return bool(positional) and len(required) <= 1


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """The signature of `model`'s forward, or None where it has none to read."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (then buffer), or CPU for a stateless model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _map_tensors(inputs: Any, fn: Any) -> Any:
    """`inputs` with `fn` applied to every tensor, in tuples (named ones too), lists and
    dicts; other values pass as is."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, (tuple, list)):
        items = [_map_tensors(item, fn) for item in inputs]
        return type(inputs)(*items) if hasattr(inputs, "_fields") else type(inputs)(items)
    if isinstance(inputs, Mapping):
        return {key: _map_tensors(value, fn) for key, value in inputs.items()}
    return inputs


def to_device(inputs: Any, device: torch.device) -> Any:
    """Move a tensor, or every tensor in a tuple/list/dict, to `device` (other values pass
    as is)."""
    return _map_tensors(inputs, lambda t: t.to(device))


def row_slice(inputs: Any, batch: int, start: int, stop: int) -> Any:
    """`inputs` with every tensor whose first dimension is `batch` cut to its rows
    ``start:stop`` (a view), in tuples, lists and dicts too; other values pass as is."""
    return _map_tensors(inputs, lambda t: t[start:stop] if t.dim() and t.shape[0] == batch
                        else t)


def _find_tensor(output: Any, depth: int = 0) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if depth > 4:
        return None
    if isinstance(output, Mapping):
        items = ([output["logits"]] if "logits" in output else []) + list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        items = [output.logits]
    else:
        return None
    for item in items:
        found = _find_tensor(item, depth + 1)
        if found is not None:
            return found
    return None


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a metric is computed on: `output` itself; a dict's (or a Hugging Face
    ``ModelOutput``'s) ``logits`` entry, else its first tensor value; a tuple/list's first
    tensor element (nested containers are searched in order)."""
    found = _find_tensor(output)
    if found is None:
        raise ModelError(
            f"the model returned {type(output).__name__} {output!r:.80} with no tensor in it; "
            "expected a tensor, a tuple/list or a dict holding one (a 'logits' entry is "
            "used first). Wrap the model so it returns the output tensor."
        )
    return found


def primary_tensor(output: Any) -> torch.Tensor:
    """The tensor a sensitivity metric compares: `output` itself or its first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, PackedSequence):
        return output.data
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, (torch.Tensor, PackedSequence)):
                return primary_tensor(item)
    raise ModelError(f"cannot compare a layer output of type {type(output).__name__}")
