"""Property-based fuzzing of job files and quant configs: whatever the file says, loading
it either works or raises autoquant's own `ConfigError` -- never a raw ``TypeError``,
``RecursionError``, ``UnicodeDecodeError`` or a traceback from deep inside PyYAML.

Three generators: random YAML-ish text (YAML's special characters, deep brackets, odd
bytes), random nested data dumped as YAML, and valid jobs with random values put into
known keys. Import paths are only ever chosen from a fixed list, so a fuzzed job never
imports an arbitrary module.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoquant.config import QuantConfig
from autoquant.errors import ConfigError
from autoquant.io.yamlsafe import load_yaml_with_lines
from autoquant.jobs.job import load_job

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
NESTED = "[" * 200_000
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

YAML_CHARS = st.sampled_from(list("[]{}:,-&*!|>'\"#%@`?\\ \t\n\r.0123456789eE+_abwxyzé\x00"
                                  "\x85\u2028\ufeff"))
yaml_text = st.one_of(
    st.text(YAML_CHARS, max_size=200),
    st.builds(lambda n, tail: "[" * n + tail, st.integers(0, 300), st.text(YAML_CHARS,
                                                                              max_size=20)),
    st.builds(lambda k, v: f"{k}: {v}\n", st.sampled_from(["default", "layers", "seed",
                                                           "target", "!!python/object"]),
              st.text(YAML_CHARS, max_size=60)),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 80), 2 ** 80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.sampled_from(["float", "w8a8", "static", "minmax", "auto", "arm",
                                     "absolute", "relative", "binary", "optuna", "cosine"]))
data = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-3, 3)), inner, max_size=4)),
    max_leaves=12)


_ROOT = tempfile.TemporaryDirectory(prefix="aq-fuzz-")  # removed when the session ends


def _file(text: str | bytes, name: str) -> Path:
    path = Path(tempfile.mkdtemp(dir=_ROOT.name)) / name
    if isinstance(text, str):
        text = text.encode("utf-8", errors="surrogatepass")
    path.write_bytes(text)
    return path


def _loads_or_config_error(action) -> None:
    """Run `action`; any exception other than ConfigError fails the property."""
    saved = list(sys.path)
    try:
        action()
    except ConfigError:
        pass
    finally:
        sys.path[:] = saved  # a fuzzed python_path must not leak into other tests


def _quant_from_file(text: str | bytes, suffix: str = ".yaml") -> None:
    job = _file(f"python_path: [{HELPERS}]\nmodel: jobhelpers:build_model\n"
                "evaluator: jobhelpers:TinyEvaluator\nsearch: {max_loss: 0.1}\n", "job.yaml")
    (job.parent / f"quant{suffix}").write_bytes(text if isinstance(text, bytes) else
                                                text.encode("utf-8", "surrogatepass"))
    text_job = job.read_text() + f"quant: quant{suffix}\n"
    job.write_text(text_job)
    load_job(job).quant_config()


@FUZZ
@given(yaml_text)
def test_random_yaml_text_is_a_quant_config_or_a_config_error(text):
    _loads_or_config_error(lambda: QuantConfig.from_yaml(text))
    _loads_or_config_error(lambda: load_yaml_with_lines(_file(text, "job.yaml")))


@FUZZ
@given(st.one_of(yaml_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.binary(max_size=120)))
def test_random_bytes_in_a_job_or_quant_file_load_or_are_a_config_error(raw):
    _loads_or_config_error(lambda: load_yaml_with_lines(_file(raw, "job.yaml")))
    _loads_or_config_error(lambda: _quant_from_file(raw))
    _loads_or_config_error(lambda: _quant_from_file(raw, ".json"))


@FUZZ
@given(data)
def test_random_data_is_a_quant_config_or_a_config_error(value):
    _loads_or_config_error(lambda: _inline_quant(value))
    _loads_or_config_error(lambda: _quant_from_file(yaml.safe_dump(value)))
    _loads_or_config_error(lambda: _quant_from_file(json.dumps(value), ".json"))


quantizer = st.fixed_dictionaries({}, optional={
    "bits": st.one_of(st.integers(-5, 40), scalars), "symmetric": scalars,
    "per_channel": scalars, "algorithm": scalars, "percentile": scalars, "extra": scalars})
layer = st.fixed_dictionaries({}, optional={
    "weight": st.one_of(quantizer, data), "activation": st.one_of(quantizer, data),
    "fallback": st.one_of(scalars, st.integers(-2, 40)), "mode": scalars})
quant = st.fixed_dictionaries({}, optional={
    "version": st.one_of(st.just(1), scalars), "default": st.one_of(layer, data),
    "layers": st.one_of(st.dictionaries(st.sampled_from(["0", "2", "4", "x"]), layer,
                                        max_size=3), data),
    "skip_layers": st.one_of(st.lists(st.sampled_from(["0", "2", "nope"])), data),
    "fold_bn": scalars, "bias_correction": scalars, "smoothing_alpha": scalars,
    "target": scalars})


def _inline_quant(value) -> None:
    text = (f"python_path: [{HELPERS}]\nmodel: jobhelpers:build_model\n"
            "evaluator: jobhelpers:TinyEvaluator\nsearch: {max_loss: 0.1}\n"
            + yaml.safe_dump({"quant": value}))
    load_job(_file(text, "job.yaml")).quant_config()


@FUZZ
@given(quant)
def test_random_values_in_known_quant_keys_are_a_config_or_a_config_error(value):
    _loads_or_config_error(lambda: _inline_quant(value))
    _loads_or_config_error(lambda: _quant_from_file(yaml.safe_dump(value)))


IMPORTS = st.sampled_from(["jobhelpers:build_model", "jobhelpers:TinyEvaluator",
                           "jobhelpers:make_inputs", "jobhelpers:missing", "jobhelpers:WIDTH",
                           "no_such_package_xyz:thing", "no colon", ":", ""])
options = st.fixed_dictionaries({}, optional={
    "refine": scalars, "verify": scalars, "ladder": st.one_of(st.lists(st.integers(-2, 40),
                                                                       max_size=3), scalars),
    "n_trials": scalars, "objectives": scalars, "seed": scalars, "study_name": scalars,
    "storage": st.one_of(scalars, st.sampled_from([
        "sqlite:///missing/dir/x.db", "sqlite://", "nope://x", "study.db",
        "sqlite:///:memory:"]))})
search = st.fixed_dictionaries({"max_loss": st.one_of(st.floats(0, 1), scalars)}, optional={
    "loss_type": scalars, "strategy": scalars, "strategy_options": st.one_of(options, data),
    "sensitivity": scalars, "max_evaluations": scalars, "eval_timeout": scalars,
    "max_seconds": scalars, "workers": st.one_of(st.integers(-2, 8), scalars),
    "holdout": scalars, "audit": scalars, "check_determinism": scalars,
    "verify_deploy": scalars, "unknown_key": scalars})
tensor = st.fixed_dictionaries({"shape": st.one_of(
    st.lists(st.one_of(st.integers(-2, 10 ** 6), scalars), max_size=5), scalars)},
    optional={"dtype": scalars})
job = st.fixed_dictionaries({
    "model": st.one_of(IMPORTS, st.fixed_dictionaries({"factory": IMPORTS}, optional={
        "kwargs": st.one_of(st.dictionaries(st.text(max_size=5), scalars, max_size=2), data),
        "checkpoint": scalars})),
    "evaluator": st.one_of(IMPORTS, st.fixed_dictionaries({"class": IMPORTS}, optional={
        "kwargs": data})),
    "search": st.one_of(search, data),
}, optional={
    "version": scalars, "seed": st.one_of(st.integers(-(2 ** 70), 2 ** 70), scalars),
    "example_inputs": st.one_of(st.lists(st.one_of(tensor, data), max_size=3), IMPORTS, data),
    "quant": st.one_of(quant, data), "output_dir": scalars,
    "export": st.one_of(st.fixed_dictionaries({}, optional={
        "path": scalars, "opset": scalars, "input_names": data, "output_names": data,
        "dynamic_axes": data, "strict": scalars}), data),
    "bogus": scalars})


def _load_everything(text: str) -> None:
    loaded = load_job(_file(text, "job.yaml"))
    loaded.settings()
    loaded.quant_config()
    spec = loaded.config.example_inputs
    if isinstance(spec, list) and sum(math.prod(s["shape"]) for s in spec) <= 10 ** 6:
        loaded.example_inputs()  # (a valid 2**31-element input would take 8 GiB here)


@FUZZ
@given(job)
def test_random_values_in_known_job_keys_load_or_are_a_config_error(value):
    text = f"python_path: [{HELPERS}]\n" + yaml.safe_dump(value, allow_unicode=True)
    _loads_or_config_error(lambda: _load_everything(text))


@pytest.mark.parametrize("text", ["seed: 2001-02-30\n", "a: !!int x\n", "a: !!binary 'a'\n",
                                  "? [a, b]\n: 1\n", "a: !!float nope\n", "\x00",
                                  pytest.param(NESTED, id="200000-brackets")])
def test_scalars_pyyaml_cannot_convert_are_config_errors(text):
    with pytest.raises(ConfigError):
        load_yaml_with_lines(_file(text, "job.yaml"))
    with pytest.raises(ConfigError):
        QuantConfig.from_yaml(text)
