"""Mixed-precision fallback: a per-layer precision ladder, e.g. int8 -> int16 -> float.

A layer that cannot stay at its quantized scheme does not have to jump to float: an
intermediate rung (``w16a16`` by default) keeps most of the size and speed win, which suits
layers with wide activation ranges. The search is a sequence of prefix bisections over the
sensitivity ranking:

1. which layers must leave their quantized scheme: the smallest k such that the k
   worst-ranked layers at the top rung (float) pass (exactly `binary`);
2. which of those k need float: the smallest j such that the j worst-ranked float and
   the rest of the k at the next rung down pass;
3. and so on down the ladder, each time pushing the least sensitive of the remaining
   layers one rung lower while the plan passes.

Every stage starts from a passing plan and only accepts passing plans, so the result keeps
as many layers quantized as `binary` and never more of them at float. Rungs are explicit
scheme overrides (``w<b>a<b>``), so the ladder works whatever fallback the config sets.
With ``context.workers = w > 1`` every stage probes w split points per round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoquant.errors import ConfigError
from autoquant.plan import FLOAT, QuantPlan, plan_key, scheme_label
from autoquant.search.strategy import SearchContext, SearchStrategy, TrialRecord
from autoquant.strategies._bisect import Bisection

__all__ = ["LadderStrategy"]


class LadderStrategy(SearchStrategy):
    """Search int8 -> intermediate rungs -> float, most sensitive layers highest.

    Args:
        ladder: the intermediate bit widths, ascending (weights and activations alike);
            float is always the top rung. ``[16]`` gives int8 -> int16 -> float; ``[]``
            is plain binary search to float.
    """

    name = "ladder"

    def __init__(self, ladder: Sequence[int] = (16,)) -> None:
        if isinstance(ladder, (str, bytes)) or not isinstance(ladder, Sequence):
            raise ConfigError(f"ladder must be a list of bit widths, e.g. [16], got {ladder!r}")
        bits = list(ladder)
        for b in bits:
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16:
                raise ConfigError(f"ladder bit widths must be ints from 2 to 16, got {b!r}")
        if bits != sorted(set(bits)):
            raise ConfigError(f"ladder must be strictly ascending, e.g. [12, 16], got {bits}")
        super().__init__(ladder=bits)
        self.rungs = [scheme_label(b, b) for b in bits]

    def setup(self, context: SearchContext) -> None:
        super().setup(context)
        self.n = len(context.ranking)
        self.top = len(self.rungs) + 1  # level of float; 0 is the quantized scheme
        self.bounds = dict.fromkeys(range(1, self.top + 1), 0)
        self.stage: int | None = None  # None: finding k (all levels move together)
        self.phase = "first"
        self.search = Bisection(0, self.n + 1)
        self.k = 0
        self._asked: dict[str, int] = {}
        self._pending = 0

    def estimate(self) -> int:
        rounds = math.ceil(math.log2(self.n + 1)) if self.n else 0
        return 1 + rounds * self.top

    def _scheme(self, name: str, level: int) -> str:
        assert self.context is not None
        if level == 0:
            return self.context.quant_schemes[name]
        return FLOAT if level == self.top else self.rungs[level - 1]

    def _plan(self, value: int) -> QuantPlan:
        assert self.context is not None
        bounds = dict(self.bounds)
        if self.stage is None:
            bounds = dict.fromkeys(bounds, value)
        else:
            bounds[self.stage] = value
        plan = {}
        for pos, name in enumerate(self.context.ranking):
            level = max((lvl for lvl, b in bounds.items() if pos < b), default=0)
            plan[name] = self._scheme(name, level)
        self._asked[plan_key(plan)] = value
        return plan

    def ask(self) -> list[QuantPlan]:
        assert self.context is not None
        if self.phase == "first":
            return [self._plan(0)]
        if self.phase == "done":
            return []
        points = self.search.points(self.context.workers)
        if not points:
            self._next_stage()
            return self.ask()
        self._pending = len(points)
        return [self._plan(v) for v in points]

    def tell(self, plan: QuantPlan, record: TrialRecord) -> None:
        if self.phase == "first":
            self.phase = "done" if record.passed else "search"
            self.search.update(0, record.passed)
            return
        self.search.update(self._asked[plan_key(plan)], record.passed)
        self._pending -= 1
        if self._pending == 0 and self.search.done:
            self._next_stage()

    def _next_stage(self) -> None:
        hi = self.search.hi
        if self.stage is None:
            if hi > self.n or hi == 0:
                self.phase = "done"  # nothing passes, or nothing needs to leave int8
                return
            self.k = hi
            self.bounds = dict.fromkeys(self.bounds, hi)
            self.stage = self.top
        else:
            self.bounds[self.stage] = hi
            self.stage -= 1
        if self.stage < 2:
            self.phase = "done"
            return
        start = self.bounds[self.stage + 1] if self.stage < self.top else 0
        # bounds[stage] in [start, k]: k (everything above the next rung down) passes
        self.search = Bisection(start - 1, self.k)
