"""The LSTM language-model example: deterministic corpus, a tiny model trains and its
search meets a relative perplexity budget."""

from __future__ import annotations

import hashlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoquant as aq
from autoquant.evaluators import PerplexityEvaluator
from examples.lstm_lm.data import VOCAB, collect_docstrings, encode, load_corpus, make_batches
from examples.lstm_lm.run_search import make_config, search
from examples.lstm_lm.train import perplexity, train


def test_corpus_is_fixed_text_with_known_characters() -> None:
    corpus = load_corpus()
    assert len(corpus.train) > 250_000 and len(corpus.val) > 10_000
    assert int(corpus.train.max()) < len(VOCAB)
    assert float((corpus.train == 0).float().mean()) < 0.001  # few unknown characters
    assert encode("ab\n").tolist() == [VOCAB.index("a"), VOCAB.index("b"), 1]
    x, y = make_batches(corpus.val, 4, 16)[0]
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_corpus_is_identical_in_a_fresh_interpreter() -> None:
    code = ("import hashlib; from examples.lstm_lm.data import collect_docstrings; "
            "print(hashlib.sha256(collect_docstrings().encode()).hexdigest())")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(root),
                                                     "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == hashlib.sha256(collect_docstrings().encode()).hexdigest()


def test_corpus_does_not_depend_on_what_this_process_patched(monkeypatch) -> None:
    # libraries replace stdlib functions on import (Ray: inspect.isgenerator)
    before = collect_docstrings()
    monkeypatch.setattr(inspect, "isgenerator", lambda obj: False)
    monkeypatch.setattr(inspect, "getmembers", lambda obj: [])
    assert collect_docstrings() == before
    assert "Return true if the object is a generator." in before




@pytest.mark.slow
def test_tiny_model_learns_and_its_search_meets_the_budget() -> None:
    model = train(steps=60, batch_size=16, seq_len=32, lr=1e-2, embed=16, hidden=32)
    batches = make_batches(load_corpus().val, 16, 32, max_batches=4)
    float_ppl = perplexity(model, batches)
    assert float_ppl < 30, f"perplexity {float_ppl:.1f} after 60 steps (uniform: {len(VOCAB)})"
    evaluator = PerplexityEvaluator(batches, calibration_batches=1)
    result = search(model, evaluator, max_loss=0.05, config=make_config(lstm_mode="dynamic"))
    assert result.met and result.loss <= 0.05
    assert {r.name for r in result.sensitivity} == {"encoder", "lstm1", "lstm2", "decoder"}
    assert result.quantized_layers, "nothing stayed quantized"
    modes = {row["name"]: row["mode"] for row in result.layers}
    assert modes == {"encoder": "weight_only", "lstm1": "dynamic", "lstm2": "dynamic",
                     "decoder": "static"}
    assert isinstance(result, aq.SearchResult)
