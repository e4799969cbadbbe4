"""Property tests (hypothesis): the quantization math and the config round-trips hold for
every input hypothesis can find, not just the hand-picked ones.

Quantization: inside the calibrated range the round-trip error is at most scale/2; scales
grow with the range and shrink with the bit width; fake-quantization is monotone; the
per-channel path along any axis equals per-tensor quantization of each slice.
Config: ``QuantConfig`` survives object -> dict -> YAML/JSON -> object unchanged.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoquant.config import QuantConfig, QuantizerConfig
from autoquant.quant.quantizer import compute_qparams, fake_quantize, qrange, weight_qparams

FAST = settings(max_examples=60, deadline=None)

bits_st = st.integers(min_value=2, max_value=16)
mag = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


def qparams(lo: float, hi: float, bits: int, symmetric: bool):
    scale, zp = compute_qparams(torch.tensor([lo]), torch.tensor([hi]), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    return scale, zp, qmin, qmax


@FAST
@given(lo=mag, hi=mag, bits=bits_st, symmetric=st.booleans(),
       fractions=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=32))
def test_round_trip_error_inside_the_range_is_at_most_half_a_step(lo, hi, bits, symmetric,
                                                                   fractions):
    lo = -lo  # the range always contains 0
    scale, zp, qmin, qmax = qparams(lo, hi, bits, symmetric)
    x = torch.tensor([lo + f * (hi - lo) for f in fractions], dtype=torch.float32)
    x = x.clamp(lo, hi)
    err = (fake_quantize(x, scale, zp, qmin, qmax) - x).abs()
    s = float(scale)
    bound = s / 2 * (1 + 1e-4) + 2e-7 * x.abs()  # float32 rounding of x / s
    assert bool((err <= bound).all()), (err.max(), s)


@FAST
@given(lo=mag, hi=mag, grow_lo=st.floats(1.0, 10.0), grow_hi=st.floats(1.0, 10.0),
       bits=st.integers(2, 15), symmetric=st.booleans())
def test_scale_grows_with_the_range_and_shrinks_with_the_bit_width(lo, hi, grow_lo, grow_hi,
                                                                   bits, symmetric):
    scale, *_ = qparams(-lo, hi, bits, symmetric)
    wider, *_ = qparams(-lo * grow_lo, hi * grow_hi, bits, symmetric)
    finer, *_ = qparams(-lo, hi, bits + 1, symmetric)
    assert float(wider) >= float(scale) * (1 - 1e-6)
    assert float(finer) < float(scale)


@FAST
@given(lo=mag, hi=mag, bits=bits_st, symmetric=st.booleans(),
       values=st.lists(st.floats(-2e3, 2e3), min_size=2, max_size=64))
def test_fake_quantize_is_monotone_and_stays_on_the_grid(lo, hi, bits, symmetric, values):
    scale, zp, qmin, qmax = qparams(-lo, hi, bits, symmetric)
    x = torch.tensor(sorted(values), dtype=torch.float32)
    out = fake_quantize(x, scale, zp, qmin, qmax)
    assert bool((out[1:] >= out[:-1]).all())
    levels = out / scale + zp.float()
    assert bool((levels.round() - levels).abs().max() < 1e-2)
    assert float(levels.min()) >= qmin - 1e-2 and float(levels.max()) <= qmax + 1e-2


@FAST
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(),
       bits=bits_st, symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_per_channel_along_any_axis_equals_per_tensor_on_each_slice(shape, data, bits,
                                                                    symmetric, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    dim = axis % x.dim()
    slices = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    scale, zp = compute_qparams(slices.min(1).values, slices.max(1).values, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    out = fake_quantize(x, scale, zp, qmin, qmax, axis=axis)
    for i in range(x.shape[dim]):
        xi = x.select(dim, i)
        expected = fake_quantize(xi, scale[i:i + 1], zp[i:i + 1], qmin, qmax)
        assert torch.equal(out.select(dim, i), expected)


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), data=st.data(),
       bits=bits_st, symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_per_channel_weight_qparams_equal_each_slices_own_qparams(shape, data, bits,
                                                                  symmetric, seed):
    axis = data.draw(st.integers(0, len(shape) - 1))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    cfg = QuantizerConfig(bits=bits, symmetric=symmetric, per_channel=True)
    scale, zp, qmin, qmax, got_axis = weight_qparams(w, bits, cfg, axis)
    assert got_axis == axis and scale.numel() == w.shape[axis]
    for i in range(w.shape[axis]):
        sl = w.select(axis, i)
        s, z = compute_qparams(sl.min().reshape(1), sl.max().reshape(1), bits, symmetric)
        assert torch.equal(scale[i:i + 1], s) and torch.equal(zp[i:i + 1], z)


# -- config round-trips ----------------------------------------------------------------------

def quantizer_dicts(partial: bool, weight: bool = False):
    algorithm = st.sampled_from(["minmax", "mse"] if weight else
                                ["minmax", "percentile", "mse", "entropy", "auto"])

    @st.composite
    def build(draw):
        per_channel = draw(st.booleans())
        full = {
            "bits": draw(bits_st),
            "symmetric": draw(st.booleans()),
            "per_channel": per_channel,
            "algorithm": "minmax" if per_channel and not weight else draw(algorithm),
            "percentile": draw(st.floats(50.001, 100.0, allow_nan=False)),
        }
        if not partial:
            return full
        keys = draw(st.lists(st.sampled_from(["bits", "symmetric"]), unique=True))
        return {k: full[k] for k in keys}
    return build()


fallback_st = st.one_of(st.just("float"), st.integers(2, 16))
layer_name = st.text(alphabet="ab.0_-", min_size=1, max_size=6) | st.sampled_from(
    ["null", "yes", "on", "1", "1.5", "~", "fc.weight"])

config_st = st.fixed_dictionaries({
    "default": st.fixed_dictionaries({"weight": quantizer_dicts(False, weight=True),
                                      "activation": quantizer_dicts(False),
                                      "fallback": fallback_st}),
    "layers": st.dictionaries(layer_name, st.fixed_dictionaries(
        {}, optional={"weight": quantizer_dicts(True, weight=True),
                      "activation": quantizer_dicts(True),
                      "fallback": fallback_st}), max_size=4),
    "skip_layers": st.lists(layer_name, max_size=3, unique=True),
    "fold_bn": st.booleans(),
})


@FAST
@given(data=config_st)
def test_config_round_trips_through_dict_yaml_json_and_files(data):
    cfg = QuantConfig.from_dict(data)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig.from_yaml(cfg.to_yaml()) == cfg
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with tempfile.TemporaryDirectory() as folder:
        for name in ("q.yaml", "q.json"):
            path = cfg.save(Path(folder) / name)
            assert QuantConfig.load(path) == cfg
            assert QuantConfig.load(path).to_dict() == cfg.to_dict()
    for name in data["layers"]:  # every resolved layer config survives as well
        assert QuantConfig.from_yaml(cfg.to_yaml()).layer_config(name) == cfg.layer_config(name)
