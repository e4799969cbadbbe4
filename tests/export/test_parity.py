"""The parity check's noise floor: a deep quantized model amplifies ulp-level float
differences into rounding flips, and the runtime is held to what the model itself holds."""

from __future__ import annotations

import torch
from torch import nn

import autoquant as aq
from autoquant.export.runtime import noise_floor, parity_ok
from autoquant.quant.layers import QuantLayer


def _deep_model_and_data() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(12):
        blocks += [nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU()]
    return nn.Sequential(*blocks).eval(), [torch.randn(128, 128) for _ in range(2)]


def test_the_noise_floor_is_what_a_tiny_input_perturbation_moves_the_quantized_model() -> None:
    model, batches = _deep_model_and_data()
    q = aq.quantize(model, calibration_data=batches)
    before = [q(b) for b in batches]
    floor = noise_floor(q, batches)
    assert 0.0 < floor < 0.05  # rounding flips, far below the quantization error
    assert noise_floor(q, batches) == floor  # seeded: the same figure every time
    for b, out in zip(batches, before, strict=True):  # its hooks are gone
        torch.testing.assert_close(q(b), out, rtol=0, atol=0)
    assert all(len(m._forward_pre_hooks) == 1 for m in q.modules()  # its own no_fast_path
               if isinstance(m, QuantLayer))
    with torch.no_grad():  # a float model has no rounding to flip
        assert noise_floor(model, batches) == 0.0


def test_parity_accepts_a_runtime_within_the_noise_floor_and_nothing_beyond_it() -> None:
    chaotic = {"relative_error": 0.03, "quantization_error": 0.12}
    assert not parity_ok(chaotic)
    assert parity_ok({**chaotic, "noise_floor": 0.04})
    assert not parity_ok({**chaotic, "noise_floor": 0.02})
