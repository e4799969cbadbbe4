"""Shared modules: one object under several names or called several times is one unit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.evaluation.adapter import calibration_of
from autoquant.quant.qmodel import QuantModel, find_quantizable_layers
from autoquant.quant.shared import module_aliases
from tests.helpers.fq import fq_affine, fq_rows


class _Eval:
    def __init__(self, x, reference):
        self.x, self.reference = x, reference

    def calibration(self, model):
        model(self.x)

    def evaluate(self, model):
        return float(-(model(self.x) - self.reference).abs().mean())


class Reused(nn.Module):
    """One Linear applied twice in the forward pass, plus an alias of it."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(5, 5)
        self.again = self.block  # the same object under a second name
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.relu(self.again(torch.relu(self.block(x)))))


def test_aliases_are_found_and_listed_once() -> None:
    lin = nn.Linear(3, 3)
    seq = nn.Sequential(lin, nn.ReLU(), lin, nn.Sequential(lin))
    assert module_aliases(seq) == {"0": ["2", "3.0"]}
    assert find_quantizable_layers(seq) == ["0"]
    assert find_quantizable_layers(Reused()) == ["block", "head"]


def test_shared_module_gets_one_wrapper_one_scheme_and_call_counts() -> None:
    torch.manual_seed(0)
    model = Reused().eval()
    x = torch.randn(6, 5)
    qm = QuantModel(model, aq.QuantConfig(), (x,))
    assert qm.model.block is qm.model.again is qm.layers["block"]
    assert qm.aliases == {"block": ["again"]}
    qm.calibrate(calibration_of(_Eval(x, model(x))))
    assert qm.calls_per_forward == {"block": 2.0, "head": 1.0}
    qm.apply_plan(qm.quant_plan())
    # the reference: one fake-quant weight, one input range calibrated over both calls
    lin = model.block
    h1 = torch.relu(lin(x))
    lo, hi = min(x.min(), h1.min()), max(x.max(), h1.max())
    w_q = fq_rows(lin.weight)
    h = torch.relu(fq_affine(x, lo, hi) @ w_q.T + lin.bias)
    h = torch.relu(fq_affine(h, lo, hi) @ w_q.T + lin.bias)
    h_ = torch.relu(lin(torch.relu(lin(x))))
    expected = fq_affine(h, h_.min(), h_.max()) @ fq_rows(model.head.weight).T + model.head.bias
    torch.testing.assert_close(qm.model(x), expected, rtol=0, atol=1e-5)
    rows = {r["name"]: r for r in qm.layer_rows()}
    assert rows["block"]["aliases"] == ["again"] and rows["block"]["calls_per_forward"] == 2.0


def test_search_names_a_shared_module_once_with_its_aliases() -> None:
    torch.manual_seed(1)
    model = Reused().eval()
    x = torch.randn(16, 5)
    result = aq.auto_quantize(model, _Eval(x, model(x)), (x,), max_loss=10.0)
    assert [r.name for r in result.sensitivity].count("block") == 1
    assert next(r for r in result.sensitivity if r.name == "block").aliases == ("again",)
    assert set(result.plan) == {"block", "head"}
    table = {row["name"]: row for row in result.to_report()["layers"]}
    assert table["block"]["aliases"] == ["again"]
    assert table["block"]["calls_per_forward"] == 2.0


def test_float_fallback_unwraps_every_alias() -> None:
    model = Reused().eval()
    x = torch.randn(4, 5)
    qm = QuantModel(model, aq.QuantConfig(), (x,))
    qm.calibrate(calibration_of(_Eval(x, model(x))))
    out = qm.finalize({"block": "float", "head": "w8a8"})
    assert type(out.block) is nn.Linear and out.block is out.again


def test_config_naming_an_alias_points_to_the_canonical_name() -> None:
    cfg = aq.QuantConfig.from_dict({"layers": {"again": {"weight": {"bits": 4}}}})
    with pytest.raises(aq.ConfigError, match="'again'.*same module object as 'block'"):
        QuantModel(Reused(), cfg)


def test_tied_embedding_and_decoder_are_reported_as_sharing_a_parameter() -> None:
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.dec = nn.Linear(4, 10)
            self.dec.weight = self.emb.weight

        def forward(self, idx):
            return self.dec(self.emb(idx))

    idx = torch.randint(0, 10, (3, 5))
    qm = QuantModel(TiedLM(), aq.QuantConfig(), (idx,))
    assert qm.tied == {"emb": ["dec"], "dec": ["emb"]}
    rows = {r["name"]: r["shares_parameters_with"] for r in qm.layer_rows()}
    assert rows == {"emb": ["dec"], "dec": ["emb"]}


class TiedHead(nn.Module):
    """A head that reads the embedding table directly, as tied language models do."""

    def __init__(self, direct: bool) -> None:
        super().__init__()
        self.direct = direct
        self.embed, self.mix = nn.Embedding(50, 8), nn.Linear(8, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(tokens)))
        weight = self.embed.weight
        return h @ weight.T if self.direct else h * weight.shape[1]


@pytest.mark.parametrize("direct", [True, False])
def test_a_product_with_a_layers_own_weight_outside_its_forward_is_named(direct, caplog):
    tokens = torch.randint(0, 50, (2, 5))
    with caplog.at_level("WARNING", logger="autoquant.quant.dataflow"):
        QuantModel(TiedHead(direct).eval(), aq.QuantConfig(), (tokens,))
    warned = [r.getMessage() for r in caplog.records
              if "outside its forward" in r.getMessage()]
    if direct:  # the product runs float: say so, with the fix
        assert len(warned) == 1 and "layer 'embed'" in warned[0] and "by matmul" in warned[0]
        assert "nn.Linear whose weight is the same Parameter" in warned[0]
    else:  # reading its shape is no computation
        assert warned == []


class FusedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_scaled_dot_product_attention_is_named_as_running_its_products_float(caplog):
    with caplog.at_level("WARNING", logger="autoquant.quant.dataflow"):
        QuantModel(FusedAttention().eval(), aq.QuantConfig(), (torch.randn(2, 5, 8),))
    warned = [r.getMessage() for r in caplog.records if "scaled_dot_product" in r.getMessage()]
    assert len(warned) == 1 and "1 time(s)" in warned[0] and "aq.QuantMatMul" in warned[0]
