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

from collections.abc import Mapping

import torch
import torch.fx
from torch import nn

from autoquant.quant.dataflow import output_uses
from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.qmath import fake_quantize, qrange
from autoquant.quant.quantizer import ActivationObserver

__all__ = ["QuantSigmoid", "QuantSiLU", "SIGMOID_SCALE", "sigmoid_range",
           "quantize_sigmoids"]

SIGMOID_SCALE = 1.0 / 255.0  # [0, 1] onto 256 steps

# modules that pass a tensor through unchanged (BatchNorm folded into its conv leaves one)
_PASS_THROUGH = (nn.Identity, nn.Dropout)


def sigmoid_range(module: nn.Module) -> tuple[int, int] | None:
    """The range [0, 255] of `module`'s uint8 sigmoid quantizer in the current plan, or
    None while it is off: some call does not read a requantized uint8 layer output."""
    producers: tuple[QuantLayer, ...] = getattr(module, "producers", ())
    for layer in producers:
        if layer.state is not QuantState.QUANTIZE or not layer.requant or \
                layer._out_q is None or layer._out_q[0] < 0:
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
            scale, zero_point, qmin, qmax, _ = observer.qparams(8)
            device = self.out_scale.device
            self.out_scale, self.out_zero_point = scale.to(device), zero_point.to(device)
            return self.out_scale, self.out_zero_point, qmin, qmax
        if not self.out_scale.numel():
            return None
        return (self.out_scale, self.out_zero_point, *qrange(8, observer.cfg.symmetric))


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.Sigmoid: QuantSigmoid, nn.SiLU: QuantSiLU}


def _producer(node: torch.fx.Node, modules: Mapping[str, nn.Module],
              layers: Mapping[int, QuantLayer]) -> QuantLayer | None:
    """The layer whose output `node` (an activation call) reads, through no-op modules."""
    arg = node.args[0] if node.args else None
    while isinstance(arg, torch.fx.Node) and arg.op == "call_module":
        module = modules.get(str(arg.target))
        if id(module) in layers:
            return layers[id(module)]
        if type(module) not in _PASS_THROUGH or not arg.args:
            return None
        arg = arg.args[0]
    return None


def quantize_sigmoids(model: nn.Module, layers: Mapping[str, QuantLayer],
                      graph: torch.fx.Graph | None) -> int:
    """Swap, in place, every ``nn.Sigmoid``/``nn.SiLU`` of `model` that the fx `graph`
    shows reading quantizable layers' outputs for its quantizing twin (the same object
    state, so hooks carry over); returns how many twins were made.

    A module called at several places gets one twin per call when each call is its
    parents' only one (a block class sharing one ``default_act``), so each call can have
    an output quantizer of its own; else one twin, only if every call reads a layer."""
    if graph is None:
        return 0
    modules = dict(model.named_modules(remove_duplicate=False))
    by_id = {id(layer): layer for layer in layers.values()}
    calls: dict[int, list[tuple[torch.fx.Node, QuantLayer | None]]] = {}
    objects: dict[int, nn.Module] = {}
    for node in graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if type(module) in _SWAPS:
            objects[id(module)] = module  # type: ignore[assignment]
            calls.setdefault(id(module), []).append((node, _producer(node, modules, by_id)))
    single: dict[torch.fx.Node, tuple[str, nn.Module]] = {}  # one call: its name, twin
    made = 0
    for ident, sites in calls.items():
        module = objects[ident]
        places = _places(model, module, [node for node, _ in sites])
        if places is None:
            producers = [producer for _, producer in sites]
            if None in producers:
                continue
            twin = _twin(module, tuple(dict.fromkeys(producers)))  # type: ignore[arg-type]
            for parent in model.modules():
                for key, child in parent._modules.items():
                    if child is module:
                        parent._modules[key] = twin
            made += 1
            if len(sites) == 1:
                single[sites[0][0]] = (str(sites[0][0].target), twin)
            continue
        for (node, producer), (parent, key, path) in zip(sites, places, strict=True):
            if producer is not None:
                parent._modules[key] = twin = _twin(module, (producer,))
                single[node] = (path, twin)
                made += 1
    # a SiLU called once whose product no single quantizing layer reads
    names = {node: name for node, (name, twin) in single.items() if isinstance(twin, QuantSiLU)}
    twins = dict(single.values())
    for name, use in (output_uses(model, layers, graph, sources=names) or {}).items():
        if use.others or len(use.consumers) != 1:
            _add_output_quantizer(twins[name])  # type: ignore[arg-type]
    return made


def _places(model: nn.Module, module: nn.Module, nodes: list[torch.fx.Node]
            ) -> list[tuple[nn.Module, str, str]] | None:
    """(parent, child key, qualified name) of each call of a module called at several
    places, when every call comes from a different parent holding it under one key."""
    if len(nodes) < 2:
        return None
    places = []
    for node in nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        parent_name = str(stack[-2][0]) if len(stack) >= 2 else ""
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            return None
        keys = [k for k, child in parent._modules.items() if child is module]
        if len(keys) != 1:
            return None
        places.append((parent, keys[0], f"{parent_name}.{keys[0]}".lstrip(".")))
    if len({id(parent) for parent, _, _ in places}) != len(places):
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
