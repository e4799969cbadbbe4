"""Validation of job files: the schema, `JobConfig`, and errors naming file, line and key.

`validate_job` checks the parsed YAML (with its line map, from `autoquant.io.yamlsafe`)
against the schema in `autoquant.jobs.job`'s docstring: unknown keys, wrong types, missing
fields, import paths that do not resolve, unknown strategies or metrics, bad values. It
puts ``python_path`` folders (and the folder holding each import path's top package) on
``sys.path`` so the import paths resolve.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoquant.errors import ConfigError, did_you_mean
from autoquant.io.names import ONNX_FILE
from autoquant.io.yamlsafe import LineMap

__all__ = ["JobConfig", "validate_job", "dynamic_axes_from_data", "quant_config_from_data",
           "JOB_VERSION", "DTYPES", "SEED_RANGE", "MAX_EXAMPLE_ELEMENTS"]

JOB_VERSION = 1
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
          "uint8", "bool")

_NUMBER = (int, float)
# key -> (accepted types, required, default)
_TOP = {
    "version": ((int,), False, JOB_VERSION),
    "python_path": ((list,), False, []),
    "seed": ((int,), False, 0),
    "model": ((str, dict), True, None),
    "evaluator": ((str, dict), True, None),
    "example_inputs": ((list, dict, str), False, None),
    "quant": ((dict, str), False, None),
    "search": ((dict,), True, None),
    "export": ((dict,), False, None),
    "output_dir": ((str,), False, "autoquant_out"),
}
_MODEL = {
    "factory": ((str,), True, None),
    "kwargs": ((dict,), False, {}),
    "checkpoint": ((str,), False, None),
}
_EVALUATOR = {
    "class": ((str,), True, None),
    "kwargs": ((dict,), False, {}),
}
_INPUTS_FACTORY = {
    "factory": ((str,), True, None),
    "kwargs": ((dict,), False, {}),
}
_TENSOR = {
    "shape": ((list,), True, None),
    "dtype": ((str,), False, "float32"),
}
_EXPORT = {
    "path": ((str,), False, ONNX_FILE),
    "opset": ((int, type(None)), False, None),
    "input_names": ((list, type(None)), False, None),
    "output_names": ((list, type(None)), False, None),
    "dynamic_axes": ((dict, type(None)), False, None),
    "strict": ((bool,), False, True),
}
# torch.manual_seed takes a 64-bit seed, signed or unsigned
SEED_RANGE = (-(1 << 63), 1 << 64)
# example inputs only have to run the model once; 2**31 float32 elements are already 8 GiB
MAX_EXAMPLE_ELEMENTS = 1 << 31
_NAME = r"[^\W\d]\w*"
_IMPORT_PATH = re.compile(rf"^{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*$")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "a mapping",
               list: "a list", type(None): "null"}


class _Validator:
    """Raises ConfigError naming file, line and key path."""

    def __init__(self, path: Path, lines: LineMap) -> None:
        self.path = path
        self.lines = lines

    def error(self, keys: tuple[Any, ...], message: str) -> ConfigError:
        probe = keys
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe)
        where = f"{self.path}:{line}" if line else str(self.path)
        dotted = ".".join(str(k) for k in keys) or "<top level>"
        return ConfigError(f"{where}: {dotted}: {message}")

    def section(self, data: Any, keys: tuple[Any, ...], spec: dict[str, tuple]) -> dict[str, Any]:
        """Check a mapping against `spec`: unknown keys, missing keys, types; fill defaults."""
        if not isinstance(data, dict):
            raise self.error(keys, f"must be a mapping with keys {', '.join(spec)}, got "
                                   f"{_describe(data)}")
        for key in data:
            if key not in spec:
                hint = did_you_mean(str(key), list(spec))
                raise self.error((*keys, key), f"unknown key{hint}; valid keys: "
                                               f"{', '.join(spec)}")
        out: dict[str, Any] = {}
        for key, (types, required, default) in spec.items():
            if key not in data or (data[key] is None and not required):
                if required:
                    raise self.error(keys, f"missing required key {key!r}; this section "
                                           f"takes: {', '.join(spec)}")
                out[key] = copy.deepcopy(default)
                continue
            value = data[key]
            self.check_type(value, types, (*keys, key))
            out[key] = value
        return out

    def check_type(self, value: Any, types: tuple[type, ...], keys: tuple[Any, ...]) -> None:
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise self.error(keys, f"must be {expected}, got {_describe(value)}")


def _describe(value: Any) -> str:
    name = "null" if value is None else type(value).__name__
    return f"{name} {value!r:.60}" if value is not None else name


@dataclass
class JobConfig:
    """A validated job file. Paths are absolute (resolved against the file's folder).

    Attributes:
        path: the job file.
        model: ``{"factory", "kwargs", "checkpoint"}`` (checkpoint a Path or None).
        evaluator: ``{"class", "kwargs"}``.
        example_inputs: a list of ``{"shape", "dtype"}``, ``{"factory", "kwargs"}`` or None.
        quant: an inline QuantConfig mapping, a Path to a config file, or None (int8).
        search: the `autoquant.settings.SearchSettings` mapping (validated, defaults
            filled).
        export: path (relative to the output directory), opset, input_names,
            output_names, dynamic_axes, strict; or None (no export).
        output_dir: where `autoquant run` writes (the CLI's ``--output-dir`` overrides it).
        python_path: folders added to ``sys.path`` before importing.
        seed: seeds ``torch`` before building the model and the example inputs.
    """

    path: Path
    model: dict[str, Any]
    evaluator: dict[str, Any]
    search: dict[str, Any]
    output_dir: Path
    example_inputs: list[dict[str, Any]] | dict[str, Any] | None = None
    quant: dict[str, Any] | Path | None = None
    export: dict[str, Any] | None = None
    python_path: list[Path] = field(default_factory=list)
    seed: int = 0
    version: int = JOB_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The resolved job as YAML-ready data (absolute paths)."""
        model = dict(self.model)
        if model.get("checkpoint") is not None:
            model["checkpoint"] = str(model["checkpoint"])
        return {
            "version": self.version,
            "python_path": [str(p) for p in self.python_path],
            "seed": self.seed,
            "model": model,
            "evaluator": dict(self.evaluator),
            "example_inputs": copy.deepcopy(self.example_inputs),
            "quant": str(self.quant) if isinstance(self.quant, Path) else copy.deepcopy(
                self.quant),
            "search": dict(self.search),
            "export": copy.deepcopy(self.export),
            "output_dir": str(self.output_dir),
        }


def _import_root(folder: Path, module: str) -> Path | None:
    """The closest of `folder` and its parents that holds the top package of `module`."""
    top = module.split(".")[0]
    for candidate in (folder, *folder.parents):
        if (candidate / top).is_dir() or (candidate / f"{top}.py").is_file():
            return candidate
    return None


def _add_to_sys_path(folder: Path) -> None:
    text = str(folder)
    if text not in sys.path:
        sys.path.insert(0, text)


def _resolve_import(v: _Validator, path: str, keys: tuple[Any, ...], what: str) -> Any:
    from autoquant.registry import import_object

    if not _IMPORT_PATH.match(path):
        raise v.error(keys, f"{what} import path must look like 'package.module:name' "
                            f"(Python names around one colon), got {path!r:.80}")
    root = _import_root(v.path.parent, path.partition(":")[0])
    if root is not None:
        _add_to_sys_path(root)
    try:
        obj = import_object(path, what)
    except ConfigError as err:
        raise v.error(keys, f"{err}. Check the spelling, or add the folder that holds the "
                            "package to python_path") from None
    if not callable(obj):
        raise v.error(keys, f"{path!r} is a {type(obj).__name__}, not a callable {what}")
    return obj


def _resolve_path(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def validate_job(path: Path, data: Any, lines: LineMap) -> JobConfig:
    """Validate parsed job data; ConfigError naming file, line, key and valid choices."""
    v = _Validator(path, lines)
    base = path.parent
    top = v.section(data, (), _TOP)
    if top["version"] != JOB_VERSION:
        raise v.error(("version",), f"job version {top['version']} is not supported; this "
                                    f"autoquant reads version {JOB_VERSION}")
    low, high = SEED_RANGE
    if not low <= top["seed"] < high:
        raise v.error(("seed",), f"{top['seed']} is out of range: torch.manual_seed takes a "
                                 "64-bit seed (-2**63 <= seed < 2**64); use a smaller seed "
                                 "such as 0")
    python_path = []
    for i, entry in enumerate(top["python_path"]):
        v.check_type(entry, (str,), ("python_path", i))
        folder = _resolve_path(base, entry)
        if not folder.is_dir():
            raise v.error(("python_path", i), f"folder {str(folder)!r} does not exist")
        python_path.append(folder)
        _add_to_sys_path(folder)
    evaluator = top["evaluator"]
    evaluator = {"class": evaluator} if isinstance(evaluator, str) else evaluator
    evaluator = v.section(evaluator, ("evaluator",), _EVALUATOR)
    _resolve_import(v, evaluator["class"], ("evaluator", "class"), "evaluator")
    return JobConfig(
        path=path, model=_validate_model(v, top["model"], base), evaluator=evaluator,
        search=_validate_search(v, top["search"]),
        output_dir=_resolve_path(base, top["output_dir"]),
        example_inputs=_validate_inputs(v, top["example_inputs"]),
        quant=_validate_quant(v, top["quant"], base), export=_validate_export(v, top["export"]),
        python_path=python_path, seed=top["seed"], version=top["version"],
    )


def _validate_model(v: _Validator, model: Any, base: Path) -> dict[str, Any]:
    model = {"factory": model} if isinstance(model, str) else model
    model = v.section(model, ("model",), _MODEL)
    _resolve_import(v, model["factory"], ("model", "factory"), "model factory")
    if model["checkpoint"] is not None:
        model["checkpoint"] = _resolve_path(base, model["checkpoint"])
        if not model["checkpoint"].is_file():
            raise v.error(("model", "checkpoint"), f"file {str(model['checkpoint'])!r} does "
                                                   "not exist")
    return model


def _validate_inputs(v: _Validator, inputs: Any) -> Any:
    if isinstance(inputs, str):  # a bare import path: the factory, without kwargs
        inputs = {"factory": inputs}
    if isinstance(inputs, dict):
        inputs = v.section(inputs, ("example_inputs",), _INPUTS_FACTORY)
        _resolve_import(v, inputs["factory"], ("example_inputs", "factory"),
                        "example_inputs factory")
        return inputs
    if not isinstance(inputs, list):
        return inputs
    checked = []
    total = 0
    for i, spec in enumerate(inputs):
        spec = v.section(spec, ("example_inputs", i), _TENSOR)
        elements = 1
        for j, dim in enumerate(spec["shape"]):
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise v.error(("example_inputs", i, "shape", j),
                              f"must be a positive integer, got {_describe(dim)}")
            elements *= dim
        total += elements
        if total > MAX_EXAMPLE_ELEMENTS:
            raise v.error(("example_inputs", i, "shape"),
                          f"{spec['shape']} makes {total:.3g} elements in all, more than the "
                          f"{MAX_EXAMPLE_ELEMENTS:.3g} example inputs may have (they only "
                          "check that the model runs and trace the export); use a small "
                          "batch, e.g. [1, ...] or [2, ...]")
        if spec["dtype"] not in DTYPES:
            raise v.error(("example_inputs", i, "dtype"),
                          f"unknown dtype {spec['dtype']!r}; valid: {', '.join(DTYPES)}")
        checked.append(spec)
    return checked


def quant_config_from_data(data: Any) -> Any:
    """`QuantConfig.from_dict(data)` with every failure a `ConfigError`.

    The data comes from a user's file; a value the config's own checks do not expect (a
    list where a layer name belongs, say) must be an error naming the problem, not a
    ``TypeError`` from inside the config classes.
    """
    from autoquant.config import QuantConfig

    try:
        return QuantConfig.from_dict(data)
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise ConfigError(f"not a valid quant config ({type(err).__name__}: {err}); see "
                          "docs/configuration.md for its keys and values") from err


def _validate_quant(v: _Validator, quant: Any, base: Path) -> Any:
    if isinstance(quant, str):
        return _resolve_path(base, quant)
    if isinstance(quant, dict):
        try:
            quant_config_from_data(quant)
        except ConfigError as err:
            raise v.error(("quant",), str(err)) from None
    return quant


def _validate_export(v: _Validator, export: Any) -> dict[str, Any] | None:
    if export is None:
        return None
    export = v.section(export, ("export",), _EXPORT)
    for key in ("input_names", "output_names"):
        for i, name in enumerate(export[key] or []):
            v.check_type(name, (str,), ("export", key, i))
    if export["dynamic_axes"] is not None:
        try:
            export["dynamic_axes"] = dynamic_axes_from_data(export["dynamic_axes"])
        except ConfigError as err:
            raise v.error(("export", "dynamic_axes"), str(err)) from None
    return export


def _validate_search(v: _Validator, data: Any) -> dict[str, Any]:
    """The ``search:`` section as `SearchSettings` validate it, defaults filled in."""
    from autoquant.settings import SearchSettings, SettingError

    if not isinstance(data, dict):
        raise v.error(("search",), f"must be a mapping of search settings, got "
                                   f"{_describe(data)}")
    try:
        settings = SearchSettings.from_dict(data)
    except SettingError as err:
        keys = ("search", *err.key.split("."))
        raise v.error(keys, err.message) from None
    if "max_loss" not in data:  # a job states its budget; the API has a default
        raise v.error(("search",), "missing required key 'max_loss' (the accepted loss, e.g. "
                                   "0.01)")
    try:  # the options' values too (a storage URL, a seed), not just their names
        settings.make_strategy()
    except (ConfigError, TypeError, ValueError) as err:
        key = ("search", "strategy_options") if data.get("strategy_options") else \
            ("search", "strategy")
        raise v.error(key, f"strategy {settings.to_dict()['strategy']!r} cannot be built "
                           f"from these options: {err}") from None
    return settings.to_dict()


def dynamic_axes_from_data(data: Any) -> dict[str, dict[int, str] | list[int]]:
    """`dynamic_axes` as read from YAML/JSON: ``{name: {axis: label}}`` or ``{name: [axes]}``
    with the axes as integers (JSON keys are strings)."""
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping {{input name: {{axis: label}}}}, got {data!r:.60}")
    out: dict[str, dict[int, str] | list[int]] = {}
    for name, spec in data.items():
        try:
            if isinstance(spec, dict):
                out[str(name)] = {int(axis): str(label) for axis, label in spec.items()}
            elif isinstance(spec, list):
                out[str(name)] = [int(axis) for axis in spec]
            else:
                raise ValueError(spec)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: must be {{axis: label}} or [axes] with integer axes, "
                              f"got {spec!r:.60}") from None
    return out
