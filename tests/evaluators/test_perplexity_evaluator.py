"""PerplexityEvaluator: exp(mean cross-entropy), lower is better."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.evaluators import PerplexityEvaluator


class Uniform(nn.Module):
    """Predicts the same logits everywhere; returns (logits, None) like an RNN LM."""

    def __init__(self, vocab: int):
        super().__init__()
        self.proj = nn.Linear(1, vocab)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.calls = 0

    def forward(self, idx):
        self.calls += 1
        return self.proj(idx.unsqueeze(-1).float()), None


def _batches(n=3, vocab=7):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (2, 5), generator=g),
             torch.randint(0, vocab, (2, 5), generator=g)) for _ in range(n)]


def test_uniform_model_has_perplexity_equal_to_vocab_size() -> None:
    evaluator = PerplexityEvaluator(_batches(), calibration_batches=2)
    assert evaluator.higher_is_better is False
    assert evaluator.evaluate(Uniform(7)) == pytest.approx(7.0)


def test_perplexity_matches_explicit_cross_entropy_and_ignores_padding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 7))
    batches = _batches()
    batches[0][1][0, :2] = -100
    total, count = 0.0, 0
    for x, y in batches:
        logp = model(x).detach().log_softmax(-1)
        for b in range(y.shape[0]):
            for t in range(y.shape[1]):
                if y[b, t] != -100:
                    total -= float(logp[b, t, y[b, t]])
                    count += 1
    got = PerplexityEvaluator(batches).evaluate(model)
    assert got == pytest.approx(math.exp(total / count), rel=1e-6)


def test_calibration_runs_only_the_first_batches() -> None:
    model = Uniform(7)
    PerplexityEvaluator(_batches(5), calibration_batches=2).calibration(model)
    assert model.calls == 2


@pytest.mark.parametrize("kwargs", [{"loader": iter([])}, {"loader": [], "calibration_batches": 0},
                                    {"loader": [], "ignore_index": "x"}])
def test_bad_arguments_are_config_errors(kwargs) -> None:
    with pytest.raises(aq.ConfigError):
        PerplexityEvaluator(**kwargs)


def test_mismatched_logits_and_targets_are_a_model_error() -> None:
    batches = [(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))]
    with pytest.raises(aq.ModelError, match="positions"):
        PerplexityEvaluator(batches).evaluate(Uniform(3))


def test_relative_loss_budget_reads_lower_as_better() -> None:
    crit = aq.AccuracyCriterion(0.02, "relative", higher_is_better=False)
    assert crit.check(10.0, 10.1)[0] and not crit.check(10.0, 10.3)[0]
