"""YAML job files: loading, path resolution, and one clear error per malformed case."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import autoquant as aq
from autoquant.errors import ConfigError
from autoquant.jobs.job import load_job

TESTS = Path(__file__).resolve().parents[1] / "helpers"  # the job files' modules

GOOD = f"""\
python_path: [{TESTS}]
seed: 3
model:
  factory: jobhelpers:build_model
  kwargs: {{depth: 3}}
evaluator:
  class: jobhelpers:TinyEvaluator
  kwargs: {{depth: 3}}
example_inputs:
  - {{shape: [2, 8], dtype: float32}}
quant:
  default: {{weight: {{bits: 6}}}}
search:
  max_loss: 0.03
output_dir: results
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_valid_job_builds_model_evaluator_inputs_and_search_settings(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    model = job.build_model()
    (x,) = job.example_inputs()
    assert x.shape == (2, 8) and x.dtype == torch.float32
    assert model(x).shape == (2, 4)
    assert job.build_evaluator().evaluate(model) == pytest.approx(1.0)
    settings = job.settings()
    assert settings.max_loss == 0.03 and settings.strategy == "binary"
    assert job.quant_config().default.weight.bits == 6
    assert job.config.output_dir == tmp_path / "results"  # relative to the job's folder


def test_relative_checkpoint_and_quant_file_resolve_against_the_job_folder(tmp_path):
    import jobhelpers  # on sys.path through the conftest-free python_path of GOOD

    sub = tmp_path / "cfg"
    sub.mkdir()
    torch.save(jobhelpers.build_model(seed=7, depth=3).state_dict(), sub / "w.pt")
    (sub / "q.yaml").write_text("default: {weight: {bits: 5}}\n", encoding="utf-8")
    text = GOOD.replace("  kwargs: {depth: 3}\nevaluator", "  kwargs: {depth: 3}\n"
                        "  checkpoint: w.pt\nevaluator", 1)
    text = text.replace("quant:\n  default: {weight: {bits: 6}}\n", "quant: q.yaml\n")
    job = load_job(write(sub, text))
    expected = jobhelpers.build_model(seed=7, depth=3)
    got = job.build_model()
    assert torch.equal(got[0].weight, expected[0].weight)
    assert job.quant_config().default.weight.bits == 5


def test_saved_resolved_job_loads_from_anywhere_with_the_same_settings(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    copy = job.save(tmp_path / "elsewhere" / "job.yaml")
    again = load_job(copy)
    assert again.resolved() == job.resolved()
    assert again.config.output_dir == tmp_path / "results"


def test_example_inputs_factory_is_called_with_its_kwargs(tmp_path):
    text = GOOD.replace("  - {shape: [2, 8], dtype: float32}",
                        "  {factory: 'jobhelpers:make_inputs', kwargs: {batch: 5}}")
    (x,) = load_job(write(tmp_path, text)).example_inputs()
    assert x.shape == (5, 8)


def test_missing_quant_file_points_at_init_config(tmp_path):
    text = GOOD.replace("quant:\n  default: {weight: {bits: 6}}\n", "quant: missing.yaml\n")
    job = load_job(write(tmp_path, text))
    with pytest.raises(ConfigError, match="init-config"):
        job.quant_config()


BAD_CASES = {
    "unknown top-level key": (
        ("output_dir: results", "output_dri: results"),
        [":15:", "output_dri", "unknown key", "did you mean 'output_dir'", "valid keys"]),
    "unknown nested key": (
        ("  max_loss: 0.03", "  max_los: 0.03"),
        [":14:", "search.max_los", "did you mean 'max_loss'"]),
    "wrong type": (
        ("  max_loss: 0.03", "  max_loss: lots"),
        [":14:", "search.max_loss", "must be an integer or a number", "got str"]),
    "bool is not a number": (
        ("  max_loss: 0.03", "  max_loss: true"),
        ["search.max_loss", "got bool"]),
    "missing required section": (
        ("search:\n  max_loss: 0.03\n", ""),
        ["missing required key 'search'"]),
    "missing required field": (
        ("  max_loss: 0.03", "  loss_type: relative"),
        [":13:", "search", "missing required key 'max_loss'"]),
    "module does not import": (
        ("  factory: jobhelpers:build_model", "  factory: no_such_pkg.models:build"),
        [":4:", "model.factory", "cannot import module 'no_such_pkg.models'", "python_path"]),
    "attribute does not exist": (
        ("  class: jobhelpers:TinyEvaluator", "  class: jobhelpers:TinyEvaluatr"),
        [":7:", "evaluator.class", "has no attribute 'TinyEvaluatr'"]),
    "import path without colon": (
        ("  class: jobhelpers:TinyEvaluator", "  class: jobhelpers.TinyEvaluator"),
        ["evaluator.class", "package.module:name"]),
    "unknown strategy": (
        ("  max_loss: 0.03", "  max_loss: 0.03\n  strategy: bisect"),
        ["search.strategy", "unknown strategy 'bisect'", "available: binary"]),
    "bad loss type": (
        ("  max_loss: 0.03", "  max_loss: 0.03\n  loss_type: percent"),
        ["search.loss_type", "'absolute' or 'relative'"]),
    "bad dtype": (
        ("dtype: float32", "dtype: float33"),
        ["example_inputs.0.dtype", "float32", "valid:"]),
    "bad shape": (
        ("shape: [2, 8]", "shape: [2, -1]"),
        ["example_inputs.0.shape.1", "positive integer"]),
    "bad inline quant config": (
        ("  default: {weight: {bits: 6}}", "  default: {weight: {bitz: 6}}"),
        [":11:", "quant", "unknown key 'bitz'"]),
    "budget too small": (
        ("  max_loss: 0.03", "  max_loss: 0.03\n  max_evaluations: 1"),
        ["search.max_evaluations", ">= 2"]),
    "missing checkpoint": (
        ("  kwargs: {depth: 3}\nevaluator", "  checkpoint: nope.pt\nevaluator"),
        ["model.checkpoint", "nope.pt", "does not exist"]),
    "not a mapping": (
        (GOOD, "- just\n- a list\n"),
        ["<top level>", "must be a mapping"]),
    "invalid yaml": (
        ("search:\n", "search: [\n"),
        ["not valid YAML"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_job_gives_one_clear_error_naming_file_line_and_key(tmp_path, case):
    (old, new), expected = BAD_CASES[case]
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_job(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_yaml_alias_bomb_is_refused_without_expanding(tmp_path):
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        bomb.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = write(tmp_path, GOOD + "\n".join(bomb) + "\n")
    with pytest.raises(ConfigError, match=r"alias \*a is not allowed.*YAML bomb"):
        load_job(path)


def test_exponent_numbers_without_a_dot_are_numbers_not_strings(tmp_path):
    # YAML 1.1 reads `1e-3` as a string; a loss budget written so means the number
    job = load_job(write(tmp_path, GOOD.replace("max_loss: 0.03", "max_loss: 1e-3")))
    assert job.settings().max_loss == pytest.approx(1e-3)


def test_empty_job_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="is empty"):
        load_job(write(tmp_path, "# nothing\n"))


def test_model_factory_returning_a_non_module_is_a_model_error(tmp_path):
    from autoquant.errors import ModelError

    text = GOOD.replace("jobhelpers:build_model", "jobhelpers:make_inputs").replace(
        "  kwargs: {depth: 3}\nevaluator", "  kwargs: {}\nevaluator")
    with pytest.raises(ModelError, match="must return a torch.nn.Module"):
        load_job(write(tmp_path, text)).build_model()


def test_the_digits_example_job_file_validates():
    job = load_job(TESTS.parents[1] / "examples" / "digits" / "job.yaml")
    assert job.config.model["factory"] == "examples.digits.batch:trained_model"
    assert job.quant_config().default.weight.bits == 3
    assert job.config.output_dir == TESTS.parents[1] / "examples" / "digits" / "out" / "job"


def test_job_quant_config_may_name_sequential_children_by_number(tmp_path):
    text = GOOD.replace("  default: {weight: {bits: 6}}",
                        "  layers: {0: {weight: {bits: 4}}}\n  skip_layers: [4]")
    job = load_job(write(tmp_path, text))
    config = job.quant_config()
    assert config.layer_config("0").weight.bits == 4 and config.skip_layers == ["4"]
    config.check_layers(["0", "2", "4"])


def test_strategy_options_are_checked_against_the_strategy_at_load_time(tmp_path):
    text = GOOD.replace("  max_loss: 0.03", "  max_loss: 0.03\n  strategy_options:\n"
                                            "    refin: 2")
    with pytest.raises(ConfigError) as info:
        load_job(write(tmp_path, text))
    message = str(info.value)
    assert "job.yaml:16:" in message and "search.strategy_options.refin" in message
    assert "did you mean 'refine'?" in message


def test_the_search_section_is_the_search_settings_key_for_key(tmp_path):
    text = GOOD.replace("  max_loss: 0.03", "  max_loss: 0.03\n  workers: 1\n  audit: 1\n"
                                            "  verify_deploy: false")
    settings = load_job(write(tmp_path, text)).settings()
    assert settings == aq.SearchSettings(max_loss=0.03, audit=1)
    text = GOOD.replace("  max_loss: 0.03", "  max_loss: 0.03\n  sensitivity_scope: model")
    with pytest.raises(ConfigError, match=r"job\.yaml:\d+: search\.sensitivity_scope: must be "
                                          r"'auto', 'layer'"):
        load_job(write(tmp_path, text))


def test_strategy_options_are_checked_by_building_the_strategy_when_the_job_loads(tmp_path):
    text = GOOD.replace("  max_loss: 0.03", "  max_loss: 0.03\n  strategy: optuna\n"
                                             f"  strategy_options: {{seed: {2 ** 70}}}")
    with pytest.raises(ConfigError, match=r"job\.yaml:\d+: search\.strategy_options: strategy "
                                          r"'optuna' cannot be built .*seed must be an int in "
                                          r"\[0, 2\*\*32\)"):
        load_job(write(tmp_path, text))


@pytest.mark.parametrize("seed", [-(2 ** 63), 0, 2 ** 64 - 1])
def test_every_seed_torch_takes_is_accepted(tmp_path, seed):
    job = load_job(write(tmp_path, GOOD.replace("seed: 3", f"seed: {seed}")))
    assert job.build_model() is not None and job.example_inputs()[0].shape == (2, 8)
