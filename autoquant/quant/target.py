"""Deploy targets: the integer arithmetic of the CPU the exported model will run on.

The searched fake-quant model must compute what the deployed integer graph computes.
onnxruntime's u8×s8 kernels on x86 CPUs *without* VNNI (AVX2 and AVX-512 without VNNI)
multiply with ``VPMADDUBSW``, which sums two u8·s8 products into a saturating int16: with a
full int8 weight range (|w| up to 128) two products of a large activation overflow and the
layer output is silently wrong. With |w| ≤ 64 the pair sum stays below 2·255·64 = 32640
and nothing can saturate, so on that target signed 8-bit weights use the 7-bit range
[-64, 63] (the ``reduce_range`` onnxruntime and PyTorch's fbgemm use for the same reason).
VNNI (``VPDPBUSD``), ARM (``SDOT``/``SMULL``) and the reference kernels accumulate in
int32 and are exact.

=============  ===========================================================================
target         integer arithmetic
=============  ===========================================================================
``auto``       this CPU (resolved once, when the model is wrapped)
``x86_vnni``   x86 with AVX-512 VNNI or AVX-VNNI: exact int32 accumulation
``x86_avx2``   x86 without VNNI: 8-bit signed weights at 7 bits (cannot saturate; also
               exact on every other CPU, so it is the portable choice)
``arm``        ARM (NEON dot products): exact
``reference``  exact integer arithmetic (onnxruntime with optimizations off)
=============  ===========================================================================
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

__all__ = [
    "TARGETS",
    "host_target",
    "resolve_target",
    "deploy_weight_bits",
    "runs_exactly_on",
]

logger = logging.getLogger(__name__)

TARGETS = ("auto", "x86_vnni", "x86_avx2", "arm", "reference")
_EXACT = ("x86_vnni", "arm", "reference")


@functools.lru_cache(maxsize=1)
def host_target() -> str:
    """The target of this CPU: ``x86_vnni``, ``x86_avx2``, ``arm`` or ``reference``.

    x86 flags are read from ``/proc/cpuinfo``; where it cannot be read (macOS, Windows) an
    x86 CPU is taken as ``x86_avx2``, which is exact on every CPU (the safe side).
    """
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "x86_avx2"
        flags: set[str] = set()
        for line in text.splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
        return "x86_vnni" if flags & {"avx512_vnni", "avx_vnni"} else "x86_avx2"
    if machine.startswith(("arm", "aarch64")):
        return "arm"
    return "reference"


def resolve_target(target: str) -> str:
    """`target` itself, or this CPU's target for ``"auto"``."""
    return host_target() if target == "auto" else target


def deploy_weight_bits(bits: int, symmetric: bool, target: str) -> int:
    """The weight bit width the deployed kernel computes exactly for a `bits`-bit weight.

    Only signed 8-bit weights on ``x86_avx2`` change (to 7 bits, see the module docstring):
    unsigned weights run through onnxruntime's exact u8×u8 kernel, narrower weights cannot
    saturate, and wider ones run no integer kernel at all.
    """
    if target == "x86_avx2" and symmetric and bits == 8:
        return 7
    return bits


def runs_exactly_on(target: str, host: str | None = None) -> bool:
    """True when a model searched for `target` computes on `host` (default: this CPU) what
    it computed in the search: every target on an exact CPU, and ``x86_avx2`` everywhere."""
    host = host_target() if host is None else host
    return target == "x86_avx2" or host in _EXACT
