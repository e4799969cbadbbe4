"""Safe YAML loading with line numbers and no alias expansion (for job files).

`load_yaml_with_lines` parses with a `yaml.SafeLoader` subclass that refuses aliases
(``*name``): an alias is how a "billion laughs" YAML bomb expands a few hundred bytes into
gigabytes, and a job file never needs one. Besides the data it returns a map from key paths
(tuples of keys and list indices) to 1-based line numbers, so validation errors can point
at the exact line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autoquant.errors import ConfigError

__all__ = ["load_yaml_with_lines", "safe_load_no_aliases", "KeyPath", "LineMap"]

KeyPath = tuple[Any, ...]
LineMap = dict[KeyPath, int]

MAX_YAML_BYTES = 1 << 20  # a job file is a few hundred bytes; refuse absurd inputs early


class _NoAliasSafeLoader(yaml.SafeLoader):
    """A SafeLoader that raises on any alias instead of expanding it."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            line = event.start_mark.line + 1
            raise ConfigError(
                f"line {line}: YAML alias *{event.anchor} is not allowed in a job file "
                "(aliases can expand a tiny file into gigabytes, a 'YAML bomb'); write the "
                "value out in full instead of using &anchor / *alias"
            )
        return super().compose_node(parent, index)


def _collect_lines(node: yaml.Node, path: KeyPath, lines: LineMap) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            child = (*path, key)
            _collect_lines(value_node, child, lines)
            lines[child] = key_node.start_mark.line + 1  # point at the key, not the value
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, (*path, i), lines)


def load_yaml_with_lines(path: str | Path) -> tuple[Any, LineMap]:
    """Parse the YAML file `path` safely; return ``(data, lines)``.

    Raises:
        ConfigError: the file cannot be read, is not valid YAML, is too large, or uses an
            alias. The message names the file and the line.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(
                f"{path}: {size} bytes is too large for a job file (limit {MAX_YAML_BYTES})"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read job file {str(path)!r}: {err}") from err
    loader = _NoAliasSafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    finally:
        loader.dispose()
    lines: LineMap = {}
    if node is not None:
        _collect_lines(node, (), lines)
    return data, lines


def safe_load_no_aliases(text: str) -> Any:
    """`yaml.safe_load` that refuses aliases (a YAML bomb) with a ConfigError naming the line.

    Raises:
        ConfigError: an alias is used.
        yaml.YAMLError: the text is not valid YAML.
    """
    loader = _NoAliasSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
