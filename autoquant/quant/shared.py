"""Shared modules: one module object reachable under several names or called several times.

A reused block is one object. autoquant wraps it once (under its first
qualified name, the canonical one), installs the same wrapper at every alias, and so gives
it one scheme and one set of qparams calibrated over all its call sites. The aliases and
the calls per forward pass are recorded in the ranking and the report's layer table.

Different modules that share a parameter (an embedding tied to the output decoder) are not
one object: each is its own unit. `layers_sharing_parameters` finds them so the report can
say so (with the same scheme and axis their fake-quant weights are identical).
"""

from __future__ import annotations

from torch import nn

__all__ = ["module_aliases", "layers_sharing_parameters"]


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


def layers_sharing_parameters(modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """``{layer: [other layers holding one of its parameters]}`` for tied weights.

    Args:
        modules: the (unwrapped) module of each layer, by name.

    Example:
        >>> emb, dec = nn.Embedding(10, 4), nn.Linear(4, 10)
        >>> dec.weight = emb.weight
        >>> layers_sharing_parameters({"emb": emb, "dec": dec})
        {'emb': ['dec'], 'dec': ['emb']}
    """
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        for param in module.parameters():
            holders = owners.setdefault(id(param), [])
            if name not in holders:
                holders.append(name)
    tied: dict[str, list[str]] = {}
    for holders in owners.values():
        for name in holders:
            for other in holders:
                if other != name and other not in tied.setdefault(name, []):
                    tied[name].append(other)
    return {n: others for n, others in tied.items() if others}
