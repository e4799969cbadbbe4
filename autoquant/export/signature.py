"""The exported graph's signature: input and output names and which axes are dynamic.

Users name them as ``torch.onnx.export`` and AMCT's ``accuracy_based_auto_calibration`` do:
``input_names``, ``output_names`` and ``dynamic_axes={name: {axis: label}}`` (or a list of
axes). Without `dynamic_axes`, dimension 0 of every tensor input is dynamic (the batch).
The names and labels are written into the ONNX file after the export, so the dynamo
exporter's own tracing stays unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from autoquant.batches import forward_signature, takes_the_dict_whole
from autoquant.errors import ConfigError

__all__ = ["DynamicAxes", "split_inputs", "input_names_of", "varying_axes", "dynamic_shapes",
           "rename_graph"]

DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]]


def split_inputs(example_inputs: Any, model: nn.Module | None = None
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of `example_inputs`: a tuple/list of positional inputs, a dict of
    keyword inputs (one positional dict for a `model` whose forward takes it whole, as
    `autoquant.batches.call_model` calls it), or one tensor."""
    if example_inputs is None:
        raise ConfigError(
            "export needs example_inputs: a tuple of positional inputs (e.g. (x,)) or a dict "
            "of keyword inputs that the model runs on"
        )
    if isinstance(example_inputs, Mapping):
        if model is not None and takes_the_dict_whole(forward_signature(model), example_inputs):
            return (example_inputs,), {}
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def input_names_of(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The names the inputs go by: the forward's parameter names of the positional
    inputs, then the keyword names."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [params[i] if i < len(params) else f"input_{i}" for i in range(len(args))]
    return names + list(kwargs)


def _axes(spec: Mapping[int, str] | Sequence[int], name: str, rank: int) -> dict[int, str]:
    items = spec.items() if isinstance(spec, Mapping) else ((a, f"{name}_dim{a}") for a in spec)
    out: dict[int, str] = {}
    for axis, label in items:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank:
            raise ConfigError(f"dynamic_axes[{name!r}] names axis {axis!r}, but that input has "
                              f"{rank} dimension(s)")
        out[axis % rank] = str(label)
    return out


def varying_axes(example_inputs: Any, others: Sequence[Any]) -> list[set[int]]:
    """Per tensor of `example_inputs` (flattened order), the axes whose size differs in
    some of `others` (inputs of the same structure, e.g. calibration batches)."""
    from torch.utils._pytree import tree_leaves

    def tensors(inputs: Any) -> list[torch.Tensor]:
        args, kwargs = split_inputs(inputs)
        return [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]

    base = tensors(example_inputs)
    axes: list[set[int]] = [set() for _ in base]
    for other in others:
        theirs = tensors(other)
        if len(theirs) != len(base):
            continue
        for found, a, b in zip(axes, base, theirs, strict=True):
            if a.dim() == b.dim():
                found.update(i for i in range(a.dim()) if a.shape[i] != b.shape[i])
    return axes


def dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, names: Sequence[str],
                   dynamic_axes: DynamicAxes | None, dynamic_batch: bool,
                   varying: Sequence[set[int]] = ()) -> tuple[Any, dict[str, dict[int, str]]]:
    """The ``dynamic_shapes`` of `torch.export.export` and ``{input name: {axis: label}}``.

    `names` are the inputs' names in the graph (`input_names_of` or the user's
    ``input_names``). Unknown names in `dynamic_axes` are a ConfigError listing the valid
    ones; output names are allowed there (their axes follow from the inputs). Without
    `dynamic_axes`, the batch axis and the `varying` axes (`varying_axes`: sizes the
    calibration batches vary, e.g. a sequence length) are dynamic where the model allows
    it (``Dim.AUTO``: torch.export keeps an axis static that the model specializes).
    """
    from torch.export import Dim

    tensors = [*args, *kwargs.values()]
    labels: dict[str, dict[int, str]] = {}
    for name, spec in (dynamic_axes or {}).items():
        if name not in names:
            continue  # an output name: checked by rename_graph
        value = tensors[list(names).index(name)]
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"dynamic_axes names {name!r}, which is not a tensor input")
        labels[name] = _axes(spec, name, value.dim())
    if dynamic_axes is None and dynamic_batch:
        labels = {n: {0: "batch"} for n, t in zip(names, tensors, strict=False)
                  if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] > 1}
        flat = [(n, t) for n, t in zip(names, tensors, strict=False)
                if isinstance(t, torch.Tensor)]
        for (name, _), axes in zip(flat, varying, strict=False):
            for axis in sorted(axes):
                labels.setdefault(name, {})[axis] = "batch" if axis == 0 else f"{name}_dim{axis}"
    if not labels:
        return None, {}

    def spec(name: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or name not in labels:
            return None
        return {axis: Dim.AUTO for axis in labels[name]}

    pos = tuple(spec(n, v) for n, v in zip(names, args, strict=False))
    if not kwargs:
        return pos, labels
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    by_name = dict(zip(names, tensors, strict=False))
    return {k: spec(k, by_name.get(k, v)) for k, v in bound.arguments.items()}, labels


def rename_graph(proto: Any, names: Sequence[str], input_names: Sequence[str] | None,
                 output_names: Sequence[str] | None,
                 labels: Mapping[str, Mapping[int, str]],
                 dynamic_axes: DynamicAxes | None) -> None:
    """Rename the graph's inputs/outputs of `proto` (an ONNX ModelProto) in place and label
    their dynamic dimensions; `names` are the inputs' names `labels` uses, in order."""
    graph = proto.graph
    by_position = {}
    if len(names) == len(graph.input):
        by_position = {value.name: name for value, name in zip(graph.input, names,
                                                               strict=True)}
    mapping: dict[str, str] = {}
    for values, names, what in ((graph.input, input_names, "input_names"),
                                (graph.output, output_names, "output_names")):
        if names is None:
            continue
        if len(names) != len(values) or len(set(names)) != len(names):
            raise ConfigError(
                f"{what} has {len(names)} name(s) {list(names)!r} but the graph has "
                f"{len(values)} {what.split('_')[0]}(s) ({', '.join(v.name for v in values)}); "
                "give one distinct name each")
        for value, new in zip(values, names, strict=True):
            mapping[value.name] = str(new)
    if mapping:
        for value in (*graph.input, *graph.output):
            value.name = mapping.get(value.name, value.name)
        for node in graph.node:
            for i, name in enumerate(node.input):
                node.input[i] = mapping.get(name, name)
            for i, name in enumerate(node.output):
                node.output[i] = mapping.get(name, name)
    outputs = [o.name for o in graph.output]
    inputs = [i.name for i in graph.input]
    for name in dynamic_axes or {}:
        if name not in inputs and name not in outputs and name not in labels:
            raise ConfigError(f"dynamic_axes names {name!r}, which is neither an input "
                              f"({', '.join(inputs)}) nor an output ({', '.join(outputs)})")
    wanted = {mapping.get(old, old): dict(labels.get(new, {}))
              for old, new in by_position.items()}
    for name, spec in (dynamic_axes or {}).items():
        if name in outputs:
            out = next(o for o in graph.output if o.name == name)
            wanted[name] = _axes(spec, name, len(out.type.tensor_type.shape.dim))
    for value in (*graph.input, *graph.output):
        for axis, label in wanted.get(value.name, {}).items():
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims):
                dims[axis].dim_param = label
