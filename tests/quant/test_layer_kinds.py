"""Numerics of the extra layer kinds: float mode equals the original module, quantized
mode equals a hand-written fake-quant reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.evaluation.adapter import calibration_of
from autoquant.quant.kinds import QuantEmbedding, QuantMultiheadAttention, QuantRNN
from autoquant.quant.layers import QuantState
from autoquant.quant.qmodel import QuantModel
from tests.helpers.fq import fq_affine, fq_rows


class _Calib:
    def __init__(self, *inputs):
        self.inputs = inputs

    def calibration(self, model):
        model(*self.inputs)

    def evaluate(self, model):
        return 0.0


class _Wrap(nn.Module):
    """Holds one module under test as ``m`` and calls it with every input."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, *args, **kwargs):
        return self.m(*args, **kwargs)


def _quantized(module, *inputs, config=None):
    qm = QuantModel(_Wrap(module), config or aq.QuantConfig(), inputs)
    qm.calibrate(calibration_of(_Calib(*inputs)))
    qm.apply_plan(qm.quant_plan())
    return qm


# -- Embedding ----------------------------------------------------------------------------
def test_embedding_is_weight_only_per_row_and_float_mode_is_exact() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(30, 12, padding_idx=0)
    idx = torch.randint(0, 30, (4, 9))
    qm = _quantized(emb, idx)
    layer = qm.layers["m"]
    assert isinstance(layer, QuantEmbedding) and layer.config.mode == "weight_only"
    assert layer.weight_scale.shape == (30,)  # one scale per row (token)
    expected = nn.functional.embedding(idx, fq_rows(emb.weight), padding_idx=0)
    torch.testing.assert_close(qm.model(idx), expected, rtol=0, atol=1e-6)
    assert not torch.equal(qm.model(idx), emb(idx))
    qm.apply_plan(qm.float_plan())
    assert torch.equal(qm.model(idx), emb(idx))


def test_embedding_bag_is_quantized_per_row() -> None:
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(20, 6, mode="mean")
    idx, offsets = torch.randint(0, 20, (10,)), torch.tensor([0, 4])
    qm = _quantized(bag, idx, offsets)
    expected = nn.functional.embedding_bag(idx, fq_rows(bag.weight), offsets, mode="mean")
    torch.testing.assert_close(qm.model(idx, offsets), expected, rtol=0, atol=1e-6)


# -- RNNs ---------------------------------------------------------------------------------
def _lstm_reference(x, lstm, w_ih, w_hh):
    """An explicit single-layer batch-first LSTM recurrence with the given weights."""
    hidden = lstm.hidden_size
    h = torch.zeros(x.shape[0], hidden)
    c = torch.zeros(x.shape[0], hidden)
    outs = []
    for t in range(x.shape[1]):
        gates = x[:, t] @ w_ih.T + lstm.bias_ih_l0 + h @ w_hh.T + lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1)


def test_lstm_quantizes_every_gate_row_and_the_input() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, batch_first=True)
    x = torch.randn(3, 7, 6)
    qm = _quantized(lstm, x)
    layer = qm.layers["m"]
    assert isinstance(layer, QuantRNN)
    assert layer.weight_names == ("weight_ih_l0", "weight_hh_l0")
    assert layer.wscale_weight_ih_l0.shape == (4 * 5,)  # per gate, per hidden unit
    out, _ = qm.model(x)
    x_q = fq_affine(x, x.min(), x.max())
    expected = _lstm_reference(x_q, lstm, fq_rows(lstm.weight_ih_l0), fq_rows(lstm.weight_hh_l0))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    qm.apply_plan(qm.float_plan())
    torch.testing.assert_close(qm.model(x)[0], lstm(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_stacked_bidirectional_rnn_matches_a_copy_with_fake_quant_weights(kind) -> None:
    torch.manual_seed(1)
    rnn = kind(4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 4)  # (time, batch, features)
    qm = _quantized(rnn, x)
    names = qm.layers["m"].weight_names
    assert len(names) == 8 and "weight_hh_l1_reverse" in names
    reference = copy.deepcopy(rnn)
    with torch.no_grad():
        for name in names:
            getattr(reference, name).copy_(fq_rows(getattr(rnn, name)))
    expected, h_expected = reference(fq_affine(x, x.min(), x.max()))
    out, h = qm.model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if kind is nn.LSTM:
        h, h_expected = h[0], h_expected[0]
    torch.testing.assert_close(h, h_expected, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
def test_lstm_with_projection_quantizes_its_projection_weight() -> None:
    torch.manual_seed(2)
    lstm = nn.LSTM(4, 6, proj_size=3, batch_first=True)
    x = torch.randn(2, 5, 4)
    qm = _quantized(lstm, x)
    assert qm.layers["m"].weight_names == ("weight_ih_l0", "weight_hh_l0", "weight_hr_l0")
    reference = copy.deepcopy(lstm)
    with torch.no_grad():
        for name in qm.layers["m"].weight_names:
            getattr(reference, name).copy_(fq_rows(getattr(lstm, name)))
        expected = reference(fq_affine(x, x.min(), x.max()))[0]
        torch.testing.assert_close(qm.model(x)[0], expected, rtol=0, atol=1e-5)


def test_packed_sequence_input_runs_quantized() -> None:
    torch.manual_seed(2)
    lstm = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    qm = _quantized(lstm, packed)
    out, _ = qm.model(packed)
    reference = copy.deepcopy(lstm)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0"):
            getattr(reference, name).copy_(fq_rows(getattr(lstm, name)))
    data = packed.data
    expected, _ = reference(packed._replace(data=fq_affine(data, data.min(), data.max())))
    torch.testing.assert_close(out.data, expected.data, rtol=0, atol=1e-5)


# -- attention ----------------------------------------------------------------------------
MHA_CASES = [
    ({"batch_first": True}, {}),
    ({"batch_first": False}, {"need_weights": False}),
    ({"batch_first": True, "bias": False}, {"average_attn_weights": False}),
    ({"batch_first": True, "add_bias_kv": True, "add_zero_attn": True}, {}),
    ({"batch_first": True, "kdim": 5, "vdim": 3}, {}),
    ({"batch_first": True}, {"key_padding_mask": True, "attn_mask": True}),
    ({"batch_first": True}, {"is_causal": True, "attn_mask": True}),
]


@pytest.mark.parametrize(("options", "call"), MHA_CASES)
@pytest.mark.parametrize("grad", [False, True])
def test_mha_reimplementation_equals_torch_in_float(options, call, grad) -> None:
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, **options).eval()
    batch, tgt, src = 3, 4, 6
    shape = (lambda n, d: (batch, n, d)) if options.get("batch_first") else (
        lambda n, d: (n, batch, d))
    query = torch.randn(*shape(tgt, 8))
    key = torch.randn(*shape(src, options.get("kdim", 8)))
    value = torch.randn(*shape(src, options.get("vdim", 8)))
    kwargs = dict(call)
    if kwargs.get("key_padding_mask"):
        mask = torch.zeros(batch, src, dtype=torch.bool)
        mask[0, -2:] = True
        kwargs["key_padding_mask"] = mask
    if kwargs.get("attn_mask"):
        kwargs["attn_mask"] = torch.triu(torch.ones(tgt, src, dtype=torch.bool), 1)
    layer = QuantMultiheadAttention(mha, "m", aq.LayerConfig(), 0)
    layer.state = QuantState.CALIBRATE  # runs the re-implementation, nothing quantized
    with torch.set_grad_enabled(grad):
        expected = mha(query, key, value, **kwargs)
        got = layer(query, key, value, **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-5)


def test_mha_unbatched_input_equals_torch() -> None:
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(8, 4).eval()
    x = torch.randn(5, 8)
    layer = QuantMultiheadAttention(mha, "m", aq.LayerConfig(), 0)
    layer.state = QuantState.CALIBRATE
    torch.testing.assert_close(layer(x, x, x)[0], mha(x, x, x)[0], rtol=0, atol=1e-5)


def _mha_reference(x, mha, quant):
    """Self-attention by hand, batch first, with fake quantization at every point."""
    observed: dict[str, tuple[float, float]] = {}

    def point(name, t):
        if quant is None:
            observed[name] = (float(t.min()), float(t.max()))
            return t
        return fq_affine(t, *quant[name])

    b, n, e = x.shape
    heads, hd = mha.num_heads, e // mha.num_heads
    w_in = fq_rows(mha.in_proj_weight) if quant else mha.in_proj_weight
    w_out = fq_rows(mha.out_proj.weight) if quant else mha.out_proj.weight
    x_in = point("query", x)
    qkv = x_in @ w_in.T + mha.in_proj_bias
    q, k, v = (t.reshape(b, n, heads, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = point("q", q / hd**0.5) @ point("k", k).transpose(-1, -2)
    probs = scores.softmax(-1)
    context = (point("attn", probs) @ point("v", v)).transpose(1, 2).reshape(b, n, e)
    out = point("context", context) @ w_out.T + mha.out_proj.bias
    return out, observed


def test_mha_quantizes_projections_and_both_matmuls() -> None:
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    qm = QuantModel(SelfAttention(), aq.QuantConfig(), (x,))
    qm.calibrate(calibration_of(_Calib(x)))
    qm.apply_plan(qm.quant_plan())
    assert isinstance(qm.layers["attn"], QuantMultiheadAttention)
    with torch.no_grad():
        float_out, ranges = _mha_reference(x, mha, None)
        expected, _ = _mha_reference(x, mha, ranges)
        got = qm.model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - float_out).abs().max() > 1e-4  # quantization did something


def test_quant_matmul_fake_quantizes_both_operands() -> None:
    torch.manual_seed(6)
    a, b = torch.randn(2, 4, 5), torch.randn(2, 5, 3) * 4
    qm = _quantized(aq.QuantMatMul(), a, b)
    expected = fq_affine(a, a.min(), a.max()) @ fq_affine(b, b.min(), b.max())
    torch.testing.assert_close(qm.model(a, b), expected, rtol=0, atol=1e-5)
    qm.apply_plan(qm.float_plan())
    assert torch.equal(qm.model(a, b), a @ b)
    assert torch.equal(aq.QuantMatMul()(a, b), torch.matmul(a, b))


def test_new_kinds_are_named_units_in_ranking_and_round_trip_through_save(tmp_path) -> None:
    torch.manual_seed(7)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mix = aq.QuantMatMul()
            self.head = nn.Linear(8, 20)

        def forward(self, idx):
            h = self.rnn(self.emb(idx))[0]
            h = self.attn(h, h, h)[0]
            return self.head(self.mix(h, h.transpose(1, 2)).softmax(-1) @ h)

    model = Tiny().eval()
    idx = torch.randint(0, 20, (4, 6))

    class Eval(_Calib):
        def evaluate(self, m):
            return float(m(idx).argmax(-1).eq(model(idx).argmax(-1)).float().mean())

    result = aq.auto_quantize(model, Eval(idx), (idx,), max_loss=1.0)
    assert {r.name for r in result.sensitivity} == {"emb", "rnn", "attn", "mix", "head"}
    assert result.met and set(result.quantized_layers) == {"emb", "rnn", "attn", "mix", "head"}
    result.save(tmp_path)
    loaded = aq.load_quantized(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), result.model(idx), rtol=0, atol=0)


def test_transformer_encoder_layer_fast_path_does_not_bypass_the_wrappers() -> None:
    torch.manual_seed(8)
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True,
                                       dropout=0.0).eval()
    x = torch.randn(3, 5, 8)
    qm = _quantized(model, x)
    assert {"m.self_attn", "m.linear1", "m.linear2"} <= set(qm.layers)
    with torch.no_grad():  # where torch would take its fused fast path
        fast = qm.model(x)
        reference = model(x)
    slow = qm.model(x)  # grad enabled: always the module-by-module path
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-6)
    assert (fast - reference).abs().max() > 1e-4


def test_transformer_encoder_with_a_padding_mask_runs_its_quantized_attention() -> None:
    # torch packs a padded batch into a nested tensor before the layers (the encoder's own
    # fast path), which the quantized attention cannot read; the copy computes it padded
    torch.manual_seed(8)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()
    x, pad = torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    qm = QuantModel(model, aq.QuantConfig())
    with torch.no_grad():  # where torch would pack the batch
        qm.calibrate(lambda m, _where: m(x, src_key_padding_mask=pad))
    assert model.use_nested_tensor and not qm.model.use_nested_tensor
    with qm.state(QuantState.FLOAT), torch.no_grad():
        out = qm.model(x, src_key_padding_mask=pad)
        reference = model(x, src_key_padding_mask=pad)
    keep = ~pad  # torch zeroes the padded positions; every other one is the same
    torch.testing.assert_close(out[keep], reference[keep], rtol=1e-5, atol=1e-5)


def test_a_module_with_a_weight_of_an_unknown_kind_is_named_in_a_warning(caplog) -> None:
    class Scaled(nn.Module):  # a matrix product autoquant cannot know of
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    # a LayerNorm over two dimensions has a 2-D weight, and is no matrix product either
    model = nn.Sequential(nn.Linear(4, 4), Scaled(), nn.Unflatten(1, (1, 4)),
                          nn.LayerNorm([1, 4]), nn.Flatten()).eval()
    with caplog.at_level("WARNING", logger="autoquant"):
        qm = QuantModel(model, aq.QuantConfig())
    assert list(qm.layers) == ["0"]
    warned = [r.getMessage() for r in caplog.records if "no quantizable kind" in r.getMessage()]
    assert len(warned) == 1 and "1 Scaled module(s)" in warned[0] and "(1)" in warned[0]
    assert "register_layer_kind(Scaled" in warned[0] and "LayerNorm" not in warned[0]


class _PlainAttention(nn.Module):
    """Attention written with ``@`` and ``torch.matmul``, plus a matmul with a weight."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.mix_weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return torch.matmul(attn, v) @ self.mix_weight.T


def test_convert_matmuls_turns_activation_matmuls_into_units() -> None:
    torch.manual_seed(9)
    model = _PlainAttention().eval()
    x = torch.randn(2, 5, 8)
    traced = aq.convert_matmuls(model)
    units = [n for n, m in traced.named_modules() if isinstance(m, aq.QuantMatMul)]
    assert units == ["matmul_0", "matmul_1"]  # the weight matmul is left alone
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    qm = _quantized(traced, x)
    assert {"m.matmul_0", "m.matmul_1", "m.qkv"} <= set(qm.layers)


def test_convert_matmuls_on_an_untraceable_model_is_a_model_error() -> None:
    class Branchy(nn.Module):
        def forward(self, x):
            return x @ x.T if x.sum() > 0 else x

    with pytest.raises(aq.ModelError, match="QuantMatMul"):
        aq.convert_matmuls(Branchy())
