"""A resumed search gives the answer of an uninterrupted one: the float baseline is scored
again first (re-establishing an evaluator that takes its reference from the first model it
sees), and a different score refuses the resume instead of judging trials differently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.errors import EvaluatorError
from autoquant.evaluators import Evaluator
from autoquant.jobs.journal import JOURNAL_FILE, Journal, read_journal
from tests.helpers import jobhelpers

PARTS = {"model": "m", "quant": "q", "search": "s"}
CONFIG = {"default": {"weight": {"bits": 6}, "activation": {"bits": 6}}}


class FirstModelReference(Evaluator):
    """Scores agreement with the outputs of the first model it is shown (the float one in an
    uninterrupted run), the pattern of an evaluator that caches its reference lazily."""

    def __init__(self, crash_at: int | None = None, offset: float = 0.0) -> None:
        self.inputs = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
        self.reference: torch.Tensor | None = None
        self.crash_at, self.offset, self.calls = crash_at, offset, 0

    def calibration(self, model: nn.Module) -> None:
        model(self.inputs)

    def evaluate(self, model: nn.Module) -> float:
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        self.calls += 1
        with torch.no_grad():
            out = model(self.inputs)
        if self.reference is None:
            self.reference = out
        error = (out - self.reference).norm() / self.reference.norm()
        return 1.0 - error.item() + self.offset


def search(folder: Path, evaluator: Evaluator) -> aq.SearchResult:
    journal = Journal.open(folder, PARTS, resume=(folder / JOURNAL_FILE).exists())
    return aq.auto_quantize(jobhelpers.build_model(depth=6), evaluator, (torch.ones(2, 8),),
                            max_loss=0.03, config=CONFIG, on_record=journal.append_record,
                            preloaded=journal.records)


def interrupted(folder: Path, crash_at: int) -> None:
    with pytest.raises(EvaluatorError, match="simulated crash"):
        search(folder, FirstModelReference(crash_at=crash_at))
    assert len(read_journal(folder / JOURNAL_FILE).records) == crash_at


def test_resume_after_a_crash_gives_the_uninterrupted_answer(tmp_path):
    reference = search(tmp_path / "ref", FirstModelReference())
    assert reference.num_evaluations > 3  # the crash below is mid-search
    assert any(not r.passed for r in reference.history)  # some trial fails: it can flip
    interrupted(tmp_path / "run", crash_at=3)
    fresh = FirstModelReference()
    resumed = search(tmp_path / "run", fresh)
    assert (resumed.plan, resumed.status) == (reference.plan, reference.status)
    assert [r.passed for r in resumed.history] == [r.passed for r in reference.history]
    assert resumed.checks["resume"]["same"] is True
    # the float baseline once more, then only the trials the journal lacked
    assert fresh.calls == 1 + reference.num_evaluations - 3


def test_resume_refuses_when_the_float_model_scores_differently_now(tmp_path):
    interrupted(tmp_path, crash_at=3)
    changed = FirstModelReference(offset=0.25)
    with pytest.raises(EvaluatorError, match=r"cannot resume: the float model scored 1\.0 "
                                             r"in the journal and 1\.25 now"):
        search(tmp_path, changed)
    assert changed.calls == 1  # only the re-check ran; no trial was judged
    assert len(read_journal(tmp_path / JOURNAL_FILE).records) == 3  # the journal is kept


def test_a_fresh_run_makes_no_resume_check():
    result = aq.auto_quantize(jobhelpers.build_model(depth=6), FirstModelReference(),
                              (torch.ones(2, 8),), max_loss=0.03, config=CONFIG)
    assert "resume" not in result.checks
