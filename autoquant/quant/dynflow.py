"""Where each layer's output goes, seen on one real forward pass: the fallback of
`autoquant.quant.dataflow` for models `torch.fx` cannot trace.

Many models do not trace symbolically (``list(x.chunk(2, 1))`` in a YOLO-style block, data-
dependent Python), and without the consumers of a convolution's output nothing is
requantized, so every convolution whose output a non-layer op reads runs float in the
deployed graph (a YOLO-style network: all 17 convolutions, 1.9-2.1x float latency). Running the
model once under a `torch.overrides.TorchFunctionMode` sees every torch op and the tensors
it reads: a layer's output is followed through the ops that commute with quantization (the
same list fx uses) to the layers and other ops that read it, giving the same `OutputUse`.
The same pass finds the Conv -> BatchNorm pairs fx folding could not see, and the sigmoid
calls `autoquant.quant.activations` quantizes.

`watched_uses` runs that pass on the first `WATCH_ROWS` rows of the inputs (the dataflow
does not depend on the batch size in the models seen so far, and a pass of a whole
calibration batch cost about half of the observer pass on a BERT encoder), and on the
whole inputs when the cut pass fails or leaves a layer uncalled.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from autoquant.batches import call_model, first_tensor, row_slice
from autoquant.quant.activations import SIGMOID_KINDS, ActivationCall, conv_layer, install_sigmoids
from autoquant.quant.dataflow import METADATA, MOVES, RELUS, OutputUse
from autoquant.quant.fold import fold_pair

__all__ = ["WATCH_ROWS", "observed_uses", "watched_uses"]

logger = logging.getLogger(__name__)

_MOVE_OPS = MOVES | RELUS | {"dropout", "relu"}
WATCH_ROWS = 2  # rows of a batch the watched pass runs first (2: a squeeze keeps its axis)


def watched_uses(model: nn.Module, layers: Mapping[str, nn.Module], inputs: Any,
                 folded: list[tuple[str, str]] | None = None) -> dict[str, OutputUse] | None:
    """`observed_uses` on a forward pass of `inputs` (positional arguments, or a dict of
    keyword ones), cut to its first `WATCH_ROWS` rows; on the whole `inputs` when that cut
    pass fails or leaves a layer uncalled."""
    def whole() -> Any:
        return call_model(model, inputs)

    try:
        first = first_tensor(inputs)
        batch = first.shape[0] if first.dim() else 0
    except Exception:  # no tensor to take the batch from: run the inputs whole
        batch = 0
    if batch <= WATCH_ROWS:
        return observed_uses(model, layers, whole, folded)
    cut = row_slice(inputs, batch, 0, WATCH_ROWS)
    return observed_uses(model, layers, lambda: call_model(model, cut), folded, whole)


class _Flow(TorchFunctionMode):
    """Records, per source layer, who reads its output (directly or through moves)."""

    def __init__(self, layers: Mapping[int, str]) -> None:
        super().__init__()
        self.layers = layers
        # tensor id -> (source, through ReLU, the source's own tensor?, a weak reference that
        # drops the id with the tensor: ids stay unique, no activation is kept alive)
        self.sources: dict[int, tuple[str, bool, bool, weakref.ref]] = {}
        self.reads: dict[str, list[tuple[str, bool, bool]]] = {}  # (reader, layer?, relu)
        self.inside = 0  # > 0 while a layer computes: its own ops are not reads
        self.counts: Counter[int] = Counter()  # calls per module object
        self.norms: list[tuple[str, nn.Module]] = []  # (layer, BatchNorm reading its output)

    def track(self, value: Any, source: str, relu: bool, direct: bool) -> None:
        for leaf in tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                key = id(leaf)
                self.sources[key] = (source, relu, direct, weakref.ref(
                    leaf, lambda _ref, key=key: self.sources.pop(key, None)))

    def read(self, value: Any, reader: str, is_layer: bool) -> None:
        for leaf in tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.sources:
                source, relu, _, _ = self.sources[id(leaf)]
                self.reads.setdefault(source, []).append((reader, is_layer, relu))

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func)).strip("_")
        if self.inside or name in METADATA or name == "get":
            return out
        first = args[0] if args else None
        rest = (args[1:], kwargs)
        if out is first:  # an identity (eval-mode dropout): still the source's own tensor
            return out
        if name in _MOVE_OPS and isinstance(first, torch.Tensor) and \
                id(first) in self.sources and not any(
                    isinstance(t, torch.Tensor) and id(t) in self.sources
                    for t in tree_leaves(rest)):
            source, relu, _, _ = self.sources[id(first)]
            self.track(out, source, relu or name in RELUS, False)
        else:
            self.read((args, kwargs), name, False)
        return out


def observed_uses(model: nn.Module, layers: Mapping[str, nn.Module], run: Callable[[], Any],
                  folded: list[tuple[str, str]] | None = None,
                  fallback: Callable[[], Any] | None = None) -> dict[str, OutputUse] | None:
    """`OutputUse` of every layer in `layers` (``{name: wrapper}``) as `run` (one forward
    pass of `model`) shows them; None when the pass fails. The sigmoids the pass shows
    reading convolutions get their quantizing twins, as on the fx path
    (`autoquant.quant.activations.install_sigmoids`). With a `folded` list (only before
    calibration), the BatchNorms the pass shows reading a convolution's output alone are
    folded into it (`autoquant.quant.fold.fold_pair`), listed there, and the pass is rerun.
    A `fallback` pass replaces `run` when that fails or leaves a layer of `layers` uncalled."""
    seen = _observe(layers, run)
    if fallback is not None and (seen is None or any(
            not seen[0].counts[id(layer)] for layer in layers.values())):
        logger.info("the dataflow pass on a cut batch %s: rerunning it on the whole batch",
                    "failed" if seen is None else "left a layer uncalled")
        run = fallback
        seen = _observe(layers, run)
    if seen is not None and folded is not None and _fold(model, layers, seen, folded):
        seen = _observe(layers, run)
    if seen is None:
        return None
    flow, calls = seen
    install_sigmoids(model, calls, lambda names: {
        name: _use(flow.reads.get(str(key), [])) for key, name in names.items()})
    return {layer: _use(flow.reads.get(flow.layers[id(layers[layer])], [])) for layer in layers}


def _fold(model: nn.Module, layers: Mapping[str, nn.Module],
          seen: tuple[_Flow, list[ActivationCall]], folded: list[tuple[str, str]]) -> bool:
    flow = seen[0]
    names = {id(m): n for n, m in model.named_modules()}
    done = False
    for layer, bn in flow.norms:
        conv = conv_layer(layers.get(layer))
        if conv is None or flow.counts[id(bn)] != 1 or flow.counts[id(conv)] != 1 or \
                [r for r, *_ in flow.reads.get(layer, [])] != ["batch_norm"]:
            continue
        bn_name = names.get(id(bn), "")
        if fold_pair(model, conv.module, bn):  # type: ignore[arg-type]
            folded.append((layer, bn_name))
            logger.info("folded %s into %s (the pair found on a forward pass)", bn_name, layer)
            done = True
    return done


def _observe(layers: Mapping[str, nn.Module], run: Callable[[], Any]
             ) -> tuple[_Flow, list[ActivationCall]] | None:
    """One pass of `run` under `_Flow`: the reads it saw and the sigmoid calls."""
    flow = _Flow({id(m): n for n, m in layers.items()})
    stack: list[nn.Module] = []
    calls: list[ActivationCall] = []

    def before(module: nn.Module, args: tuple) -> None:
        flow.counts[id(module)] += 1
        source = flow.sources.get(id(args[0])) if args else None
        direct = source[0] if source is not None and source[2] else None
        if id(module) in flow.layers and not flow.inside:
            flow.read(args[:1], flow.layers[id(module)], True)
            flow.read(args[1:], type(module).__name__, False)
        elif type(module) in SIGMOID_KINDS and not flow.inside and args:
            calls.append(ActivationCall(module, stack[-1] if stack else None,
                                        conv_layer(layers.get(direct or "")),
                                        f"#call{len(calls)}"))
        elif isinstance(module, _BatchNorm) and not flow.inside and direct is not None:
            flow.norms.append((direct, module))
        flow.inside += id(module) in flow.layers
        stack.append(module)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        stack.pop()
        flow.inside -= id(module) in flow.layers
        if flow.inside:
            return
        if id(module) in flow.layers:
            flow.track(output, flow.layers[id(module)], False, True)
        elif calls and calls[-1].module is module:
            flow.track(output, str(calls[-1].key), False, True)

    handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
    try:
        with flow, torch.no_grad():
            output = run()
        flow.read(output, "output", False)
    except Exception as err:  # the caller reports a failing forward itself
        logger.info("the dataflow pass failed (%s: %s)", type(err).__name__, err)
        return None
    finally:
        for handle in handles:
            handle.remove()
    return flow, calls


def _use(reads: list[tuple[str, bool, bool]]) -> OutputUse:
    consumers = tuple(r for r, is_layer, _ in reads if is_layer)
    others = tuple(r for r, is_layer, _ in reads if not is_layer) or \
        (() if reads else ("unused",))
    return OutputUse(consumers, others, bool(reads) and all(r for *_, r in reads))
