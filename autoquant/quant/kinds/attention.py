"""Attention: `nn.MultiheadAttention` and activation-by-activation matmuls (`QuantMatMul`).

`QuantMultiheadAttention` re-implements ``nn.MultiheadAttention.forward`` so that, besides
the projection weights (``in_proj_weight`` or ``q/k/v_proj_weight``, and
``out_proj.weight``, per row), the activations entering the two matmuls are fake-quantized:
``q``·``k``ᵀ and ``attn``·``v``. Its activation points: ``query``, ``key``, ``value`` (the
in-projection inputs), ``q``, ``k``, ``v`` (the matmul operands), ``attn`` (the softmax
probabilities) and ``context`` (the out-projection input). The whole module is one unit in
the ranking and the search. In float it equals ``nn.MultiheadAttention`` (tested to 1e-5).

`QuantMatMul` is a module users put in their own attention in place of ``a @ b`` /
``torch.matmul(a, b)`` on activations; autoquant then fake-quantizes both operands
(points ``a`` and ``b``), as one named unit. Outside a search it is a plain matmul.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoquant.config import LayerConfig
from autoquant.quant.kinds.base import MultiQuantLayer

__all__ = ["QuantMatMul", "QuantMatMulLayer", "QuantMultiheadAttention"]


class QuantMatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module, so autoquant can quantize both operands.

    Example:
        >>> class Attention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.scores = autoquant.QuantMatMul()   # q @ k^T
        ...         self.mix = autoquant.QuantMatMul()      # attn @ v
        ...     def forward(self, q, k, v):
        ...         attn = self.scores(q, k.transpose(-2, -1)).softmax(-1)
        ...         return self.mix(attn, v)
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Return ``torch.matmul(a, b)``."""
        return torch.matmul(a, b)


class QuantMatMulLayer(MultiQuantLayer):
    """Wrapper of `QuantMatMul`: both operands are activations (no weight); a scheme's
    weight bits are ignored. In ``weight_only`` mode nothing is quantized."""

    def __init__(self, module: nn.Module, name: str, config: LayerConfig, weight_axis: int):
        super().__init__(module, name, config, weight_axis, (), ("a", "b"))

    def compute(self, args: tuple, kwargs: dict) -> Any:
        bound = _MATMUL_SIG.bind(*args, **kwargs)
        return torch.matmul(self.qa("a", bound.arguments["a"]), self.qa("b", bound.arguments["b"]))


_MATMUL_SIG = inspect.signature(QuantMatMul.forward).replace(
    parameters=list(inspect.signature(QuantMatMul.forward).parameters.values())[1:]
)
_MHA_SIG = inspect.signature(nn.MultiheadAttention.forward)
_MHA_SIG = _MHA_SIG.replace(parameters=list(_MHA_SIG.parameters.values())[1:])


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not allowed) as an additive float mask; floats pass through."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class QuantMultiheadAttention(MultiQuantLayer):
    """Wrapper of `nn.MultiheadAttention` (see the module docstring)."""

    def __init__(self, module: nn.Module, name: str, config: LayerConfig, weight_axis: int):
        if module._qkv_same_embed_dim:
            weights: tuple[str, ...] = ("in_proj_weight",)
        else:
            weights = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        points = ("query", "key", "value", "q", "k", "v", "attn", "context")
        super().__init__(module, name, config, weight_axis, (*weights, "out_proj.weight"),
                         points)
        if module._qkv_same_embed_dim:
            self.weight_blocks = {"in_proj_weight": 3}

    def compute(self, args: tuple, kwargs: dict) -> Any:
        # module-level steps taking the layer: the export runs this with its QDQ module as
        # `self` (autoquant.export.qdq.QDQMultiLayer), which has qw/qa but not our methods
        m = self.module
        a = _MHA_SIG.bind(*args, **kwargs)
        a.apply_defaults()
        query, key, value = a.arguments["query"], a.arguments["key"], a.arguments["value"]
        key_padding_mask = a.arguments["key_padding_mask"]
        batched = query.dim() == 3
        same_kv, same_qk = key is value, query is key
        if m.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        q, k, v = _project(self, query, key, value, same_qk, same_kv)
        tgt_len, bsz, embed = query.shape
        attn_mask = _additive(a.arguments["attn_mask"], query.dtype)
        key_padding_mask = _additive(key_padding_mask, query.dtype)
        if a.arguments["is_causal"] and attn_mask is None:
            attn_mask = torch.triu(torch.full((tgt_len, key.shape[0]), float("-inf"),
                                              dtype=query.dtype, device=query.device),
                                   diagonal=1)
        q, k, v, attn_mask = _split_heads(m, q, k, v, attn_mask, key_padding_mask, bsz)
        out, probs = _attend(self, q, k, v, attn_mask, (tgt_len, bsz, embed))
        weights = None
        if a.arguments["need_weights"]:
            weights = probs.view(bsz, m.num_heads, tgt_len, k.shape[1])
            if a.arguments["average_attn_weights"]:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(1)
        elif m.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _project(layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             same_qk: bool, same_kv: bool) -> list[torch.Tensor]:
    """The q/k/v in-projections of (sequence-first) inputs, their inputs fake-quantized."""
    m = layer.module
    embed = query.shape[-1]
    # the same tensor fed twice is quantized (and observed) once per point
    q_in = layer.qa("query", query)
    if layer.quantizing:
        k_in = q_in if same_qk else layer.qa("key", key)
        v_in = k_in if same_kv else layer.qa("value", value)
    else:  # observe every point, so each has its own statistics
        k_in, v_in = layer.qa("key", key), layer.qa("value", value)
    # each projection is its own matmul on its rows of a packed weight, so the runtime sees
    # three constant integer weights (three QGemm), not one split after dequantize
    biases: tuple[Any, ...] = (None, None, None)
    if m.in_proj_bias is not None:
        biases = m.in_proj_bias.chunk(3)
    projected = []
    for i, x_in in enumerate((q_in, k_in, v_in)):
        if m._qkv_same_embed_dim:
            w = layer.qw_rows("in_proj_weight", i * embed, (i + 1) * embed)
        else:
            w = layer.qw(("q_proj_weight", "k_proj_weight", "v_proj_weight")[i])
        projected.append(F.linear(x_in, w, biases[i]))
    return projected


def _split_heads(m: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 bsz: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor | None]:
    """(batch * heads, length, head_dim) q, k, v with bias_k/v and zero attention added,
    and the one additive mask of both masks, as `nn.MultiheadAttention` builds them."""
    heads = m.num_heads
    head_dim = q.shape[-1] // heads
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, m.bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask,
                                                                       (0, 1))
    q = q.view(q.shape[0], bsz * heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
    if m.add_zero_attn:
        zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask,
                                                                       (0, 1))
    if key_padding_mask is not None:
        src_len = k.shape[1]
        kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
        kpm = kpm.reshape(bsz * heads, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    return q, k, v, attn_mask


def _attend(layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            attn_mask: torch.Tensor | None, shape: tuple[int, int, int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two matmuls between activations (operands fake-quantized), the softmax and the
    out-projection; the (sequence-first) output and the attention probabilities."""
    m = layer.module
    tgt_len, bsz, embed = shape
    q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
    scores = torch.bmm(layer.qa("q", q_scaled), layer.qa("k", k).transpose(-2, -1))
    if attn_mask is not None:
        scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if m.dropout > 0.0 and m.training:
        probs = F.dropout(probs, p=m.dropout)
    context = torch.bmm(layer.qa("attn", probs), layer.qa("v", v))
    context = context.transpose(0, 1).contiguous().view(tgt_len * bsz, embed)
    out = F.linear(layer.qa("context", context), layer.qw("out_proj.weight"), m.out_proj.bias)
    return out.view(tgt_len, bsz, embed), probs
