"""The run journal: durable records, torn last lines, fingerprints, zero-repeat resume."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

import autoquant as aq
from autoquant.errors import ConfigError
from autoquant.jobs.journal import (
    JOURNAL_FILE,
    Journal,
    JournalMismatchError,
    fingerprint,
    read_journal,
)
from autoquant.search.strategy import TrialRecord
from autoquant.sensitivity.ranking import LayerSensitivity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
import jobhelpers  # noqa: E402

PARTS = {"model": "m1", "quant": "q1", "search": "s1"}
CONFIG = {"default": {"weight": {"bits": 6}, "activation": {"bits": 6}}}


def record(i: int, passed: bool = True) -> TrialRecord:
    return TrialRecord(index=i, label=f"t{i}", plan={"a": "w8a8", "b": "float"},
                       fallback_layers=["b"], metric=0.9 - i / 100, loss=i / 100,
                       passed=passed, seconds=0.5)


def test_records_and_ranking_survive_a_reopen_with_resume(tmp_path):
    journal = Journal.open(tmp_path, PARTS, resume=False)
    ranking = [LayerSensitivity("b", 0.9, 0, 3), LayerSensitivity("a", 0.99, 1, 3)]
    journal.append_ranking(ranking)
    journal.append_record(record(0))
    journal.append_record(record(1, passed=False))
    again = Journal.open(tmp_path, PARTS, resume=True)
    assert again.records == [record(0), record(1, passed=False)]
    assert again.ranking == ranking
    lines = (tmp_path / JOURNAL_FILE).read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["header", "ranking", "trial", "trial"]


def test_torn_last_line_is_dropped_with_a_warning_and_appends_stay_valid(tmp_path, caplog):
    journal = Journal.open(tmp_path, PARTS, resume=False)
    journal.append_record(record(0))
    path = tmp_path / JOURNAL_FILE
    full = json.dumps({"type": "trial", "record": record(1).to_dict()})
    with open(path, "ab") as handle:  # what a kill -9 in the middle of a write leaves
        handle.write(full[: len(full) // 2].encode())
    with caplog.at_level(logging.WARNING, logger="autoquant.jobs.journal"):
        again = Journal.open(tmp_path, PARTS, resume=True)
    assert "torn" in caplog.text
    assert again.records == [record(0)]
    again.append_record(record(1))
    assert read_journal(path).records == [record(0), record(1)]
    assert not read_journal(path).torn


def test_torn_header_only_journal_starts_over(tmp_path):
    (tmp_path / JOURNAL_FILE).write_text('{"type": "hea')
    journal = Journal.open(tmp_path, PARTS, resume=True)
    assert journal.records == [] and journal.ranking is None
    assert read_journal(tmp_path / JOURNAL_FILE).header["fingerprint"] == PARTS


def test_corrupt_line_before_the_last_is_an_error(tmp_path):
    journal = Journal.open(tmp_path, PARTS, resume=False)
    journal.append_record(record(0))
    path = tmp_path / JOURNAL_FILE
    lines = path.read_text().splitlines()
    lines.insert(1, "garbage{")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="line 2 is corrupt"):
        Journal.open(tmp_path, PARTS, resume=True)


@pytest.mark.parametrize("part, words", [("model", "model weights"),
                                         ("quant", "quant config"),
                                         ("search", "search settings")])
def test_fingerprint_mismatch_is_an_error_naming_what_changed(tmp_path, part, words):
    Journal.open(tmp_path, PARTS, resume=False).append_record(record(0))
    changed = {**PARTS, part: "other"}
    with pytest.raises(JournalMismatchError, match=words):
        Journal.open(tmp_path, changed, resume=True)


def test_existing_journal_without_resume_or_overwrite_is_refused(tmp_path):
    Journal.open(tmp_path, PARTS, resume=False)
    with pytest.raises(ConfigError, match="--resume"):
        Journal.open(tmp_path, PARTS, resume=False)
    fresh = Journal.open(tmp_path, {**PARTS, "model": "new"}, resume=False, overwrite=True)
    assert fresh.records == []


def test_fingerprint_changes_with_one_weight_and_not_with_the_budget():
    model = jobhelpers.build_model()
    base = fingerprint(model, CONFIG, {"max_loss": 0.03})
    assert fingerprint(jobhelpers.build_model(), CONFIG, {"max_loss": 0.03}) == base
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    assert fingerprint(model, CONFIG, {"max_loss": 0.03})["model"] != base["model"]
    assert fingerprint(model, CONFIG, {"max_loss": 0.02})["search"] != base["search"]


def _search(tmp_path: Path, journal: Journal, log: Path, budget: int | None = None):
    evaluator = jobhelpers.TinyEvaluator(depth=6, log=str(log))
    return aq.auto_quantize(
        jobhelpers.build_model(depth=6), evaluator, (torch.ones(2, 8),), max_loss=0.03,
        config=CONFIG, max_evaluations=budget, on_record=journal.append_record,
        preloaded=journal.records, ranking=journal.ranking,
        progress=lambda stage, event, **info: journal.append_ranking(info["ranking"])
        if (stage, event) == ("sensitivity", "end") and not info["reused"] else None)


def test_resume_after_a_partial_run_repeats_no_evaluation_and_finds_the_same_plan(tmp_path):
    full_log, part_log = tmp_path / "full.log", tmp_path / "part.log"
    reference = _search(tmp_path / "a", Journal.open(tmp_path / "a", PARTS, resume=False),
                        full_log)
    assert reference.num_evaluations >= 4
    # The budget stops the first run part-way, as a kill would; then resume without it.
    partial = _search(tmp_path, Journal.open(tmp_path, PARTS, resume=False), part_log, budget=3)
    assert partial.status == "budget_exhausted"
    journal = Journal.open(tmp_path, PARTS, resume=True)
    assert len(journal.records) == 3 and journal.ranking is not None
    before = len(jobhelpers.read_log(part_log))
    resumed = _search(tmp_path, journal, part_log)
    entries = jobhelpers.read_log(part_log)
    entries = entries[:before] + jobhelpers.without_resume_check(entries[before:])
    seen = [json.dumps(e["plan"], sort_keys=True) for e in entries]
    assert len(seen) == len(set(seen)) == reference.num_evaluations  # zero repeats
    assert resumed.plan == reference.plan and resumed.status == reference.status
    assert [r.metric for r in resumed.history] == [r.metric for r in reference.history]
    assert [r.name for r in resumed.sensitivity] == [r.name for r in reference.sensitivity]


class _OddState(torch.nn.Module):
    """A layer with a sparse buffer and a non-tensor extra state whose ``repr`` changes
    from one instance (and one process) to the next: an object address, a set order."""

    def __init__(self, members: list[int]) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3))
            self.fc.bias.zero_()
        self.register_buffer("sparse", torch.eye(3).to_sparse())
        self.members = members

    def get_extra_state(self) -> dict:
        return {"cache": object(), "members": set(self.members), "scale": torch.ones(2)}

    def set_extra_state(self, state: dict) -> None:
        pass


def test_fingerprint_hashes_sparse_buffers_and_is_stable_for_a_dict_extra_state():
    from autoquant.jobs.journal import hash_state_dict

    # 1 and 9 share a slot of a small set's table: insertion order decides the repr
    first, second = _OddState([1, 9]), _OddState([9, 1])
    assert repr(first.get_extra_state()) != repr(second.get_extra_state())
    assert hash_state_dict(first) == hash_state_dict(second)
    with torch.no_grad():
        second.sparse.values()[0] += 1  # a sparse buffer's values are part of the hash
    assert hash_state_dict(first) != hash_state_dict(second)
    changed = _OddState([1, 9, 2])
    assert hash_state_dict(changed) != hash_state_dict(first)


def test_resume_accepts_the_journal_of_a_model_with_odd_state(tmp_path):
    parts = fingerprint(_OddState([1, 9]), CONFIG, {"max_loss": 0.03})
    Journal.open(tmp_path, parts, resume=False).append_record(record(0))
    again = fingerprint(_OddState([9, 1]), CONFIG, {"max_loss": 0.03})
    assert Journal.open(tmp_path, again, resume=True).records == [record(0)]


@pytest.mark.parametrize("field, value, words", [
    ("passed", "false", "passed must be true or false"),
    ("passed", 0, "passed must be true or false"),
    ("metric", float("nan"), "metric must be a finite number"),
    ("loss", float("inf"), "loss must be a finite number"),
    ("metric", "0.9", "metric must be a finite number"),
    ("index", -1, "index must be an integer >= 0"),
    ("seconds", -2.0, "seconds must be a number >= 0"),
    ("plan", {"a": "int8", "b": "float"}, "unknown scheme 'int8'"),
    ("plan", {"a": "w8a8"}, "fallback_layers must be a list of layer names of the plan"),
    ("fallback_layers", "b", "fallback_layers must be a list"),
    ("label", None, "label must be a string"),
])
def test_a_tampered_trial_record_is_an_error_naming_the_line_and_the_field(
        tmp_path, field, value, words):
    journal = Journal.open(tmp_path, PARTS, resume=False)
    journal.append_record(record(0))
    journal.append_record(record(1))
    path = tmp_path / JOURNAL_FILE
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["record"][field] = value
    lines[1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"line 2 is not a valid trial entry .*{words}"):
        Journal.open(tmp_path, PARTS, resume=True)


@pytest.mark.parametrize("line, words", [
    ('{"type": "ranking", "ranking": [{"name": "a", "score": "high", "rank": 0, "calls": 1}]}',
     r"ranking\[0\]\.score must be a number"),
    ('{"type": "header", "version": 1, "fingerprint": {}}', "a second header"),
    ('{"type": "trail", "record": {}}', "unknown entry type 'trail'"),
    pytest.param('[' * 100_000 + ']' * 100_000, "line 2 is corrupt", id="deep-brackets"),
])
def test_a_bad_ranking_header_or_unknown_line_is_an_error_naming_the_line(
        tmp_path, line, words):
    Journal.open(tmp_path, PARTS, resume=False)
    with open(tmp_path / JOURNAL_FILE, "a", encoding="utf-8") as handle:
        handle.write(line + "\n" + json.dumps({"type": "trial", "record": record(0).to_dict()})
                     + "\n")
    with pytest.raises(ConfigError, match=words):
        Journal.open(tmp_path, PARTS, resume=True)
