"""QuantConfig: defaults, overrides, validation and YAML/JSON round-trips."""

from __future__ import annotations

import json

import pytest

from autoquant import ConfigError, QuantConfig
from autoquant.evaluation.criterion import AccuracyCriterion


def test_partial_overrides_merge_over_role_defaults():
    cfg = QuantConfig.from_dict({
        "default": {"activation": {"algorithm": "percentile", "percentile": 99.9}},
        "layers": {"fc": {"weight": {"bits": 4}, "fallback": 16}},
    })
    fc = cfg.layer_config("fc")
    assert fc.weight.bits == 4 and fc.weight.per_channel and fc.weight.symmetric
    assert fc.activation.algorithm == "percentile" and not fc.activation.symmetric
    assert fc.scheme == "w4a8" and fc.fallback_scheme == "w16a16"
    assert cfg.layer_config("other").scheme == "w8a8"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trips_through_files(tmp_path, suffix):
    cfg = QuantConfig.from_dict({
        "default": {"weight": {"bits": 6}, "activation": {"algorithm": "mse"}},
        "layers": {"a.b": {"activation": {"bits": 16}}},
        "skip_layers": ["c"],
        "fold_bn": False,
    })
    path = cfg.save(tmp_path / f"cfg{suffix}")
    if suffix == ".json":
        json.loads(path.read_text())
    assert QuantConfig.load(path) == cfg


@pytest.mark.parametrize(
    "data,message",
    [
        ({"defualt": {}}, "unknown key 'defualt' in quant config .*did you mean 'default'"),
        ({"default": {"weight": {"bitz": 4}}}, "unknown key 'bitz'.*valid keys: bits"),
        ({"default": {"weight": {"bits": 1}}}, "bits must be between 2 and 16"),
        ({"default": {"weight": {"bits": "8"}}}, "bits must be int"),
        ({"default": {"activation": {"algorithm": "best"}}}, "minmax, percentile, mse"),
        ({"default": {"fallback": 32}}, "fallback must be 'float' or a bit width"),
        ({"layers": {"fc": {"wieght": {}}}}, "unknown key 'wieght' in fc"),
        ({"version": 2}, "version 2 is not supported"),
        ({"skip_layers": "fc"}, "skip_layers must be list"),
        ({"default": {"activation": {"per_channel": True, "algorithm": "mse"}}},
         "per_channel activation quantization supports algorithm 'minmax' only"),
    ],
)
def test_bad_config_values_name_the_key_and_the_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_dict(data)


def test_unknown_layer_names_list_the_valid_ones():
    cfg = QuantConfig(layers={"fc2": {}}, skip_layers=["conv9"])
    with pytest.raises(ConfigError, match="layers names 'fc2'.*Did you mean 'fc1'.*fc1, conv1"):
        cfg.check_layers(["fc1", "conv1"])
    with pytest.raises(ConfigError, match="skip_layers names 'conv9'"):
        QuantConfig(skip_layers=["conv9"]).check_layers(["fc1", "conv1"])


def test_invalid_yaml_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("default: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        QuantConfig.load(path)
    with pytest.raises(ConfigError, match="cannot read quant config"):
        QuantConfig.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "criterion,float_metric,new,expected",
    [
        (AccuracyCriterion(0.01), 0.90, 0.895, (True, 0.005)),
        (AccuracyCriterion(0.01), 0.90, 0.88, (False, 0.02)),
        (AccuracyCriterion(0.01, "relative"), 0.50, 0.496, (True, 0.008)),
        (AccuracyCriterion(0.05, "relative", higher_is_better=False), 20.0, 20.8, (True, 0.04)),
        (AccuracyCriterion(0.05, "relative", higher_is_better=False), 20.0, 21.2, (False, 0.06)),
        (AccuracyCriterion(0.1, "relative"), -2.0, -2.1, (True, 0.05)),   # negative baseline
        (AccuracyCriterion(0.1, "relative"), 0.0, 0.0, (True, 0.0)),      # zero baseline
        (AccuracyCriterion(0.1, "relative"), 0.0, -0.1, (False, float("inf"))),
        (AccuracyCriterion(0.0), 1.0, 1.2, (True, -0.2)),                  # improvements pass
    ],
)
def test_accuracy_criterion_semantics(criterion, float_metric, new, expected):
    ok, loss = criterion.check(float_metric, new)
    assert ok == expected[0]
    assert loss == pytest.approx(expected[1])


@pytest.mark.parametrize("kwargs", [{"max_loss": -1}, {"max_loss": float("nan")},
                                    {"loss_type": "percent"}, {"max_loss": "0.1"}])
def test_bad_criterion_arguments_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        AccuracyCriterion(**kwargs)


def test_integer_layer_names_from_yaml_are_the_sequential_children_they_mean():
    # YAML reads `0:` as an int; nn.Sequential names its children "0", "1", ...
    cfg = QuantConfig.from_yaml("layers:\n  0: {weight: {bits: 4}}\nskip_layers: [2]\n")
    assert cfg.layers == {"0": {"weight": {"bits": 4}}} and cfg.skip_layers == ["2"]
    assert cfg.layer_config("0").weight.bits == 4
    cfg.check_layers(["0", "2", "4"])
    assert QuantConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ConfigError, match=r"layers names layer '0' twice \(as 0 and '0'\)"):
        QuantConfig.from_dict({"layers": {0: {}, "0": {}}})
    with pytest.raises(ConfigError, match="an entry of skip_layers must be str, got bool"):
        QuantConfig.from_dict({"skip_layers": [True]})
