"""`QuantConfig`: global quantization defaults, per-layer overrides and skipped layers.

A dataclass tree with a 1:1 mapping to YAML/JSON. Unknown keys and bad values raise
`ConfigError` naming the key and the valid choices; layer names are checked against the
model when the config is bound to it (`QuantConfig.check_layers`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from autoquant.errors import ConfigError, did_you_mean
from autoquant.io.atomic import atomic_write_text
from autoquant.io.yamlsafe import safe_load_no_aliases
from autoquant.plan import FLOAT, scheme_label
from autoquant.quant.target import TARGETS

__all__ = ["QuantizerConfig", "LayerConfig", "QuantConfig", "CONFIG_VERSION", "QUANT_MODES"]

CONFIG_VERSION = 1
ActivationAlgorithm = Literal["minmax", "percentile", "mse", "entropy", "auto"]
_ALGORITHMS = ("minmax", "percentile", "mse", "entropy", "auto")
_WEIGHT_ALGORITHMS = ("minmax", "mse")
QuantMode = Literal["static", "dynamic", "weight_only"]
QUANT_MODES = ("static", "dynamic", "weight_only")


def _check_keys(data: Any, cls: type, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__} {data!r:.60}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in valid:
            hint = did_you_mean(str(key), valid)
            raise ConfigError(
                f"unknown key {key!r} in {where}{hint}; valid keys: {', '.join(valid)}"
            )
    return dict(data)


def _check_type(value: Any, types: type | tuple[type, ...], where: str) -> None:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{where} must be {_type_names(types)}, got bool {value!r}")
    if not isinstance(value, types):
        raise ConfigError(
            f"{where} must be {_type_names(types)}, got {type(value).__name__} {value!r:.60}"
        )


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


@dataclass
class QuantizerConfig:
    """How one tensor (a weight or an input activation) is quantized.

    Attributes:
        bits: bit width, 2 to 16.
        symmetric: zero point 0 (signed range) if True, else an affine unsigned range.
        per_channel: one scale per output channel (weights) or per channel axis 1
            (activations, `minmax` only).
        algorithm: range calibration. Activations: ``minmax``, ``percentile`` (clip at
            `percentile` of the observed values), ``mse`` (clip range minimising the
            quantization MSE), ``entropy`` (histogram KL divergence) or ``auto`` (per layer,
            the candidate with the best local output SQNR; see `autoquant.calibration.refine`).
            Weights: ``minmax`` or ``mse`` (per-channel MSE-optimal clipping).
        percentile: the percentile used by ``algorithm="percentile"``, in (50, 100].
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    algorithm: ActivationAlgorithm = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        _check_type(self.bits, int, "bits")
        if not 2 <= self.bits <= 16:
            raise ConfigError(f"bits must be between 2 and 16, got {self.bits}")
        _check_type(self.symmetric, bool, "symmetric")
        _check_type(self.per_channel, bool, "per_channel")
        if self.algorithm not in _ALGORITHMS:
            raise ConfigError(
                f"algorithm must be one of {', '.join(_ALGORITHMS)}, got {self.algorithm!r}"
            )
        _check_type(self.percentile, (int, float), "percentile")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "quantizer") -> QuantizerConfig:
        """Build from a mapping, rejecting unknown keys."""
        items = _check_keys(data, cls, where)
        try:
            return cls(**items)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


def _default_weight() -> QuantizerConfig:
    return QuantizerConfig(bits=8, symmetric=True, per_channel=True)


def _default_activation() -> QuantizerConfig:
    return QuantizerConfig(bits=8, symmetric=False, per_channel=False)


@dataclass
class LayerConfig:
    """The quantization of one layer, and what it falls back to.

    Attributes:
        weight: the weight quantizer.
        activation: the input-activation quantizer.
        fallback: what the search switches the layer to when it falls back: ``"float"`` or
            a bit width (e.g. 16 for W16A16, which keeps most of the int win).
        mode: how input activations are quantized: ``"static"`` (ranges calibrated once),
            ``"dynamic"`` (range of each batch, at run time) or ``"weight_only"``
            (activations stay float; the scheme's activation bits are ignored).
        smoothing: input smoothing of a static ``nn.Linear`` (`autoquant.calibration.equalize`):
            None (off), a migration strength in [0, 1], or ``"auto"`` (per layer, the
            strength with the best local output SQNR, or none).
    """

    weight: QuantizerConfig = field(default_factory=_default_weight)
    activation: QuantizerConfig = field(default_factory=_default_activation)
    fallback: str | int = FLOAT
    mode: QuantMode = "static"
    smoothing: float | str | None = None

    def __post_init__(self) -> None:
        # A partial mapping overrides the role's own defaults (activations are asymmetric
        # per-tensor, weights symmetric per-channel), not the bare QuantizerConfig defaults.
        if isinstance(self.weight, Mapping):
            self.weight = QuantizerConfig.from_dict(
                _merge(dataclasses.asdict(_default_weight()), _check_keys(
                    self.weight, QuantizerConfig, "weight")), "weight")
        if isinstance(self.activation, Mapping):
            self.activation = QuantizerConfig.from_dict(
                _merge(dataclasses.asdict(_default_activation()), _check_keys(
                    self.activation, QuantizerConfig, "activation")), "activation")
        for role in ("weight", "activation"):
            if not isinstance(getattr(self, role), QuantizerConfig):
                raise ConfigError(f"{role} must be a mapping of quantizer settings")
        if self.weight.algorithm not in _WEIGHT_ALGORITHMS:
            raise ConfigError(
                f"weight.algorithm must be one of {', '.join(_WEIGHT_ALGORITHMS)}, got "
                f"{self.weight.algorithm!r}"
            )
        if self.activation.per_channel and self.activation.algorithm != "minmax":
            raise ConfigError(
                f"per_channel activation quantization supports algorithm 'minmax' only, got "
                f"{self.activation.algorithm!r}; set per_channel: false or algorithm: minmax"
            )
        if self.fallback != FLOAT:
            if isinstance(self.fallback, bool) or not isinstance(self.fallback, int) or not (
                2 <= self.fallback <= 16
            ):
                raise ConfigError(
                    f"fallback must be 'float' or a bit width from 2 to 16, got {self.fallback!r}"
                )
        if self.mode not in QUANT_MODES:
            raise ConfigError(
                f"mode must be one of {', '.join(QUANT_MODES)}, got {self.mode!r}"
            )
        strength = self.smoothing
        if strength is not None and strength != "auto" and (
                isinstance(strength, bool) or not isinstance(strength, (int, float))
                or not 0.0 <= strength <= 1.0):
            raise ConfigError(f"smoothing must be null (off), 'auto' or a migration strength "
                              f"in [0, 1] (0.85 suits transformers), got {strength!r}")

    @property
    def scheme(self) -> str:
        """The label of the layer's quantized scheme, e.g. ``"w8a8"``."""
        return scheme_label(self.weight.bits, self.activation.bits)

    @property
    def fallback_scheme(self) -> str:
        """The label of the layer's fallback scheme (``"float"`` or e.g. ``"w16a16"``)."""
        return FLOAT if self.fallback == FLOAT else scheme_label(self.fallback, self.fallback)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, the same keys as the YAML file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "layer config") -> LayerConfig:
        """Build from a mapping, rejecting unknown keys."""
        items = _check_keys(data, cls, where)
        try:
            return cls(**items)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _names_as_str(entries: dict[Any, Any], where: str) -> dict[Any, Any]:
    """Integer layer names as their text: YAML reads ``0:`` (an nn.Sequential child) as int."""
    out: dict[Any, Any] = {}
    given: dict[Any, Any] = {}
    for name, value in entries.items():
        key = str(name) if isinstance(name, int) and not isinstance(name, bool) else name
        if key in out:
            raise ConfigError(f"{where} names layer {key!r} twice (as {given[key]!r} and "
                              f"{name!r}); keep one")
        out[key], given[key] = value, name
    return out


@dataclass
class QuantConfig:
    """Global defaults, per-layer overrides and skipped layers for one model.

    Attributes:
        version: the schema version (1).
        default: the `LayerConfig` every quantizable layer starts from.
        layers: per-layer overrides by qualified module name; each is a partial
            `LayerConfig` mapping (e.g. ``{"weight": {"bits": 4}}``) merged over `default`.
        skip_layers: qualified names of layers that stay float and are never searched.
        fold_bn: fold eval-mode BatchNorm into the preceding convolution first.
        bias_correction: after weight quantization, add to each Linear/Conv bias the mean
            output shift its weight quantization caused on the calibration data
            (`autoquant.calibration.refine`).
        smoothing_alpha: None (off) or the SmoothQuant migration strength in [0, 1]: the
            input-channel scales of Linear layers fed by a LayerNorm move into the weights
            (`autoquant.calibration.smoothing`).
        target: the CPU the exported model runs on, whose integer arithmetic the search
            reproduces: ``auto`` (this CPU), ``x86_vnni``, ``x86_avx2`` (no VNNI: 8-bit
            weights use 7 bits so onnxruntime's kernels cannot saturate), ``arm`` or
            ``reference`` (see `autoquant.quant.target`). A saved config holds the resolved one.

    Example:
        >>> cfg = QuantConfig.from_dict({"default": {"activation": {"algorithm": "mse"}},
        ...                              "layers": {"fc": {"fallback": 16}}})
        >>> cfg.layer_config("fc").fallback_scheme
        'w16a16'
    """

    version: int = CONFIG_VERSION
    default: LayerConfig = field(default_factory=LayerConfig)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip_layers: list[str] = field(default_factory=list)
    fold_bn: bool = True
    bias_correction: bool = False
    smoothing_alpha: float | None = None
    target: str = "auto"

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"config version {self.version!r} is not supported; this autoquant reads "
                f"version {CONFIG_VERSION}"
            )
        if isinstance(self.default, Mapping):
            self.default = LayerConfig.from_dict(self.default, "default")
        if not isinstance(self.default, LayerConfig):
            raise ConfigError(f"default must be a LayerConfig mapping, got {self.default!r:.60}")
        _check_type(self.layers, dict, "layers")
        self.layers = _names_as_str(self.layers, "layers")
        base = self.default.to_dict()
        for name, override in self.layers.items():
            _check_type(name, str, "a layer name in layers")
            if isinstance(override, LayerConfig):
                override = override.to_dict()
                self.layers[name] = override
            LayerConfig.from_dict(_merge(base, _check_keys(override, LayerConfig, name)), name)
        if isinstance(self.skip_layers, (tuple, set)):
            self.skip_layers = sorted(self.skip_layers) if isinstance(
                self.skip_layers, set) else list(self.skip_layers)
        _check_type(self.skip_layers, list, "skip_layers")
        self.skip_layers = list(_names_as_str(dict.fromkeys(self.skip_layers), "skip_layers"))
        for name in self.skip_layers:
            _check_type(name, str, "an entry of skip_layers")
        _check_type(self.fold_bn, bool, "fold_bn")
        _check_type(self.bias_correction, bool, "bias_correction")
        if self.smoothing_alpha is not None:
            _check_type(self.smoothing_alpha, (int, float), "smoothing_alpha")
            if not 0.0 <= self.smoothing_alpha <= 1.0:
                raise ConfigError(
                    f"smoothing_alpha must be null (off) or in [0, 1] (0.5 is typical), got "
                    f"{self.smoothing_alpha}"
                )
        if self.target not in TARGETS:
            hint = did_you_mean(str(self.target), TARGETS)
            raise ConfigError(
                f"target must be one of {', '.join(TARGETS)}, got {self.target!r}{hint}; "
                "'auto' takes this CPU's"
            )

    def layer_config(self, name: str) -> LayerConfig:
        """The resolved `LayerConfig` of layer `name` (default merged with its override)."""
        override = self.layers.get(name)
        if not override:
            return copy.deepcopy(self.default)
        return LayerConfig.from_dict(_merge(self.default.to_dict(), override), name)

    def check_layers(self, quantizable: Iterable[str]) -> None:
        """Raise ConfigError if `layers` or `skip_layers` names a layer not in `quantizable`."""
        valid = list(quantizable)
        valid_set = set(valid)
        for where, names in (("layers", list(self.layers)), ("skip_layers", self.skip_layers)):
            for name in names:
                if name not in valid_set:
                    close = difflib.get_close_matches(name, valid, n=3)
                    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                    shown = ", ".join(valid[:30]) + (" ..." if len(valid) > 30 else "")
                    raise ConfigError(
                        f"{where} names {name!r}, which is not a quantizable layer of this "
                        f"model.{hint} Quantizable layers: {shown}"
                    )

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, the same keys as the YAML/JSON file."""
        return {
            "version": self.version,
            "default": self.default.to_dict(),
            "layers": copy.deepcopy(self.layers),
            "skip_layers": list(self.skip_layers),
            "fold_bn": self.fold_bn,
            "bias_correction": self.bias_correction,
            "smoothing_alpha": self.smoothing_alpha,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, data: Any) -> QuantConfig:
        """Build from a mapping (as read from YAML/JSON), rejecting unknown keys."""
        items = _check_keys(data if data is not None else {}, cls, "quant config")
        return cls(**items)

    def to_yaml(self) -> str:
        """The config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> QuantConfig:
        """Parse YAML text (safe loader)."""
        try:
            data = safe_load_no_aliases(text)  # aliases could be a YAML bomb
        except yaml.YAMLError as err:
            raise ConfigError(f"quant config is not valid YAML: {err}") from err
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the config atomically; ``.json`` gives JSON, anything else YAML."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            text = self.to_yaml()
        atomic_write_text(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> QuantConfig:
        """Read a config written by `save` (or by hand); JSON or YAML by extension."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read quant config {str(path)!r}: {err}") from err
        if path.suffix.lower() == ".json":
            try:
                return cls.from_dict(json.loads(text))
            except json.JSONDecodeError as err:
                raise ConfigError(f"quant config {str(path)!r} is not valid JSON: {err}") from err
        try:
            return cls.from_yaml(text)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
