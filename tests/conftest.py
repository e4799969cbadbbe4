"""Suite-wide test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The suite runs tiny models: one thread avoids OpenMP spin-waits and is far faster
    # on a busy 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _build_the_onnx_op_registry_once() -> None:
    """``torch.onnx.export`` rebuilds its table of ~500 ATen-to-ONNX translations on every
    call, parsing each one's source (about 2 s of a 2.5 s export of a tiny model). The
    table is the same for every export of a process, so the suite builds it once per opset
    and gives every export its own copy (the export adds autoquant's QDQ ops to the copy).
    The exports themselves are unchanged; only torch's table-building is skipped. If torch
    moves this internal, the suite just runs slower."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return
    registry_class = getattr(_registration, "ONNXRegistry", None)
    original = getattr(registry_class, "from_torchlib", None)
    if original is None or not hasattr(registry_class(), "functions"):
        return
    built: dict[tuple, object] = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = original.__func__(cls, *args, **kwargs)
        copy = cls.__new__(cls)
        copy.__dict__.update(built[key].__dict__)
        copy.functions = {op: list(metas) for op, metas in built[key].functions.items()}
        return copy

    registry_class.from_torchlib = classmethod(from_torchlib)


_build_the_onnx_op_registry_once()
