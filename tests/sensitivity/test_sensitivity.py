"""The cosine sensitivity accumulator against torch's reference and its edge cases."""

from __future__ import annotations

import pytest
import torch

from autoquant.sensitivity.ranking import CosineSimilarity


def test_cosine_matches_float64_reference_to_the_precision_of_one_minus_cos():
    torch.manual_seed(0)
    metric, refs = CosineSimilarity(), []
    for noise in (1e-4, 1e-3, 1e-1):
        a = torch.randn(4, 4096)
        b = a + noise * torch.randn(4, 4096)
        refs.append(float(torch.nn.functional.cosine_similarity(
            a.reshape(-1).double(), b.reshape(-1).double(), dim=0)))
        metric.update(a, b)  # may consume b
    expected = sum(refs) / len(refs)
    assert 1 - metric.score() == pytest.approx(1 - expected, rel=1e-4)


def test_cosine_edge_cases_zero_outputs_and_no_calls():
    assert CosineSimilarity().score() == 1.0
    metric = CosineSimilarity()
    metric.update(torch.zeros(5), torch.zeros(5))  # identical
    metric.update(torch.zeros(5), torch.ones(5))   # one side zero: no similarity
    assert metric.score() == pytest.approx(0.5)


def test_cosine_ranks_a_noisier_output_lower():
    torch.manual_seed(1)
    a = torch.randn(1000)
    small, large = CosineSimilarity(), CosineSimilarity()
    small.update(a, a + 0.01 * torch.randn(1000))
    large.update(a, a + 0.1 * torch.randn(1000))
    assert large.score() < small.score() < 1.0
