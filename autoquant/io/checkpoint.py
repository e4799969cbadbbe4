"""Loading a state dict from disk without unpickling code (``weights_only``), with an error
that says what the file holds instead when it is not a state dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autoquant.errors import ModelError

__all__ = ["load_state_dict_file"]


def load_state_dict_file(path: str | Path, what: str) -> Mapping[str, Any]:
    """``torch.load(path, weights_only=True)``, checked to be a state dict.

    Raises:
        ModelError: the file cannot be read safely (e.g. a pickled full model, which could
            run arbitrary code on load), is not a mapping of names to tensors, or is corrupt.
    """
    import pickle

    import torch

    fix = ("save the weights with torch.save(model.state_dict(), path); a pickled full "
           "model is refused because loading it could run arbitrary code")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{what} {str(path)!r} cannot be loaded as a state dict "
                         f"({type(err).__name__}: {first}); {fix}") from err
    if not isinstance(state, Mapping):
        raise ModelError(f"{what} {str(path)!r} holds a {type(state).__name__}, not a state "
                         f"dict (a mapping of parameter names to tensors); {fix}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or
           not (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))]
    if bad:
        nested = [k for k in bad if isinstance(state.get(k), Mapping)]
        hint = (f"; it looks like a training checkpoint: use its {nested[0]!r} entry"
                if nested else "")
        raise ModelError(f"{what} {str(path)!r} is a mapping but not a state dict: entry "
                         f"{bad[0]!r} is not a tensor{hint}; {fix}")
    return state
