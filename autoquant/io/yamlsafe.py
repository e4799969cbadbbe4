"""Safe YAML loading with line numbers and no alias expansion (for job files).

`load_yaml_with_lines` parses with a `yaml.SafeLoader` subclass that refuses aliases
(``*name``): an alias is how a "billion laughs" YAML bomb expands a few hundred bytes into
gigabytes, and a job file never needs one. It also refuses nesting deeper than
`MAX_YAML_DEPTH` (PyYAML composes recursively, so 200,000 ``[`` would otherwise end in a
``RecursionError``). Besides the data it returns a map from key paths (tuples of keys and
list indices) to 1-based line numbers, so validation errors can point at the exact line.
The file is read through `autoquant.io.reading` (size limit, UTF-8 with a clear error).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from autoquant.errors import ConfigError
from autoquant.io.reading import read_text_file

__all__ = ["load_yaml_with_lines", "safe_load_no_aliases", "KeyPath", "LineMap",
           "MAX_YAML_BYTES", "MAX_YAML_DEPTH"]

KeyPath = tuple[Any, ...]
LineMap = dict[KeyPath, int]

MAX_YAML_BYTES = 1 << 20  # a job file is a few hundred bytes; refuse absurd inputs early
MAX_YAML_DEPTH = 100  # a job or quant config is < 10 levels deep; far below the recursion limit


class _NoAliasSafeLoader(yaml.SafeLoader):
    """A SafeLoader that raises on any alias instead of expanding it, and on nesting deeper
    than `MAX_YAML_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self._depth >= MAX_YAML_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise ConfigError(
                f"line {line}: the YAML nests deeper than {MAX_YAML_DEPTH} levels; a job file "
                "or quant config is a few levels deep. Is this the right file?"
            )
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            line = event.start_mark.line + 1
            raise ConfigError(
                f"line {line}: YAML alias *{event.anchor} is not allowed in a job file "
                "(aliases can expand a tiny file into gigabytes, a 'YAML bomb'); write the "
                "value out in full instead of using &anchor / *alias"
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# YAML 1.1 (PyYAML) reads ``1e-3`` as the string "1e-3": a float needs a dot there. A user
# writing a loss budget means the number, as YAML 1.2 and JSON read it.
_NoAliasSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse(text: str) -> tuple[Any, yaml.Node | None]:
    """Compose and construct the single document of `text`: ``(data, node)``.

    The loader checks every character when it is built (a NUL is a ``ReaderError``), so it
    is built here, where every caller handles `yaml.YAMLError`. A scalar the safe
    constructor cannot convert (``2001-02-30``, ``!!int x``) raises a plain ValueError or
    TypeError inside PyYAML; it is re-raised as a `yaml.YAMLError` too.
    """
    loader = _NoAliasSafeLoader(text)
    try:
        node = loader.get_single_node()
        try:
            data = loader.construct_document(node) if node is not None else None
        except ConfigError:
            raise
        except (ValueError, TypeError, OverflowError) as err:
            mark = getattr(node, "start_mark", None)
            raise yaml.constructor.ConstructorError(
                None, None, f"a value cannot be read ({type(err).__name__}: {err})", mark
            ) from err
    finally:
        loader.dispose()
    return data, node


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
        ConfigError: the file cannot be read, is not UTF-8, is not valid YAML, is too
            large, nests too deep, or uses an alias. The message names the file and the line.
    """
    path = Path(path)
    text = read_text_file(path, "job file", max_bytes=MAX_YAML_BYTES)
    try:
        data, node = _parse(text)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    lines: LineMap = {}
    if node is not None:
        _collect_lines(node, (), lines)
    return data, lines


def safe_load_no_aliases(text: str) -> Any:
    """`yaml.safe_load` that refuses aliases (a YAML bomb) with a ConfigError naming the line.

    Raises:
        ConfigError: an alias is used, or the nesting is deeper than `MAX_YAML_DEPTH`.
        yaml.YAMLError: the text is not valid YAML (a value the safe constructor cannot
            convert included).
    """
    return _parse(text)[0]
