"""Layer wrappers: layer-local quantize/dequantize of the input activation and the weight.

A `QuantLayer` replaces a quantizable module at its qualified name and keeps it as its child
``module``. Its behaviour is set explicitly by the engine through `QuantState`, never by
``train()``/``eval()``:

- ``FLOAT``: the original module, untouched.
- ``CALIBRATE``: observe the input activation, return the float output.
- ``QUANTIZE``: fake-quantize input and weight with the active scheme (float if the scheme
  is ``"float"``). This is exactly the QDQ graph an ONNX export expresses.
- ``COMPARE``: compute the float output and the quantized output on the same float input,
  hand both to a sensitivity accumulator, return the float output (so every layer is scored
  in isolation, and nothing but one layer's outputs is held at a time).

New layer kinds register a weight axis with `register_layer_kind`, and optionally their own
wrapper class (a `QuantLayer` subclass, see `autoquant.quant.kinds`). The layer's config ``mode``
decides the input activation: ``static`` (calibrated qparams), ``dynamic`` (qparams from each
batch's min/max at run time) or ``weight_only`` (left float).

What is searched is what is deployed: a Linear or Conv whose input is static 8-bit per
tensor runs as an integer kernel in the runtime (QGemm / QLinearConv), so its fake-quant
forward computes what that kernel computes: the bias rounded to int32 at scale
``act_scale * weight_scale`` (bias correction folded in first), weights in the range of the
deploy target (`autoquant.quant.target`), and for a convolution whose output no quantizing layer
reads, the output requantized to 8 bits (``requant``, set per plan by the engine from
`autoquant.quant.dataflow`).
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from autoquant.config import LayerConfig
from autoquant.errors import ModelError
from autoquant.plan import FLOAT, parse_scheme
from autoquant.quant.integer import CONV_KINDS, bias_ints, has_integer_kernel, kernel_note_of
from autoquant.quant.qmath import dynamic_fake_quantize, fake_quantize, qrange
from autoquant.quant.quantizer import ActivationObserver, weight_qparams
from autoquant.quant.target import deploy_weight_bits, host_target
from autoquant.quant.wrapping import (
    DIRECT_KINDS,
    ForwardsAttributes,
    call_with_module_hooks,
    compare,
    no_fast_path,
)

__all__ = ["QuantState", "QuantLayer"]

# kinds whose quantized form onnxruntime's CPU provider runs as an integer kernel (QGemm,
# QLinearConv); its ConvTranspose has no QDQ fusion and runs on dequantized weights
class QuantState(enum.Enum):
    """What every `QuantLayer` does in a forward pass; set by the engine only."""

    FLOAT = "float"
    CALIBRATE = "calibrate"
    QUANTIZE = "quantize"
    COMPARE = "compare"


class QuantLayer(ForwardsAttributes, nn.Module):
    """Fake-quant wrapper around one quantizable module (see the module docstring).

    The active qparams live in buffers (``act_scale``, ``act_zero_point``,
    ``weight_scale``, ``weight_zero_point``), so a state dict of the wrapped model carries
    everything needed to rebuild the fake-quant model without re-calibrating. ``bias_delta``
    (empty unless bias correction is on) is added to the output channels of the quantized
    forward; `bias_corrections` holds it per scheme (see `autoquant.calibration.refine`).
    """

    _QPARAM_BUFFERS = (
        "act_scale", "act_zero_point", "weight_scale", "weight_zero_point", "bias_delta",
        "out_scale", "out_zero_point",
    )

    def __init__(self, module: nn.Module, name: str, config: LayerConfig, weight_axis: int):
        super().__init__()
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ModelError(f"layer {name!r} ({type(module).__name__}) has no weight tensor")
        self._init_state(module, name, config, weight_axis)
        self.observer = ActivationObserver(config.activation)
        self.observer.owner = name
        # the output quantizer a convolution needs when no quantizing layer reads its output
        out_cfg = dataclasses.replace(
            config.activation, bits=8, per_channel=False,
            algorithm="minmax" if config.activation.algorithm == "auto"
            else config.activation.algorithm)
        self.out_observer = ActivationObserver(out_cfg)
        self._act_q: tuple[int, int, int | None] | None = None  # qmin, qmax, axis
        self._weight_q: tuple[int, int, int | None] | None = None
        for buf in self._QPARAM_BUFFERS:
            self.register_buffer(buf, torch.empty(0))

    def _init_state(self, module: nn.Module, name: str, config: LayerConfig,
                    weight_axis: int) -> None:
        """The attributes every wrapper kind has, whatever its weights and inputs."""
        self.module = module
        self.layer_name = name
        self.config = config
        self.weight_axis = weight_axis
        self.state = QuantState.FLOAT
        self.scheme = FLOAT
        self.calls = 0
        self.comparator: Any = None  # a sensitivity accumulator with update(y, y_quant)
        self.dump_dir: Path | None = None
        self._weight_cache: dict[tuple, torch.Tensor] = {}
        self._wqparam_cache: dict[tuple[int, int], tuple] = {}
        self._bias_cache: tuple[tuple, torch.Tensor | None] | None = None
        self.bias_corrections: dict[str, torch.Tensor] = {}  # scheme -> per-channel delta
        self.target = host_target()  # the deploy target (autoquant.quant.target); set by the engine
        self.integer_kernel = False  # set by set_scheme: the runtime runs QGemm/QLinearConv
        self._out_q: tuple[int, int] | None = None  # the output quantizer's qmin, qmax
        self.requant = False  # quantize the output (set per plan by the engine)
        self.requant_note: str | None = None  # why a convolution's output stays float
        self.nonfinite = False  # the sensitivity pass saw NaN/inf in the quantized output
        self.out_relu = False  # every reader rectifies the output first (autoquant.quant.dataflow)
        # input smoothing (autoquant.calibration.equalize): x * input_inv, weight / input_inv
        self.register_buffer("input_inv", torch.empty(0))
        self.register_forward_pre_hook(no_fast_path)

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}, scheme={self.scheme!r}, state={self.state.value}"

    # -- read-only views of the active scheme's quantizers (for the export and the engine) --
    @property
    def active(self) -> bool:
        """True while a quantized (non-float) scheme is set."""
        return self._weight_q is not None

    @property
    def weight_range(self) -> Any:
        """The weight quantizer's ``(qmin, qmax, axis)`` (multi-weight kinds: per weight in
        `weight_ranges`), None in float."""
        return self._weight_q

    @property
    def act_range(self) -> Any:
        """The input quantizer's ``(qmin, qmax, axis)`` (multi-point kinds: ``{point: (qmin,
        qmax)}``), None when the input stays float."""
        return self._act_q

    @property
    def out_range(self) -> tuple[int, int] | None:
        """The output quantizer's ``(qmin, qmax)``, None without one."""
        return self._out_q

    # -- schemes and qparams ---------------------------------------------------------------
    def set_scheme(self, scheme: str) -> None:
        """Switch to `scheme` (``"float"`` or ``"w<b>a<b>"``), refreshing the qparam buffers."""
        bits = parse_scheme(scheme)
        self.scheme = scheme
        if bits is None:
            self._act_q = self._weight_q = self._out_q = None
            self.integer_kernel = False
            for buf in self._QPARAM_BUFFERS:
                setattr(self, buf, torch.empty(0, device=self.module.weight.device))
            return
        w_bits, a_bits = bits
        scale, zp, qmin, qmax, axis = self.weight_qparams(w_bits)
        if self.bias_corrections:  # else keep a bias_delta loaded from a state dict
            self.bias_delta = self.bias_corrections.get(
                scheme, torch.empty(0, device=self.module.weight.device))
        self.weight_scale, self.weight_zero_point = scale, zp
        self._weight_q = (qmin, qmax, axis)
        mode = self.config.mode
        if mode != "static":
            # weight_only: no activation quantizer; dynamic: qparams come from each batch
            dev = self.module.weight.device
            self.act_scale = self.act_zero_point = torch.empty(0, device=dev)
            self._act_q = None if mode == "weight_only" else (
                *qrange(a_bits, self.config.activation.symmetric), None)
        elif self.observer.has_data:
            a_scale, a_zp, a_qmin, a_qmax, a_axis = self.observer.qparams(a_bits)
            dev = self.module.weight.device
            self.act_scale, self.act_zero_point = a_scale.to(dev), a_zp.to(dev)
            self._act_q = (a_qmin, a_qmax, a_axis)
        elif self.act_scale.numel():
            # qparams were loaded from a state dict; keep them
            qmin_a, qmax_a = qrange(a_bits, self.config.activation.symmetric)
            axis_a = 1 if self.act_scale.numel() > 1 else None
            self._act_q = (qmin_a, qmax_a, axis_a)
        else:
            raise ModelError(
                f"layer {self.layer_name!r} has no activation statistics: it was not executed "
                "by Evaluator.calibration(); make calibration() run data through it, or skip it"
            )
        self._set_integer_kernel(w_bits, a_bits)

    def weight_qparams(self, bits: int) -> tuple[torch.Tensor, torch.Tensor, int, int,
                                                 int | None]:
        """Qparams of the weight at `bits` in the deploy target's range; cached (MSE
        clipping is a search: do it once per bit width)."""
        bits = deploy_weight_bits(bits, self.config.weight.symmetric, self.target)
        key = (bits, self.module.weight._version)
        if key not in self._wqparam_cache:
            self._wqparam_cache[key] = weight_qparams(
                self.effective_weight(), bits, self.config.weight, self.weight_axis)
        return self._wqparam_cache[key]

    def _set_integer_kernel(self, w_bits: int, a_bits: int) -> None:
        """Decide whether the runtime runs this layer as an integer kernel (static 8-bit
        per-tensor input, at most 8-bit weights, torch's own Linear/Conv forward), and
        for a convolution take its output quantizer's qparams."""
        act = self._act_q
        self.integer_kernel = bool(
            self.config.mode == "static" and act is not None and act[2] is None
            and a_bits <= 8 and w_bits <= 8 and has_integer_kernel(self.module))
        self._out_q = None
        if not (self.integer_kernel and isinstance(self.module, CONV_KINDS)):
            return
        dev = self.module.weight.device
        if self.out_observer.has_data:
            o_scale, o_zp, o_qmin, o_qmax, _ = self.out_observer.qparams(8)
            self.out_scale, self.out_zero_point = o_scale.to(dev), o_zp.to(dev)
            self._out_q = (o_qmin, o_qmax)
        elif self.out_scale.numel():  # loaded from a state dict
            self._out_q = qrange(8, self.out_observer.cfg.symmetric)

    def kernel_note(self) -> str | None:
        """None when onnxruntime's CPU provider is expected to run this (active) layer as an
        integer kernel; else the reason it runs in float (`autoquant.quant.integer`)."""
        return kernel_note_of(self)

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias an integer kernel adds (bias correction folded in, rounded to int32 at
        ``act_scale * weight_scale``); None when the layer has neither."""
        bias = getattr(self.module, "bias", None)
        delta = self.bias_delta
        if not isinstance(bias, torch.Tensor) and not delta.numel():
            return None
        weight = self.module.weight
        total = torch.zeros(weight.shape[self.weight_axis], device=weight.device,
                            dtype=torch.float32)
        if isinstance(bias, torch.Tensor):
            total = total + bias.detach().float()
        if delta.numel():
            total = total + delta.detach().float()
        q, scale = bias_ints(total, self.act_scale, self.weight_scale)
        return (q.float() * scale).to(weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # qparam buffers change shape with the scheme: adopt the incoming shapes.
        state_dict.setdefault(prefix + "input_inv", torch.empty(0))  # saved before smoothing
        for buf in (*self._QPARAM_BUFFERS, "input_inv"):
            key = prefix + buf
            if key in state_dict:
                setattr(self, buf, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight of the active scheme.

        Cached in QUANTIZE state (trials run many forwards with one plan; the cost is one
        extra copy of the quantized layers' weights). Not cached in COMPARE state, so the
        sensitivity pass holds at most one layer's quantized weight at a time.
        """
        assert self._weight_q is not None
        weight = self.module.weight
        key = (self.scheme, weight._version)
        cached = self._weight_cache.get(key)
        if cached is None:
            qmin, qmax, axis = self._weight_q
            cached = fake_quantize(self.effective_weight().detach(), self.weight_scale,
                                   self.weight_zero_point, qmin, qmax, axis)
            self._weight_cache = {key: cached} if self.state is QuantState.QUANTIZE else {}
        return cached

    def _cached_bias(self) -> torch.Tensor | None:
        # keyed on the qparam tensors themselves: set_scheme swaps them when they change
        bias = getattr(self.module, "bias", None)
        key = (self.scheme, None if bias is None else bias._version, id(self.act_scale),
               id(self.weight_scale), id(self.bias_delta))
        if self._bias_cache is not None and self._bias_cache[0] == key:
            return self._bias_cache[1]
        value = self.quantized_bias()
        self._bias_cache = (key, value) if self.state is QuantState.QUANTIZE else None
        return value

    def set_input_scale(self, inv: torch.Tensor | None) -> None:
        """Smooth the quantized forward: the input times `inv` (per input channel), the
        weight's columns divided by it; None or empty turns it off. Float is unchanged."""
        weight = self.module.weight
        self.input_inv = torch.empty(0, device=weight.device) if inv is None else \
            inv.detach().to(device=weight.device, dtype=torch.float32)
        self._wqparam_cache, self._weight_cache = {}, {}

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the quantizer sees it: times ``input_inv`` when the layer is smoothed."""
        return x * self.input_inv.to(x.dtype) if self.input_inv.numel() else x

    def effective_weight(self) -> torch.Tensor:
        """The weight the quantized forward quantizes: smoothing's column scales applied."""
        weight = self.module.weight
        if not self.input_inv.numel():
            return weight
        return weight * self.input_inv.reciprocal().to(weight.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize an input activation with the active scheme (per the layer's mode)."""
        x = self.scale_input(x)
        if self._act_q is None:  # weight_only
            return x
        qmin, qmax, axis = self._act_q
        if self.config.mode == "dynamic":
            return dynamic_fake_quantize(x, qmin, qmax, self.config.activation)
        return fake_quantize(x, self.act_scale, self.act_zero_point, qmin, qmax, axis)

    # -- forward -----------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, weight: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if self.integer_kernel:
            return self._integer_run(x, weight)
        out = self._run_module(x, weight, args, kwargs)
        if self.bias_delta.numel() and isinstance(out, torch.Tensor):
            dim = out.dim() - 1 if isinstance(self.module, nn.Linear) else 1
            shape = [1] * out.dim()
            shape[dim] = -1
            out = out + self.bias_delta.reshape(shape).to(out.dtype)
        return out

    def _run_module(
        self, x: torch.Tensor, weight: torch.Tensor, args: tuple, kwargs: dict
    ) -> Any:
        module = self.module
        if not args and not kwargs:
            if type(module) is nn.Linear:
                return F.linear(x, weight, module.bias)
            if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
                return module._conv_forward(x, weight, module.bias)
        return functional_call(module, {"weight": weight}, (x, *args), kwargs)

    def _integer_run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What QGemm / QLinearConv compute: the op with the int32-rounded bias, then the
        output requantization when `requant` is on."""
        module = self.module
        bias = self._cached_bias()
        if isinstance(module, nn.Linear):
            out = F.linear(x, weight, bias)
        else:
            out = module._conv_forward(x, weight, bias)
        if self.requant and self._out_q is not None:
            out = fake_quantize(out, self.out_scale, self.out_zero_point, *self._out_q)
        return out

    def _quant_forward(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if self._weight_q is None:
            return self.module(x, *args, **kwargs)

        def compute(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return self._run(self.quantize_input(x), self.quantized_weight(), args, kwargs)

        if self.integer_kernel or (not args and not kwargs and type(self.module) in DIRECT_KINDS):
            # computed without calling the module: run the user's hooks on it around us
            return call_with_module_hooks(self.module, compute, x, *args, **kwargs)
        return compute(x, *args, **kwargs)  # through functional_call: its hooks run there

    def _observe_output(self, y: Any) -> None:
        # an integer convolution's output range, for the output quantizer `requant` uses
        if isinstance(y, torch.Tensor) and isinstance(self.module, CONV_KINDS) and \
                has_integer_kernel(self.module):
            self.out_observer.update(torch.relu(y) if self.out_relu else y)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if state is QuantState.FLOAT:
            return self.module(x, *args, **kwargs)
        if state is QuantState.QUANTIZE:
            return self._quant_forward(x, args, kwargs)
        self.calls += 1
        if state is QuantState.CALIBRATE:
            static = self.config.mode == "static"
            if static:
                self.observer.update(self.scale_input(x))
            y = self.module(x, *args, **kwargs)
            if static:
                self._observe_output(y)
            return y
        # COMPARE
        if self.dump_dir is not None:
            self._dump(x)
        y = self.module(x, *args, **kwargs)
        if self.comparator is not None and self._weight_q is not None:
            with torch.no_grad():  # compared, never differentiated
                compare(self, y, self._quant_forward(x, args, kwargs))
        return y

    def _dump(self, x: torch.Tensor) -> None:
        from autoquant.io.atomic import atomic_torch_save

        assert self.dump_dir is not None
        atomic_torch_save(self.dump_dir / f"input_{self.calls - 1:05d}.pt", x.detach().cpu())
