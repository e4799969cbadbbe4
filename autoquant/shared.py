"""Shared modules: one module object reachable under several names or called several times.

A weight-tied or reused block is one object. autoquant wraps it once (under its first
qualified name, the canonical one), installs the same wrapper at every alias, and so gives
it one scheme and one set of qparams calibrated over all its call sites. The aliases and
the calls per forward pass are recorded in the ranking and the report's layer table.
"""

from __future__ import annotations

from torch import nn

__all__ = ["module_aliases"]


def module_aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{canonical name: [other qualified names of the same module object]}``.

    The canonical name is the first in ``named_modules()`` order; only modules reachable
    under more than one name are listed. Children of a shared block are shared too.

    Example:
        >>> block = nn.Linear(4, 4)
        >>> module_aliases(nn.Sequential(block, nn.ReLU(), block))
        {'0': ['2']}
    """
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        canonical = first.setdefault(id(module), name)
        if canonical != name:
            aliases.setdefault(canonical, []).append(name)
    return aliases
