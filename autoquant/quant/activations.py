"""Sigmoid outputs quantized where the runtime then runs them in integers.

onnxruntime runs ``DequantizeLinear -> Sigmoid -> QuantizeLinear`` as one QLinearSigmoid
(a 256-entry table) and ``DQ, DQ -> Mul -> Q`` as QLinearMul. A SiLU (``x * sigmoid(x)``)
after an integer convolution whose output is requantized (`QuantLayer.requant`) only needs
a quantizer at the sigmoid's output to run both: without it the deployed graph computes
the sigmoid and the product in float between a DequantizeLinear and the next layer's
QuantizeLinear, which on a CPU without VNNI made a SiLU network slower than float.

A sigmoid's output lies in [0, 1], so its quantizer needs no calibration: uint8 with scale
1/255 and zero point 0. It is for uint8 convolution outputs (the default asymmetric
activations) only: QLinearSigmoid/QLinearMul take one integer type, and onnxruntime's x86
CPU kernels fuse int8 activations into none of these ops. The searched
model computes that quantizer too (`QuantSiLU`, `QuantSigmoid`), so the deployed model is
the searched one; it is on only while every call of the module reads the output of a
requantized layer (else the runtime could not fuse it and the quantizer would only cost).

A SiLU whose product no single quantizing layer reads (a squeeze-excitation's pool and
gate, a residual sum) also gets an output quantizer of its own, calibrated like a
convolution's (`QuantLayer.requant`), so that its product and the ops after it (the gate's
``Mul``, the sum) run in integers too.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from autoquant.quant.dataflow import OutputUse, output_uses
from autoquant.quant.integer import CONV_KINDS
from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.qmath import fake_quantize, qrange
from autoquant.quant.quantizer import ActivationObserver

__all__ = ["QuantSigmoid", "QuantSiLU", "SIGMOID_SCALE", "sigmoid_range", "ActivationCall",
           "UsesOf", "SIGMOID_KINDS", "conv_layer", "quantize_sigmoids", "install_sigmoids"]

SIGMOID_SCALE = 1.0 / 255.0  # [0, 1] onto 256 steps

# modules that pass a tensor through unchanged (BatchNorm folded into its conv leaves one)
_PASS_THROUGH = (nn.Identity, nn.Dropout)


def sigmoid_range(module: nn.Module) -> tuple[int, int] | None:
    """The range [0, 255] of `module`'s uint8 sigmoid quantizer in the current plan, or
    None while it is off: some call does not read a requantized uint8 layer output."""
    producers: tuple[QuantLayer, ...] = getattr(module, "producers", ())
    for layer in producers:
        span = layer.out_range
        if layer.state is not QuantState.QUANTIZE or not layer.requant or span is None or \
                span[0] < 0:
            return None
    return (0, 255) if producers else None


def _sigmoid_q(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    span = sigmoid_range(module)
    if span is None:
        return None
    scale = torch.tensor(SIGMOID_SCALE, device=x.device)
    return fake_quantize(torch.sigmoid(x), scale, torch.tensor(span[0], device=x.device),
                         *span).to(x.dtype)


class QuantSigmoid(nn.Sigmoid):
    """`nn.Sigmoid` whose output is quantized to 8 bits (see the module docstring)."""

    producers: tuple[QuantLayer, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = _sigmoid_q(self, x)
        return super().forward(x) if s is None else s


class QuantSiLU(nn.SiLU):
    """`nn.SiLU` as ``x * q(sigmoid(x))`` with that sigmoid quantizer, and, where no single
    quantizing layer reads it, its product quantized too (``out_observer``: the module
    docstring)."""

    producers: tuple[QuantLayer, ...] = ()
    out_observer: ActivationObserver | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_observer is not None and self.producers and \
                self.producers[0].state is QuantState.CALIBRATE:
            y = super().forward(x)
            self.out_observer.update(y)
            return y
        s = _sigmoid_q(self, x)
        if s is None:
            return super().forward(x)
        out = self.output_qparams()
        y = x * s
        return y if out is None else fake_quantize(y, *out).to(y.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for buf in ("out_scale", "out_zero_point"):  # saved filled, registered empty
            if prefix + buf in state_dict and buf in self._buffers:
                setattr(self, buf, torch.empty_like(state_dict[prefix + buf]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def output_qparams(self) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """(scale, zero point, qmin, qmax) of the product's quantizer, None without one;
        taken from the calibration (and kept in the state dict) or a loaded state dict."""
        observer = self.out_observer
        if observer is None:
            return None
        if observer.has_data:
            scale, zero_point, qmin, qmax, _ = observer.qparams(8)  # cached by the observer
            device = self.out_scale.device
            if scale.to(device) is not self.out_scale:  # new statistics: into the state dict
                self.out_scale, self.out_zero_point = scale.to(device), zero_point.to(device)
            return self.out_scale, self.out_zero_point, qmin, qmax
        if not self.out_scale.numel():
            return None
        return (self.out_scale, self.out_zero_point, *qrange(8, observer.cfg.symmetric))


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.Sigmoid: QuantSigmoid, nn.SiLU: QuantSiLU}
SIGMOID_KINDS = tuple(_SWAPS)  # the module types (exactly) that get quantizing twins


def conv_layer(layer: nn.Module | None) -> QuantLayer | None:
    """`layer` when it is a wrapped convolution (only those requantize their output)."""
    if isinstance(layer, QuantLayer) and isinstance(layer.__dict__["_modules"].get("module"),
                                                    CONV_KINDS):
        return layer
    return None


def _producer(node: torch.fx.Node, modules: Mapping[str, nn.Module],
              layers: Mapping[int, QuantLayer]) -> QuantLayer | None:
    """The layer whose output `node` (an activation call) reads, through no-op modules."""
    arg = node.args[0] if node.args else None
    while isinstance(arg, torch.fx.Node) and arg.op == "call_module":
        module = modules.get(str(arg.target))
        if id(module) in layers:
            return conv_layer(layers[id(module)])
        if type(module) not in _PASS_THROUGH or not arg.args:
            return None
        arg = arg.args[0]
    return None


@dataclass(frozen=True)
class ActivationCall:
    """One call of an ``nn.Sigmoid``/``nn.SiLU`` module, from the fx graph or a forward pass:
    the module, the module whose forward made the call (None: unknown), the layer whose
    output it reads directly (None: something else), and `key`, which names the call for
    the `UsesOf` function."""

    module: nn.Module
    parent: nn.Module | None
    producer: QuantLayer | None
    key: Hashable


# ``{call key: name}`` -> ``{name: OutputUse}`` of those calls' outputs
UsesOf = Callable[[Mapping[Hashable, str]], Mapping[str, OutputUse]]


def quantize_sigmoids(model: nn.Module, layers: Mapping[str, QuantLayer],
                      graph: torch.fx.Graph | None) -> int:
    """`install_sigmoids` for the calls the fx `graph` shows (none without a graph)."""
    if graph is None:
        return 0
    modules = dict(model.named_modules(remove_duplicate=False))
    by_id = {id(layer): layer for layer in layers.values()}
    calls = []
    for node in graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if type(module) in _SWAPS:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            parent = modules.get(str(stack[-2][0]) if len(stack) >= 2 else "")
            calls.append(ActivationCall(module, parent, _producer(node, modules, by_id),  # type: ignore[arg-type]
                                        node))
    return install_sigmoids(model, calls, lambda names: output_uses(
        model, layers, graph, sources=names) or {})


def install_sigmoids(model: nn.Module, calls: list[ActivationCall], uses_of: UsesOf) -> int:
    """Swap, in place, every ``nn.Sigmoid``/``nn.SiLU`` whose `calls` read quantizable
    layers' outputs for its quantizing twin (the same object state, so hooks carry over);
    returns how many twins were made.

    A module called at several places gets one twin per call when each call is its
    parent's only one (a block class sharing one ``default_act``), so each call can have an
    output quantizer of its own; else one twin, only if every call reads a layer."""
    names = {id(m): n for n, m in model.named_modules()}
    grouped: dict[int, list[ActivationCall]] = {}
    for call in calls:
        grouped.setdefault(id(call.module), []).append(call)
    single: dict[Hashable, tuple[str, nn.Module]] = {}  # a call made once: its name, twin
    made = 0
    for sites in grouped.values():
        module = sites[0].module
        places = _places(module, sites)
        if places is None:
            producers = [call.producer for call in sites]
            if None in producers:
                continue
            twin = _twin(module, tuple(dict.fromkeys(producers)))  # type: ignore[arg-type]
            for parent in model.modules():
                for key, child in parent._modules.items():
                    if child is module:
                        parent._modules[key] = twin
            made += 1
            if len(sites) == 1:
                single[sites[0].key] = (names.get(id(module), ""), twin)
            continue
        for call, (parent, key) in zip(sites, places, strict=True):
            if call.producer is not None:
                parent._modules[key] = twin = _twin(module, (call.producer,))
                single[call.key] = (f"{names.get(id(parent), '')}.{key}".lstrip("."), twin)
                made += 1
    # a SiLU called once whose product no single quantizing layer reads
    keys = {key: name for key, (name, twin) in single.items() if isinstance(twin, QuantSiLU)}
    twins = dict(single.values())
    for name, use in uses_of(keys).items():
        if use.others or len(use.consumers) != 1:
            _add_output_quantizer(twins[name])  # type: ignore[arg-type]
    return made


def _places(module: nn.Module, sites: list[ActivationCall]
            ) -> list[tuple[nn.Module, str]] | None:
    """(parent, child key) of each call of a module called at several places, when every
    call comes from a different parent holding it under one key."""
    if len(sites) < 2:
        return None
    places = []
    for call in sites:
        if call.parent is None:
            return None
        keys = [k for k, child in call.parent._modules.items() if child is module]
        if len(keys) != 1:
            return None
        places.append((call.parent, keys[0]))
    if len({id(parent) for parent, _ in places}) != len(places):
        return None
    return places


def _twin(module: nn.Module, producers: tuple[QuantLayer, ...]) -> nn.Module:
    """The quantizing twin of `module`: its state (hooks included) in the subclass."""
    twin = _SWAPS[type(module)].__new__(_SWAPS[type(module)])
    twin.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        twin.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])
    twin.producers = producers  # type: ignore[attr-defined]
    return twin


def _add_output_quantizer(silu: QuantSiLU) -> None:
    """Give `silu` the calibrated 8-bit output quantizer of its producers' outputs."""
    cfg = silu.producers[0].out_observer.cfg
    silu.out_observer = ActivationObserver(cfg)
    device = silu.producers[0].module.weight.device
    silu.register_buffer("out_scale", torch.empty(0, device=device))
    silu.register_buffer("out_zero_point", torch.empty(0, device=device))
