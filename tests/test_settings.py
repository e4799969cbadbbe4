"""`SearchSettings`: one typed object, validated once, for the API, the job file, the journal
fingerprint, the result and the report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant.errors import ConfigError
from autoquant.settings import SearchSettings, SettingError
from autoquant.strategies.binary import BinarySearchStrategy


def test_settings_round_trip_through_their_mapping_form() -> None:
    settings = SearchSettings(max_loss=0.02, loss_type="relative", strategy="binary",
                              strategy_options={"refine": 2}, max_evaluations=9, workers=1)
    assert SearchSettings.from_dict(settings.to_dict()) == settings
    assert settings.to_dict()["strategy_options"] == {"refine": 2}


@pytest.mark.parametrize("data,pattern", [
    ({"max_los": 0.1}, r"unknown search setting 'max_los' \(did you mean 'max_loss'\?\)"),
    ({"strategy": "binar"}, r"strategy names an unknown strategy 'binar'.*'binary'"),
    ({"strategy_options": {"refin": 1}},
     r"strategy_options.refin is not an option of BinarySearchStrategy \(did you mean "
     r"'refine'\?\); its options: refine, verify"),
    ({"max_evaluations": 1}, r"max_evaluations must be an int >= 2"),
    ({"eval_timeout": 0}, r"eval_timeout must be a number of seconds > 0"),
    ({"max_seconds": "1h"}, r"max_seconds must be a number of seconds"),
    ({"max_loss": True}, r"max_loss must be an integer or a number, got bool"),
    ({"workers": 0}, r"workers must be an int >= 1"),
    ({"sensitivity": "cosin"}, r"sensitivity names an unknown sensitivity metric 'cosin'"),
    ({"holdout": "yes"}, r"holdout must be None, True or False"),
])
def test_bad_settings_name_the_key_and_the_fix(data, pattern) -> None:
    with pytest.raises(SettingError, match=pattern) as info:
        SearchSettings.from_dict(data)
    assert isinstance(info.value, ConfigError)
    assert info.value.key.split(".")[0] in data


def test_the_fingerprint_leaves_out_budgets_guards_and_checks() -> None:
    plain = SearchSettings(max_loss=0.01)
    guarded = plain.replace(max_evaluations=5, eval_timeout=3, max_seconds=60, workers=2,
                            audit=2, holdout=False, check_determinism=True)
    assert guarded.fingerprint() == plain.fingerprint()
    assert plain.replace(max_loss=0.02).fingerprint() != plain.fingerprint()
    assert plain.replace(verify_deploy=True).fingerprint() != plain.fingerprint()
    with pytest.raises(SettingError, match="unknown search setting 'max_lost'"):
        plain.replace(max_lost=1)


def test_auto_quantize_takes_settings_keyword_overrides_or_both() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    evaluator = aq.FidelityEvaluator(model, [torch.randn(8, 4)])
    base = SearchSettings(max_loss=0.5, max_evaluations=6)
    by_object = aq.auto_quantize(model, evaluator, settings=base)
    by_keywords = aq.auto_quantize(model, evaluator, max_loss=0.5, max_evaluations=6)
    both = aq.auto_quantize(model, evaluator, settings=base, max_evaluations=7)
    assert by_object.settings == base == by_keywords.settings
    assert both.settings.max_evaluations == 7 and both.settings.max_loss == 0.5
    assert by_object.plan == by_keywords.plan
    report = by_object.to_report()["settings"]
    assert report["max_loss"] == 0.5 and report["strategy"] == "binary"
    with pytest.raises(ConfigError, match="unknown search setting 'max_lose'"):
        aq.auto_quantize(model, evaluator, max_lose=0.5)


def test_a_strategy_class_or_instance_is_named_in_the_mapping_form() -> None:
    settings = SearchSettings(strategy=BinarySearchStrategy, strategy_options={"refine": 1})
    assert settings.to_dict()["strategy"] == "binary"
    assert isinstance(settings.make_strategy(), BinarySearchStrategy)
    with pytest.raises(SettingError, match="strategy_options must be empty"):
        SearchSettings(strategy=BinarySearchStrategy(), strategy_options={"refine": 1})
