"""The export-time layers: what an active `autoquant.quant.layers.QuantLayer` (and
`autoquant.quant.kinds.QuantEmbedding`) becomes in the exported copy (`QDQLayer`), and what
an active `autoquant.quant.kinds.MultiQuantLayer` (RNNs, attention, `QuantMatMul`) becomes
(`QDQMultiLayer`), written with the QDQ ops of `autoquant.export.qdq_ops`.

Every layer mode exports as the searched model computes it: ``static`` as QDQ with the
calibrated qparams, ``dynamic`` with the qparams computed in the graph, ``weight_only`` as
a float input; a bias-correction ``bias_delta`` is added to the output as the layer adds it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from autoquant.errors import InternalError
from autoquant.export.qdq_ops import (
    broadcast,
    dequantize_linear,
    dynamic_qdq,
    quantize_linear,
    static_act,
    static_qdq,
    storage_type,
    weight_ints,
)
from autoquant.quant.activations import SIGMOID_SCALE
from autoquant.quant.integer import bias_ints
from autoquant.quant.layers import QuantLayer
from autoquant.quant.wrapping import ForwardsAttributes, call_with_module_hooks, no_fast_path

__all__ = ["QDQLayer", "QDQMultiLayer", "QDQSigmoid"]


class _WrapsModule(ForwardsAttributes, nn.Module):
    """Reads of attributes a QDQ module lacks go to the float module it replaces, as they
    do through the search-time wrappers (a parent's ``self.attn.batch_first``); a no-op
    pre-hook keeps torch's fused encoder fast path (raw float weights) out of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(no_fast_path)


class QDQLayer(_WrapsModule):
    """What an active `QuantLayer` computes, written with the QDQ custom ops: integer
    weight + DequantizeLinear, the input activation per the layer's mode (static: the
    calibrated QDQ; dynamic: qparams computed in the graph; weight_only: float), and the
    layer's ``bias_delta`` (bias correction) added to the output as the layer adds it.

    A layer the runtime runs as an integer kernel (``QuantLayer.integer_kernel``) is written
    in the pattern onnxruntime fuses into QGemm / QLinearConv: a Linear input flattened to
    2-D *before* its QDQ, the bias as an int32 DequantizeLinear inside the op at scale
    ``act_scale * weight_scale`` (the bias correction folded in), and for a requantized
    convolution a QuantizeLinear/DequantizeLinear on the output."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        if not layer.active:
            raise InternalError(f"layer {layer.layer_name!r} has no active scheme to export")
        self.layer_name = layer.layer_name
        self.kind = type(layer).__name__
        self.module = layer.module
        self.mode = layer.config.mode
        self.act_cfg = layer.config.activation
        w_qmin, w_qmax, self.weight_axis = layer.weight_range
        self.weight_dtype = layer.module.weight.dtype
        # onnxruntime's u8xu8 kernel has no VNNI path (3.8x the time of u8xs8 on a VNNI
        # CPU): there an unsigned weight goes as int8 with a shifted zero point, which
        # VNNI's int32 accumulation computes exactly (on x86_avx2 it could saturate)
        weight_int, w_scale, w_zp = weight_ints(
            self.layer_name, layer.quantized_weight(), layer.weight_scale,
            layer.weight_zero_point, w_qmin, w_qmax, self.weight_axis,
            signed=layer.integer_kernel and layer.target == "x86_vnni")
        self.register_buffer("weight_int", weight_int)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("weight_zero_point", w_zp)
        sizes = [storage_type(w_qmin, w_qmax)[0].itemsize]
        self.act_range: tuple[int, int] | None = None
        self.act_spec: tuple | None = None
        if layer.act_range is not None:
            a_qmin, a_qmax, act_axis = layer.act_range
            sizes.append(storage_type(a_qmin, a_qmax)[0].itemsize)
            self.act_range = (a_qmin, a_qmax)
            if self.mode != "dynamic":
                self.act_spec = static_act(
                    self, ("act_scale", "act_zero_point", "act_low", "act_high"),
                    layer.act_scale, layer.act_zero_point, a_qmin, a_qmax, act_axis)
        self.storage_bits = max(sizes) * 8
        delta = layer.bias_delta.detach()
        self.register_buffer("bias_delta", delta if delta.numel() else None)
        inv = layer.input_inv.detach()  # input smoothing: one Mul ahead of the input's QDQ
        self.register_buffer("input_inv", inv.to(self.weight_dtype) if inv.numel() else None)
        self.integer = bool(layer.integer_kernel)
        self.out_spec: tuple | None = None
        if self.integer:
            self._integer_buffers(layer)
        # an nn.Embedding gathers its integer rows, then dequantizes them: onnxruntime runs
        # a DequantizeLinear of the whole table before a Gather on every call (10x a float
        # lookup for a 30k-token vocabulary); the rows' values are the same
        self.lookup = type(self.module) is nn.Embedding and self.module.max_norm is None \
            and self.weight_axis in (0, None) and self.act_range is None \
            and self.bias_delta is None and self.input_inv is None
        self.zero_points = bool(torch.any(w_zp != 0))

    def _integer_buffers(self, layer: QuantLayer) -> None:
        """The int32 bias (bias correction folded in) and the output quantizer, as the
        searched layer computes them (`QuantLayer.quantized_bias`, ``requant``)."""
        bias = getattr(self.module, "bias", None)
        self.bias_axis: int | None = None
        self.register_buffer("bias_int", None)
        if isinstance(bias, torch.Tensor) or self.bias_delta is not None:
            total = torch.zeros(self.weight_int.shape[layer.weight_axis], dtype=torch.float32,
                                device=self.weight_int.device)
            if isinstance(bias, torch.Tensor):
                total = total + bias.detach().float()
            if self.bias_delta is not None:
                total = total + self.bias_delta.float()
            q, scale = bias_ints(total, layer.act_scale, layer.weight_scale)
            self.bias_axis = 0 if scale.numel() > 1 else None
            if self.bias_axis is None:
                scale = scale.reshape(())
            self.register_buffer("bias_int", q)
            self.register_buffer("bias_scale", scale)
            self.register_buffer("bias_zero_point", torch.zeros_like(scale, dtype=torch.int32))
        if layer.requant and layer.out_range is not None:
            self.out_spec = static_act(
                self, ("out_scale", "out_zero_point", "out_low", "out_high"),
                layer.out_scale, layer.out_zero_point, *layer.out_range, None)

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        linear = isinstance(module, nn.Linear)
        shape = x.shape
        if linear and x.dim() != 2:  # a Gemm on 2-D: flatten before the QDQ, not after
            x = x.reshape(-1, shape[-1])
        padded = not linear and module.padding_mode != "zeros"
        if padded:  # a reflect/replicate/circular pad copies values: pad before the QDQ,
            # so that QuantizeLinear -> DequantizeLinear -> Conv fuses into QLinearConv
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        if self.input_inv is not None:
            x = x * self.input_inv
        x = static_qdq(self, self.act_spec, x)
        w = dequantize_linear(self.weight_int, self.weight_scale, self.weight_zero_point,
                              self.weight_axis).to(self.weight_dtype)
        b = None
        if self.bias_int is not None:
            b = dequantize_linear(self.bias_int, self.bias_scale, self.bias_zero_point,
                                  self.bias_axis).to(self.weight_dtype)
        if linear:
            y = F.linear(x, w, b)
        elif padded:
            conv = getattr(F, f"conv{len(module.kernel_size)}d")
            y = conv(x, w, b, module.stride, 0, module.dilation, module.groups)
        else:
            y = module._conv_forward(x, w, b)
        if self.out_spec is not None:
            y = static_qdq(self, self.out_spec, y)
        if linear and len(shape) != 2:
            y = y.reshape(*shape[:-1], y.shape[-1])
        return y

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_inv is not None:
            x = x * self.input_inv
        if self.act_range is None:  # weight_only
            return x
        if self.act_spec is None:  # dynamic
            return dynamic_qdq(x, *self.act_range, self.act_cfg)
        return static_qdq(self, self.act_spec, x)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding of `ids` as DequantizeLinear of the table computes it, from the
        gathered integer rows and their scales and zero points (``(q - zp) * s``)."""
        rows = F.embedding(ids, self.weight_int).float()
        if self.weight_axis is None:
            scale, zp = self.weight_scale.reshape(()), self.weight_zero_point.reshape(())
        else:
            scale = F.embedding(ids, self.weight_scale.reshape(-1, 1))
            zp = F.embedding(ids, self.weight_zero_point.reshape(-1, 1))
        if self.zero_points:
            rows = rows - zp.float()
        return (rows * scale).to(self.weight_dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.integer:  # computed without calling the module: run its hooks around us
            return call_with_module_hooks(self.module, self._integer_forward, x)
        if self.lookup and not args and not kwargs:
            return call_with_module_hooks(self.module, self._lookup, x)
        x = self._input(x)
        w = dequantize_linear(self.weight_int, self.weight_scale, self.weight_zero_point,
                              self.weight_axis).to(self.weight_dtype)
        module = self.module
        bias = getattr(module, "bias", None)
        channel = _channel_axis(module, x.dim())
        if isinstance(bias, torch.Tensor) and channel is not None:
            # The bias is added after the Gemm/Conv, not as its third input: onnxruntime's
            # WeightBiasQuantization optimizer would otherwise round a float bias fed to a
            # QDQ Conv/Gemm to int32 at scale act_scale * weight_scale, which is not what the
            # searched model computes (and overflows at 16 bits).
            with _GemmLinear():
                y = functional_call(module, {"weight": w, "bias": torch.zeros_like(bias)},
                                    (x, *args), kwargs)
            y = y + broadcast(bias, y.dim(), channel % y.dim())
        else:
            with _GemmLinear():
                y = functional_call(module, {"weight": w}, (x, *args), kwargs)
        if self.bias_delta is not None and isinstance(y, torch.Tensor):
            # as QuantLayer._run adds it: last axis for Linear, axis 1 otherwise
            dim = y.dim() - 1 if isinstance(module, nn.Linear) else 1
            y = y + broadcast(self.bias_delta, y.dim(), dim).to(y.dtype)
        return y


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)


class QDQSigmoid(nn.Module):
    """A `QuantSigmoid`/`QuantSiLU` whose quantizer is on, written as the runtime fuses it:
    ``Sigmoid -> QuantizeLinear -> DequantizeLinear`` (QLinearSigmoid) and, for a SiLU, the
    product with the input (QLinearMul when the next layer or `out`, the SiLU's own output
    quantizer ``(scale, zero point, qmin, qmax)``, quantizes it)."""

    def __init__(self, silu: bool, span: tuple[int, int], out: tuple | None = None) -> None:
        super().__init__()
        self.silu = silu
        dtype, _ = storage_type(*span)
        self.register_buffer("sigmoid_scale", torch.tensor(SIGMOID_SCALE, dtype=torch.float32))
        self.register_buffer("sigmoid_zero_point", torch.tensor(span[0], dtype=dtype))
        self.out_spec = None if out is None else static_act(
            self, ("out_scale", "out_zero_point", "out_low", "out_high"), *out, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = quantize_linear(torch.sigmoid(x).float(), self.sigmoid_scale,
                            self.sigmoid_zero_point, None)
        s = dequantize_linear(q, self.sigmoid_scale, self.sigmoid_zero_point, None).to(x.dtype)
        if not self.silu:
            return s
        y = x * s
        return y if self.out_spec is None else static_qdq(self, self.out_spec, y)


def _channel_axis(module: nn.Module, input_dim: int) -> int | None:
    """The output-channel axis of a Linear/Conv output (the bias axis), for a module that
    runs torch's own forward; None otherwise (a subclass's forward may do anything after
    the bias, e.g. scale the output, so its bias stays where its forward puts it)."""
    for base in (nn.Linear, *_CONVS):
        if isinstance(module, base) and type(module).forward is not base.forward:
            return None
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, _CONVS):
        return input_dim - len(module.kernel_size) - 1  # batched or unbatched input
    return None


# -- the export-time replacement of an active MultiQuantLayer ----------------------------------
class QDQMultiLayer(_WrapsModule):
    """What an active `autoquant.quant.kinds.MultiQuantLayer` (RNN, attention, QuantMatMul)
    computes, written with the QDQ custom ops.

    It runs the wrapper class's own ``compute`` with this module as ``self``: its hooks
    ``qw`` (an integer weight buffer + DequantizeLinear) and ``qa`` (the activation point's
    calibrated QDQ, the graph-computed dynamic QDQ, or nothing in ``weight_only`` mode)
    replace the fake-quant ones, so the exported graph is the wrapper's forward op for op
    (an LSTM/GRU is traced through ``torch.func.functional_call`` with dequantized
    weights). A subclass's ``compute`` may use ``self.module``, ``self.weight_names``,
    ``self.act_points``, ``self.config``, ``self.quantizing``, ``self.qw``, ``self.qw_rows``
    and ``self.qa``.
    """

    def __init__(self, layer: Any) -> None:
        super().__init__()
        if not layer.active:
            raise InternalError(f"layer {layer.layer_name!r} has no active scheme to export")
        self.layer_name = layer.layer_name
        self.module = layer.module
        self.config = layer.config
        self.weight_names = tuple(layer.weight_names)
        self.act_points = tuple(layer.act_points)
        self.kind = type(layer).__name__
        self._compute = type(layer).compute  # a plain function, called with self below
        self.quantizing = True  # compute() reads it: the export is the quantized forward
        self.mode = layer.config.mode
        sizes = [1]
        self._weights: dict[str, tuple[str, str, str, torch.dtype, int | None]] = {}
        ranges = layer.weight_ranges
        for name in self.weight_names:
            qmin, qmax, axis = ranges[name]
            key = name.replace(".", "_")
            ints, scale, zp = weight_ints(
                f"{self.layer_name}:{name}", layer.quantized_weight_of(name),
                getattr(layer, f"wscale_{key}"), getattr(layer, f"wzp_{key}"), qmin, qmax, axis)
            dtype = self.module.get_parameter(name).dtype
            blocks = layer.weight_blocks.get(name, 1)
            rows = ints.shape[0] // blocks
            for i in range(blocks):  # a packed weight: one integer weight per block
                tag = key if blocks == 1 else f"{key}_{i}"
                part = slice(i * rows, (i + 1) * rows)
                names = (f"wint_{tag}", f"wscale_{tag}", f"wzp_{tag}")
                values = (ints, scale, zp) if blocks == 1 else (
                    ints[part], *((t[part] if axis is not None else t) for t in (scale, zp)))
                for buf, value in zip(names, values, strict=True):
                    self.register_buffer(buf, value.clone())
                block = name if blocks == 1 else f"{name}[{i * rows}:{(i + 1) * rows}]"
                self._weights[block] = (*names, dtype, axis)
            sizes.append(storage_type(qmin, qmax)[0].itemsize)
        self._acts: dict[str, tuple] = {}
        self._act_ranges: dict[str, tuple[int, int]] = dict(layer.act_range or {})
        for point, (qmin, qmax) in self._act_ranges.items():
            sizes.append(storage_type(qmin, qmax)[0].itemsize)
            if self.mode == "static":
                self._acts[point] = static_act(
                    self, (f"ascale_{point}", f"azp_{point}", f"alow_{point}",
                           f"ahigh_{point}"),
                    getattr(layer, f"ascale_{point}"), getattr(layer, f"azp_{point}"),
                    qmin, qmax, None)
        self.storage_bits = max(sizes) * 8

    def qw(self, name: str) -> torch.Tensor:
        """The dequantized integer weight `name` (in the parameter's dtype)."""
        ints, scale, zp, dtype, axis = self._weights[name]
        return dequantize_linear(getattr(self, ints), getattr(self, scale), getattr(self, zp),
                                 axis).to(dtype)

    def qw_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of weight `name`, sliced from the integers before their
        DequantizeLinear, so the runtime sees a constant integer weight per matmul."""
        block = self._weights.get(f"{name}[{start}:{stop}]")
        if block is not None:
            ints, scale, zp, dtype, axis = block
            return dequantize_linear(getattr(self, ints), getattr(self, scale),
                                     getattr(self, zp), axis).to(dtype)
        ints, scale, zp, dtype, axis = self._weights[name]
        s, z = getattr(self, scale), getattr(self, zp)
        if axis is not None:
            s, z = s[start:stop], z[start:stop]
        return dequantize_linear(getattr(self, ints)[start:stop], s, z, axis).to(dtype)

    def qa(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """Activation `x` at `point`, fake-quantized as the wrapper does, as QDQ ops."""
        if point not in self._act_ranges:  # weight_only
            return x
        if self.mode == "dynamic":
            return dynamic_qdq(x, *self._act_ranges[point], self.config.activation)
        return static_qdq(self, self._acts[point], x)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _GemmLinear():
            return self._compute(self, args, kwargs)


class _GemmLinear(torch.overrides.TorchFunctionMode):
    """Runs ``F.linear`` as a 2-D Gemm (the input reshaped around it) with its bias added
    after it.

    Why the Add: onnxruntime rounds a float bias fed to a QDQ Gemm to int32 at scale
    ``act_scale * weight_scale`` (its WeightBiasQuantization), which is not what the
    searched float bias computes; QGemm still fuses, the Add stays exact.

    onnxruntime (1.20+) rewrites DequantizeLinear(int8 weight) -> MatMul into MatMulNBits,
    which by default quantizes a float input to int8 on the fly (accuracy_level 4): the
    layer would no longer compute what the searched model computes (a weight-only layer,
    or a dynamic one, whose in-graph qparams it re-quantizes). It leaves Gemm alone."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and args and isinstance(args[0], torch.Tensor):
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = func(x.reshape(-1, x.shape[-1]), weight)
            if bias is not None:
                y = y + bias
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return func(*args, **kwargs)
