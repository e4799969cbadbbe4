"""The autoquant exception tree: one root, user errors split from internal ones.

Every message says what was expected, what came, and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "did_you_mean",
    "AutoquantError",
    "UserError",
    "ConfigError",
    "ModelError",
    "EvaluatorError",
    "EvaluatorTimeoutError",
    "OutputError",
    "ExportError",
    "InternalError",
]


class AutoquantError(Exception):
    """Root of every exception autoquant raises on purpose."""


class UserError(AutoquantError):
    """Something the user supplied (config, model, evaluator, files) is wrong."""


class ConfigError(UserError, ValueError):
    """A configuration value, key, file or argument is invalid."""


class ModelError(UserError):
    """The model cannot be quantized as given (no quantizable layer, inputs do not run)."""


class EvaluatorError(UserError):
    """The user's Evaluator raised or returned something that is not a finite number."""


class EvaluatorTimeoutError(EvaluatorError):
    """An evaluation ran longer than the ``eval_timeout`` the user set."""


class OutputError(UserError, OSError):
    """An output file cannot be written (read-only folder, disk full, ...).

    Also an `OSError`, so code that caught the raw OS error keeps working.
    """


class ExportError(UserError):
    """The quantized model cannot be exported (an op or layer the exporter refuses)."""


class InternalError(AutoquantError):
    """A bug in autoquant itself; please report it with the traceback."""


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of `choices` to `word`, or ``""``: the hint
    an "unknown key / name" message carries."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
