"""`Bisection`: the smallest passing k in an integer range, one or several probes per round.

Shared by the prefix strategies (`binary`, `ladder`). With ``width`` probes per round the
range shrinks by a factor ``width + 1`` per round (a k-ary search), which is how
``workers > 1`` turns into fewer rounds. Outcomes are assumed monotone (a pass at k implies
a pass at every k' > k); a pass below a fail is recorded as a violation, and the search
continues below the smallest pass.
"""

from __future__ import annotations

__all__ = ["Bisection"]


class Bisection:
    """Search the smallest passing k in ``(lo, hi)``.

    Args:
        lo: the largest k known (or assumed) to fail.
        hi: the smallest k known to pass, or one past the range if none is known.
    """

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi
        self._floor = lo
        self.passes: set[int] = set()
        self.fails: set[int] = set()
        self.violations: list[tuple[int, int]] = []

    @property
    def done(self) -> bool:
        """True once no k lies strictly between the known fail and the known pass."""
        return self.hi - self.lo <= 1

    def points(self, width: int = 1) -> list[int]:
        """Up to `width` probes splitting ``(lo, hi)`` into equal parts; [] when done.

        With ``width == 1`` this is the midpoint ``(lo + hi) // 2``.
        """
        gap = self.hi - self.lo
        if gap <= 1:
            return []
        width = max(1, min(width, gap - 1))
        return sorted({self.lo + (i * gap) // (width + 1) for i in range(1, width + 1)})

    def update(self, k: int, passed: bool) -> None:
        """Record the outcome at `k` and narrow the range."""
        if passed:
            self.passes.add(k)
            self.hi = min(self.hi, k)
            bad = sorted(f for f in self.fails if f > k)
        else:
            self.fails.add(k)
            bad = [k] if any(p < k for p in self.passes) else []
        for f in bad:
            p = min(q for q in self.passes if q < f)
            if (p, f) not in self.violations:
                self.violations.append((p, f))
        self.lo = max([f for f in self.fails if f < self.hi], default=self._floor)
