"""`SearchSettings`: how a search runs, in one typed object validated once.

`auto_quantize` takes it (or its fields as keyword overrides), the job file's ``search:``
section is its YAML form (key for key), the journal fingerprints the fields that change
what a trial record means, and `SearchResult.settings` and the report carry it. Unknown
keys are errors naming the valid ones; `strategy_options` are checked against the
strategy's own constructor, with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from autoquant.errors import ConfigError, did_you_mean
from autoquant.evaluation.criterion import AccuracyCriterion, LossType

__all__ = ["SearchSettings", "SETTINGS_VERSION", "SettingError"]

SETTINGS_VERSION = 1
_MAX_SECONDS = min(threading.TIMEOUT_MAX, 1e9)


class SettingError(ConfigError):
    """A bad search setting; `key` names it (dotted, e.g. ``strategy_options.refin``)."""

    def __init__(self, key: str, message: str, text: str | None = None) -> None:
        super().__init__(text or f"{key} {message}")
        self.key = key
        self.message = message


def _check_seconds(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value) or value <= 0:
        raise SettingError(key, f"must be a number of seconds > 0 or None (no limit), "
                                f"got {value!r}")
    if value > _MAX_SECONDS:  # a thread cannot wait that long (OverflowError)
        raise SettingError(key, f"must be at most {_MAX_SECONDS:.0f} seconds (about "
                                f"{_MAX_SECONDS / 3.15e7:.0f} years), got {value!r}; use None "
                                "for no limit")
    return float(value)


def _check_int(key: str, value: Any, low: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingError(key, f"must be an int >= {low} ({what}), got {value!r}")
    return value


@dataclass
class SearchSettings:
    """Everything that says how a search runs (the quantization itself is `QuantConfig`).

    Attributes:
        version: the schema version (1).
        max_loss: the accepted loss: metric units (``absolute``) or a fraction of the float
            metric (``relative``).
        loss_type: ``"absolute"`` or ``"relative"``.
        strategy: a registered strategy name (``"binary"``), or in Python a
            `SearchStrategy` class or instance.
        strategy_options: keyword options of the strategy's constructor.
        sensitivity: a registered sensitivity metric name (``"cosine"``) or class.
        sensitivity_scope: where the metric compares float and quantized: ``"auto"`` (the
            default: ``"subset"`` where the evaluator has ``evaluate_subset`` (not marked
            ``default_ranking = False``), else
            ``"output"`` where it has ``sensitivity_output``, else
            ``"gradient"``, or ``"layer"`` where the model has no gradient or `dump_dir` is
            set), ``"layer"`` (each layer's own output, one calibration
            pass), ``"gradient"`` (that error carried to the model's output by the float
            model's gradient, one pass with a backward; `autoquant.sensitivity.gradient`),
            ``"output"`` (the model's output with one layer quantized at a time, N + 1
            passes) or ``"subset"`` (the
            evaluator's ``evaluate_subset`` on each single-layer plan, N + 1 cheap calls);
            see `autoquant.sensitivity.output`.
        sensitivity_fraction: the share of the calibration rows (0 < f <= 1) the gradient
            scope runs first; the other rows run only if the ranking from those has not
            settled (`autoquant.sensitivity.sampling`). 1.0 runs every row at once.
        max_evaluations: a budget on evaluator calls, the float baseline included (>= 2),
            or None.
        max_seconds: wall-time budget of the whole call: no new evaluation starts after it;
            the float baseline always runs.
        eval_timeout: seconds one ``evaluate`` may take (None: no limit, and ``evaluate``
            runs in the calling thread).
        workers: evaluate up to this many independent plans of each strategy step at once
            (1: in this process, unless `executor` is set).
        executor: where trials run: None (this process, or ``workers`` local processes),
            ``"local"``, a Dask scheduler address ``"dask://HOST:PORT"``, ``"ray"``, or in
            Python any `concurrent.futures.Executor` or a ``distributed.Client``; see
            `autoquant.search.engines`.
        holdout: re-check the final plan with ``evaluate_holdout`` (None: if the evaluator
            has it; True: required; False: never).
        audit: evaluate the `audit` worst-ranked layers alone quantized after the search and
            report Spearman's rho of the ranking (these evaluations count).
        check_determinism: evaluate the float model twice and compare (one extra call).
        verify_deploy: score the chosen plan's ONNX export in onnxruntime before reporting
            ``met``; a plan that misses the budget there is failed and the search goes on.
        deploy_options: `autoquant.export.export_onnx` keyword options for that export.

    Example:
        >>> SearchSettings(max_loss=0.01, strategy="binary", strategy_options={"refine": 2})
    """

    version: int = SETTINGS_VERSION
    max_loss: float = 0.01
    loss_type: LossType = "absolute"
    strategy: Any = "binary"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    sensitivity: Any = "cosine"
    sensitivity_scope: str = "auto"
    sensitivity_fraction: float = 0.25
    max_evaluations: int | None = None
    max_seconds: float | None = None
    eval_timeout: float | None = None
    workers: int = 1
    executor: Any = None
    holdout: bool | None = None
    audit: int = 0
    check_determinism: bool = False
    verify_deploy: bool = False
    deploy_options: dict[str, Any] = field(default_factory=dict)

    # settings that do not change what a finished trial record means: a resumed run may
    # change them (budgets, guards, parallelism, checks after the search)
    NOT_FINGERPRINTED: ClassVar[tuple[str, ...]] = (
        "max_evaluations", "max_seconds", "eval_timeout", "workers", "executor", "holdout",
        "audit", "check_determinism")

    def __post_init__(self) -> None:
        if self.version != SETTINGS_VERSION:
            raise SettingError("version", f"{self.version!r} is not supported; this autoquant "
                                          f"reads search settings version {SETTINGS_VERSION}")
        if isinstance(self.max_loss, bool) or not isinstance(self.max_loss, numbers.Real):
            raise SettingError("max_loss", f"must be an integer or a number, got "
                                           f"{type(self.max_loss).__name__} {self.max_loss!r:.60}")
        try:
            AccuracyCriterion(self.max_loss, self.loss_type)
        except ConfigError as err:
            key = "loss_type" if "loss_type" in str(err) else "max_loss"
            raise SettingError(key, str(err).removeprefix(f"{key} ")) from None
        self.max_loss = float(self.max_loss)
        if self.max_evaluations is not None:
            _check_int("max_evaluations", self.max_evaluations, 2,
                       "the float baseline and at least one quantized trial; None: no limit")
        self.max_seconds = _check_seconds("max_seconds", self.max_seconds)
        self.eval_timeout = _check_seconds("eval_timeout", self.eval_timeout)
        _check_int("workers", self.workers, 1, "1 evaluates in this process")
        self._check_executor()
        _check_int("audit", self.audit, 0, "layers to audit")
        for key in ("check_determinism", "verify_deploy"):
            if not isinstance(getattr(self, key), bool):
                raise SettingError(key, f"must be true or false, got {getattr(self, key)!r}")
        if self.holdout is not None and not isinstance(self.holdout, bool):
            raise SettingError("holdout", f"must be None, True or False, got {self.holdout!r}")
        for key in ("strategy_options", "deploy_options"):
            if not isinstance(getattr(self, key), Mapping):
                raise SettingError(key, f"must be a mapping of keyword options, got "
                                        f"{getattr(self, key)!r:.60}")
            setattr(self, key, dict(getattr(self, key)))
        self._check_strategy()
        self._check_sensitivity()

    def _check_strategy(self) -> None:
        from autoquant.search.strategy import STRATEGIES, SearchStrategy

        if isinstance(self.strategy, SearchStrategy):
            if self.strategy_options:
                raise SettingError("strategy_options", "must be empty for a strategy instance; "
                                                       "pass its class or name instead")
            return
        if isinstance(self.strategy, str):
            try:
                cls = STRATEGIES.resolve(self.strategy)
            except ConfigError as err:
                raise SettingError("strategy", f"names an {err}") from None
        else:
            cls = self.strategy
        if not (isinstance(cls, type) and issubclass(cls, SearchStrategy)):
            raise SettingError("strategy", f"must be a strategy name, a SearchStrategy class "
                                           f"or instance, got {self.strategy!r:.60}")
        _check_options(cls, self.strategy_options)

    def _check_executor(self) -> None:
        from autoquant.search.engines import check_executor

        try:
            check_executor(self.executor)
        except ConfigError as err:
            raise SettingError("executor", str(err).removeprefix("executor ")) from None

    def _check_sensitivity(self) -> None:
        from autoquant.sensitivity.output import SCOPES
        from autoquant.sensitivity.ranking import SENSITIVITY_METRICS, SensitivityMetric

        if isinstance(self.sensitivity, str):
            try:
                SENSITIVITY_METRICS.resolve(self.sensitivity)
            except ConfigError as err:
                raise SettingError("sensitivity", f"names an {err}") from None
        elif not (isinstance(self.sensitivity, type)
                  and issubclass(self.sensitivity, SensitivityMetric)):
            raise SettingError("sensitivity", f"must be a metric name or a SensitivityMetric "
                                              f"class, got {self.sensitivity!r:.60}")
        fraction = self.sensitivity_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or \
                not 0.0 < fraction <= 1.0:
            raise SettingError("sensitivity_fraction", f"must be a number in (0, 1], the share "
                                                       f"of calibration rows, got {fraction!r:.40}")
        if self.sensitivity_scope not in SCOPES:
            raise SettingError("sensitivity_scope", "must be 'auto', 'layer' (each layer's "
                               "own output), 'gradient' (its estimate at the model's output), "
                               "'output' (the model's) or 'subset' (the evaluator's "
                               f"evaluate_subset), got {self.sensitivity_scope!r:.40}")

    # -- derived -----------------------------------------------------------------------------
    def make_strategy(self) -> Any:
        """A fresh strategy object (the instance itself when one was given)."""
        from autoquant.search.strategy import STRATEGIES, SearchStrategy

        if isinstance(self.strategy, SearchStrategy):
            return self.strategy
        cls = STRATEGIES.resolve(self.strategy) if isinstance(self.strategy, str) \
            else self.strategy
        return cls(**self.strategy_options)

    def criterion(self, higher_is_better: bool) -> AccuracyCriterion:
        """The accuracy criterion for an evaluator whose metric goes that way."""
        return AccuracyCriterion(self.max_loss, self.loss_type, higher_is_better)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, the keys of the job file's ``search:`` section (a strategy or
        metric given as a class or instance is written as its name)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["strategy"] = _name_of(self.strategy)
        out["sensitivity"] = _name_of(self.sensitivity)
        out["executor"] = None if self.executor is None else _name_of(self.executor)
        out["strategy_options"] = dict(self.strategy_options)
        out["deploy_options"] = dict(self.deploy_options)
        return out

    def fingerprint(self) -> dict[str, Any]:
        """The settings a journal's records depend on (`NOT_FINGERPRINTED` left out)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_FINGERPRINTED}

    @classmethod
    def from_dict(cls, data: Any) -> SearchSettings:
        """Build from a mapping (a job file's ``search:`` section), rejecting unknown keys."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"search settings must be a mapping, got {data!r:.60}")
        _refuse_unknown(data, [f.name for f in dataclasses.fields(cls)])
        return cls(**dict(data))

    def replace(self, **overrides: Any) -> SearchSettings:
        """A copy with `overrides` (field names; unknown ones are errors)."""
        _refuse_unknown(overrides, sorted(f.name for f in dataclasses.fields(self)))
        return dataclasses.replace(self, **overrides)


def _refuse_unknown(keys: Iterable[Any], valid: list[str]) -> None:
    """A SettingError for the first of `keys` that is not in `valid` (listed in that order)."""
    for key in keys:
        if key not in valid:
            hint = did_you_mean(key, valid)
            raise SettingError(
                str(key), f"unknown key{hint}; valid keys: {', '.join(valid)}",
                f"unknown search setting {key!r}{hint}; valid: {', '.join(valid)}")


def _name_of(value: Any) -> Any:
    if isinstance(value, str):
        return value
    name = getattr(value, "name", "") or ""
    return name or (value.__name__ if isinstance(value, type) else type(value).__name__)


def _check_options(cls: type, options: Mapping[str, Any]) -> None:
    """`options` must be keyword arguments of ``cls.__init__``."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n != "self"
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in valid:
            hint = did_you_mean(str(key), valid)
            raise SettingError(f"strategy_options.{key}",
                               f"is not an option of {cls.__name__}{hint}; its options: "
                               f"{', '.join(valid) or 'none'}")
