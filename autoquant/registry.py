"""Name → plug-in registries: one explicit table each, plus an entry-point group.

Tables hold ``"module:attr"`` import paths, so the core imports a concrete strategy or
metric only when a user asks for it by name. Third-party plug-ins register in code
(`Registry.register`) or through the entry-point group named by the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from autoquant.errors import ConfigError, did_you_mean

__all__ = ["Registry", "import_object"]

T = TypeVar("T")


def import_object(path: str, what: str = "object") -> Any:
    """Import ``"package.module:attr"`` (attr may be dotted); ConfigError if it fails."""
    if not isinstance(path, str) or ":" not in path:
        raise ConfigError(
            f"{what} import path must look like 'package.module:name', got {path!r}"
        )
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import module {module_name!r} for {what} {path!r}: {err}") \
            from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            raise ConfigError(
                f"module {module_name!r} has no attribute {attr!r} (for {what} {path!r})"
            ) from err
    return obj


class Registry(Generic[T]):
    """A table of named plug-ins, resolved lazily by import path."""

    def __init__(
        self,
        kind: str,
        table: Mapping[str, str],
        entry_point_group: str,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self._table: dict[str, str | T] = dict(table)
        self._group = entry_point_group
        self._aliases = dict(aliases or {})

    def register(self, name: str, obj: T) -> None:
        """Add or replace the plug-in `name`."""
        self._table[name] = obj

    def names(self) -> list[str]:
        """Every available name: the table, then installed entry points."""
        names = list(self._table)
        for ep in entry_points(group=self._group):
            if ep.name not in names:
                names.append(ep.name)
        return names

    def resolve(self, name: str) -> T:
        """The plug-in registered as `name`; ConfigError listing the valid names if none."""
        key = self._aliases.get(name, name)
        if key in self._table:
            entry = self._table[key]
            return import_object(entry, self.kind) if isinstance(entry, str) else entry
        for ep in entry_points(group=self._group):
            if ep.name == key:
                return ep.load()
        valid = self.names()
        hint = did_you_mean(str(name), valid)
        raise ConfigError(
            f"unknown {self.kind} {name!r}{hint}; available: {', '.join(valid)}"
        )
