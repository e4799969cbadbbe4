"""Quantization math and observers against hand-computed references."""

from __future__ import annotations

import pytest
import torch

from autoquant.config import QuantizerConfig
from autoquant.quant.quantizer import (
    ActivationObserver,
    compute_qparams,
    fake_quantize,
    qrange,
    weight_qparams,
)


def formula(x, scale, zp, qmin, qmax):
    """The ONNX QuantizeLinear/DequantizeLinear formula written out: divide by the scale,
    round half to even, clamp, dequantize (torch's fake_quantize ops multiply by the
    reciprocal instead, which can differ by one step on a rounding tie)."""
    s = torch.tensor(scale, dtype=torch.float32)
    q = torch.clamp(torch.round(x / s) + zp, qmin, qmax)
    return (q - zp) * s


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_fake_quant_equals_formula(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(64, 5) * 3
    scale, zp = compute_qparams(x.min().reshape(1), x.max().reshape(1), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    out = fake_quantize(x, scale, zp, qmin, qmax)
    ref = formula(x, scale.item(), zp.item(), qmin, qmax)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # and torch's reference op with the same qparams, but for a rare one-step tie flip
    theirs = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp.item()), qmin, qmax)
    assert bool(((out - theirs).abs() <= scale.item() * 1.001).all())
    assert float((out != theirs).float().mean()) < 0.01
    # error bounded by half a step inside the range
    assert (out - x).abs().max() <= scale.item() / 2 + 1e-6


def test_fake_quant_leaves_its_input_alone_and_is_the_same_under_autograd():
    torch.manual_seed(1)
    x = torch.randn(64, 5) * 3
    kept = x.clone()
    scale, zp = compute_qparams(x.min().reshape(1), x.max().reshape(1), 8, False)
    qmin, qmax = qrange(8, False)
    fast = fake_quantize(x, scale, zp, qmin, qmax)  # the in-place path, on a new tensor
    leaf = x.clone().requires_grad_(True)
    graphed = fake_quantize(leaf, scale, zp, qmin, qmax)  # out of place: autograd sees it
    assert torch.equal(x, kept) and torch.equal(fast, graphed.detach())
    assert graphed.requires_grad
    torch.testing.assert_close(fast, formula(x, scale.item(), zp.item(), qmin, qmax),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_fake_quant_equals_formula_on_each_channel(bits, axis):
    torch.manual_seed(0)
    w = torch.randn(6, 7, 3) * torch.arange(1, 8).reshape(1, 7, 1).float()
    cfg = QuantizerConfig(bits=bits, symmetric=True, per_channel=True)
    scale, zp, qmin, qmax, ax = weight_qparams(w, bits, cfg, axis)
    assert ax == axis and scale.shape == (w.shape[axis],)
    out = fake_quantize(w, scale, zp, qmin, qmax, ax)
    for c in range(w.shape[axis]):
        chan = w.select(axis, c)
        ref = formula(chan, scale[c].item(), 0, qmin, qmax)
        torch.testing.assert_close(out.select(axis, c), ref, atol=1e-6, rtol=0)
        # symmetric per-channel min-max: the channel's largest magnitude is exact
        assert scale[c].item() == pytest.approx(chan.abs().max().item() / qmax, rel=1e-6)


def test_affine_qparams_make_zero_exact_and_cover_the_range():
    lo, hi = torch.tensor([-1.3]), torch.tensor([4.1])
    scale, zp = compute_qparams(lo, hi, 8, symmetric=False)
    assert fake_quantize(torch.zeros(3), scale, zp, 0, 255).abs().max() == 0
    ends = fake_quantize(torch.tensor([-1.3, 4.1]), scale, zp, 0, 255)
    torch.testing.assert_close(ends, torch.tensor([-1.3, 4.1]), atol=scale.item(), rtol=0)


def test_positive_only_range_still_includes_zero():
    scale, zp = compute_qparams(torch.tensor([2.0]), torch.tensor([6.0]), 8, symmetric=False)
    assert zp.item() == 0 and scale.item() == pytest.approx(6.0 / 255)


def test_constant_zero_tensor_gives_a_positive_scale():
    scale, _ = compute_qparams(torch.zeros(1), torch.zeros(1), 8, symmetric=True)
    assert scale.item() > 0
    assert torch.equal(fake_quantize(torch.zeros(4), scale, torch.zeros(1, dtype=torch.int32),
                                     -128, 127), torch.zeros(4))


def test_half_precision_input_keeps_its_dtype():
    x = torch.randn(10).half()
    scale, zp = compute_qparams(x.float().min().reshape(1), x.float().max().reshape(1), 8, False)
    assert fake_quantize(x, scale, zp, 0, 255).dtype == torch.float16


def _observe(alg, values, batches=10, **kw):
    obs = ActivationObserver(QuantizerConfig(bits=8, symmetric=False, algorithm=alg, **kw))
    for chunk in values.chunk(batches):
        obs.update(chunk)
    return obs


def test_minmax_observer_tracks_exact_extremes_over_batches():
    values = torch.linspace(-3, 7, 1000)
    obs = _observe("minmax", values[torch.randperm(1000)])
    assert obs.min_val.item() == -3 and obs.max_val.item() == 7
    scale, zp, *_ = obs.qparams(8)
    assert scale.item() == pytest.approx(10 / 255)


def test_percentile_observer_clips_at_the_configured_percentile():
    values = torch.arange(10000, dtype=torch.float32)  # uniform 0..9999, sample holds it all
    obs = _observe("percentile", values, percentile=99.0)
    lo, hi = obs.clip_range(8)
    assert hi.item() == pytest.approx(torch.quantile(values, 0.99).item(), rel=1e-4)
    assert lo.item() == pytest.approx(torch.quantile(values, 0.01).item(), abs=1.0)


def test_mse_observer_clips_outliers_and_beats_minmax_mse():
    torch.manual_seed(0)
    values = torch.randn(20000)
    values[:5] = 40.0  # a few large outliers
    mse_obs, mm_obs = _observe("mse", values), _observe("minmax", values)

    def err(obs, bits):
        s, z, qmin, qmax, _ = obs.qparams(bits)
        return torch.mean((fake_quantize(values, s, z, qmin, qmax) - values) ** 2).item()

    assert mse_obs.clip_range(4)[1].item() < 40.0
    assert err(mse_obs, 4) < err(mm_obs, 4)
    # 16 bits: clipping stops paying off, the range widens again
    assert mse_obs.clip_range(16)[1].item() >= mse_obs.clip_range(4)[1].item()


def test_observer_sample_is_bounded_and_deterministic():
    cfg = QuantizerConfig(algorithm="percentile")
    a, b = ActivationObserver(cfg, sample_size=1000), ActivationObserver(cfg, sample_size=1000)
    torch.manual_seed(1)
    data = [torch.randn(3000) for _ in range(20)]
    for x in data:
        a.update(x)
        b.update(x)
    assert a.sample.numel() == 1000 and a.seen == 60000
    assert torch.equal(a.sample, b.sample)


def test_observer_sample_weights_batches_by_size():
    obs = ActivationObserver(QuantizerConfig(algorithm="percentile"), sample_size=2000)
    obs.update(torch.zeros(1000))
    obs.update(torch.ones(9000))
    share_ones = obs.sample.mean().item()
    assert 0.85 < share_ones < 0.95  # 90% of everything seen is ones


def test_per_channel_activation_observer_uses_axis_one():
    obs = ActivationObserver(QuantizerConfig(per_channel=True, symmetric=False))
    x = torch.stack([torch.full((4, 4), float(c)) for c in range(3)], dim=0).unsqueeze(0)
    obs.update(x)  # shape (1, 3, 4, 4): channel c holds the constant c
    scale, zp, qmin, qmax, axis = obs.qparams(8)
    assert axis == 1 and scale.shape == (3,)
    torch.testing.assert_close(fake_quantize(x, scale, zp, qmin, qmax, axis), x)
