"""`MultiQuantLayer`: the wrapper base for kinds with several weights and activation points.

`QuantLayer` fake-quantizes one input and one ``weight``. An LSTM has a weight per layer,
direction and gate group; attention has projection weights and the two matmuls between
activations. A `MultiQuantLayer` keeps one set of qparam buffers per weight
(``wscale_<weight>``/``wzp_<weight>``) and per activation point
(``ascale_<point>``/``azp_<point>``), so a state dict still carries everything needed to
rebuild the fake-quant model, and one observer per activation point.

Subclasses implement `compute`, the module's forward written with two hooks:
``self.qw(name)`` (the weight, fake-quantized when quantizing) and ``self.qa(point, x)``
(the activation, observed while calibrating and fake-quantized while quantizing). The
engine's states keep their meaning: FLOAT and COMPARE's reference run the original module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from autoquant.batches import primary_tensor
from autoquant.config import LayerConfig
from autoquant.errors import ModelError
from autoquant.plan import parse_scheme
from autoquant.quant.layers import QuantLayer, QuantState
from autoquant.quant.qmath import dynamic_fake_quantize
from autoquant.quant.quantizer import (
    ActivationObserver,
    fake_quantize,
    qrange,
    weight_qparams,
)
from autoquant.quant.target import deploy_weight_bits
from autoquant.quant.wrapping import compare

__all__ = ["MultiQuantLayer", "primary_tensor"]


def _key(name: str) -> str:
    return name.replace(".", "_")


class MultiQuantLayer(QuantLayer):
    """Fake-quant wrapper for a module with several weights and activation points.

    Args:
        module: the wrapped module.
        name: its qualified name.
        config: its layer config (activations are always quantized per tensor here).
        weight_axis: the output-channel axis of every weight in `weight_names`.
        weight_names: qualified parameter names inside `module` to quantize.
        act_points: names of the activation points `compute` passes through ``qa``.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        config: LayerConfig,
        weight_axis: int,
        weight_names: tuple[str, ...],
        act_points: tuple[str, ...],
    ) -> None:
        nn.Module.__init__(self)  # QuantLayer.__init__ insists on one ``weight`` tensor
        params = dict(module.named_parameters())
        for weight in weight_names:
            if weight not in params:
                raise ModelError(f"layer {name!r} ({type(module).__name__}) has no {weight!r}")
        self._init_state(module, name, config, weight_axis)
        self.weight_names = tuple(weight_names)
        self.act_points = tuple(act_points)
        # weights packing several matmuls' rows (q|k|v): {name: blocks}; the export stores
        # one integer weight per block so each matmul runs its own integer kernel
        self.weight_blocks: dict[str, int] = {}
        act_cfg = dataclasses.replace(config.activation, per_channel=False)
        self.observers = {p: ActivationObserver(act_cfg) for p in self.act_points}
        self.observer = ActivationObserver(act_cfg)  # QuantLayer's attribute; unused here
        self._weight_q: Any = None  # not None while a quantized scheme is active
        self._act_q: dict[str, tuple[int, int]] | None = None
        self._wq: dict[str, tuple[int, int, int | None]] = {}
        self._phase = "float"  # inside compute(): "observe" or "quant"
        buffers = []
        for weight in self.weight_names:
            buffers += [f"wscale_{_key(weight)}", f"wzp_{_key(weight)}"]
        for point in self.act_points:
            buffers += [f"ascale_{point}", f"azp_{point}"]
        self._QPARAM_BUFFERS = tuple(buffers)
        for buf in buffers:
            self.register_buffer(buf, torch.empty(0))

    def _device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        return torch.device("cpu")

    # -- schemes and qparams ---------------------------------------------------------------
    def set_scheme(self, scheme: str) -> None:
        """Switch to `scheme`; every weight and (per mode) activation point gets qparams."""
        bits = parse_scheme(scheme)
        self.scheme = scheme
        self._weight_cache = {}
        dev = self._device()
        if bits is None:
            self._weight_q = self._act_q = None
            for buf in self._QPARAM_BUFFERS:
                setattr(self, buf, torch.empty(0, device=dev))
            return
        w_bits, a_bits = bits
        params = dict(self.module.named_parameters())
        for weight in self.weight_names:
            scale, zp, qmin, qmax, axis = weight_qparams(
                params[weight], deploy_weight_bits(w_bits, self.config.weight.symmetric,
                                                   self.target),
                self.config.weight, self.weight_axis,
            )
            setattr(self, f"wscale_{_key(weight)}", scale)
            setattr(self, f"wzp_{_key(weight)}", zp)
            self._wq[weight] = (qmin, qmax, axis)
        self._weight_q = (w_bits, a_bits)
        mode = self.config.mode
        if mode == "weight_only":
            self._act_q = None
            return
        qmin, qmax = qrange(a_bits, self.config.activation.symmetric)
        self._act_q = dict.fromkeys(self.act_points, (qmin, qmax))
        if mode == "dynamic":
            return
        for point in self.act_points:
            observer = self.observers[point]
            if observer.has_data:
                a_scale, a_zp, *_ = observer.qparams(a_bits)
                setattr(self, f"ascale_{point}", a_scale.to(dev))
                setattr(self, f"azp_{point}", a_zp.to(dev))
            elif not getattr(self, f"ascale_{point}").numel():  # none loaded either
                raise ModelError(
                    f"layer {self.layer_name!r} has no activation statistics for {point!r}: it "
                    "was not executed by Evaluator.calibration(); make calibration() run data "
                    "through it, skip it, or give it mode 'dynamic' or 'weight_only'"
                )

    # -- the hooks compute() uses ------------------------------------------------------------
    @property
    def quantizing(self) -> bool:
        """True inside `compute` while it runs the quantized forward."""
        return self._phase == "quant"

    @property
    def weight_ranges(self) -> dict[str, tuple[int, int, int | None]]:
        """Each weight's ``(qmin, qmax, axis)`` under the active scheme."""
        return dict(self._wq)

    def quantized_weight_of(self, name: str) -> torch.Tensor:
        """The fake-quantized weight `name` under the active scheme (whatever the phase)."""
        self._phase = "quant"
        try:
            return self.qw(name)
        finally:
            self._phase = "float"

    def qw(self, name: str) -> torch.Tensor:
        """Parameter `name` of the module: fake-quantized while quantizing, else as is."""
        param = self.module.get_parameter(name)
        if self._phase != "quant" or self._weight_q is None:
            return param
        key = (self.scheme, name, param._version)
        cached = self._weight_cache.get(key)
        if cached is None:
            qmin, qmax, axis = self._wq[name]
            cached = fake_quantize(
                param.detach(), getattr(self, f"wscale_{_key(name)}"),
                getattr(self, f"wzp_{_key(name)}"), qmin, qmax, axis,
            )
            if self.state is QuantState.QUANTIZE:  # see QuantLayer.quantized_weight
                self._weight_cache[key] = cached
        return cached

    def qw_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of `qw(name)` (e.g. one of the q/k/v blocks of a packed
        projection): the export slices the integer weight, so each block is its own
        integer-kernel weight."""
        return self.qw(name)[start:stop]

    def qa(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """Activation `x` at `point`: observed while calibrating, fake-quantized while
        quantizing (static or dynamic qparams), untouched otherwise."""
        if self._phase == "observe":
            self.observers[point].update(x)
            return x
        if self._phase != "quant" or self._act_q is None:
            return x
        qmin, qmax = self._act_q[point]
        if self.config.mode == "dynamic":
            return dynamic_fake_quantize(x, qmin, qmax, self.config.activation)
        return fake_quantize(
            x, getattr(self, f"ascale_{point}"), getattr(self, f"azp_{point}"), qmin, qmax
        )

    def compute(self, args: tuple, kwargs: dict) -> Any:
        """The module's forward written with `qw` and `qa`; subclasses implement it."""
        raise NotImplementedError

    def kernel_note(self) -> str | None:
        """Why onnxruntime cannot run this layer's matmuls as integer kernels, or None
        (static 8-bit: the export's kernel count then says what it fused)."""
        if self._weight_q is None:
            return "float"
        if self.config.mode == "weight_only":
            return "weight-only: the inputs stay float, the ops run on dequantized weights"
        if self.config.mode == "dynamic":
            return ("dynamic: the input qparams are computed in the graph, which onnxruntime "
                    "does not fuse into an integer kernel")
        if max(self._weight_q) > 8:
            return f"{self.scheme}: onnxruntime's CPU provider has no 16-bit integer kernel"
        return None

    def _in_phase(self, phase: str, args: tuple, kwargs: dict) -> Any:
        self._phase = phase
        try:
            return self.compute(args, kwargs)
        finally:
            self._phase = "float"

    # -- forward -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        state = self.state
        if state is QuantState.FLOAT:
            return self.module(*args, **kwargs)
        if state is QuantState.QUANTIZE:
            if self._weight_q is None:
                return self.module(*args, **kwargs)
            return self._in_phase("quant", args, kwargs)
        self.calls += 1
        if state is QuantState.CALIBRATE:
            if self.config.mode != "static" or not self.act_points:
                return self.module(*args, **kwargs)
            return self._in_phase("observe", args, kwargs)
        # COMPARE
        if self.dump_dir is not None and args and isinstance(args[0], torch.Tensor):
            self._dump(args[0])
        y = self.module(*args, **kwargs)
        if self.comparator is not None and self._weight_q is not None:
            y_q = self._in_phase("quant", args, kwargs)
            compare(self, y, y_q)
        return y

    def extra_repr(self) -> str:
        return (f"name={self.layer_name!r}, scheme={self.scheme!r}, state={self.state.value}, "
                f"weights={len(self.weight_names)}, act_points={','.join(self.act_points)}")
