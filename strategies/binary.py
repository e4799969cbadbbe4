"""Binary search over the sensitivity ranking (AMCT's strategy, without re-calibration).

Evaluate the fully quantized model; if it fails, find the smallest k such that falling back
the k most sensitive layers passes, assuming the pass/fail outcome is monotone in k. The
k range [1, N] plus "none passes" is N+1 outcomes, so at most ceil(log2(N+1)) further
evaluations. Every accepted k was evaluated (no extrapolated result).
"""

from __future__ import annotations

import math

from autoquant.plan import QuantPlan, plan_key
from autoquant.strategy import SearchContext, SearchStrategy, TrialRecord

__all__ = ["BinarySearchStrategy"]


class BinarySearchStrategy(SearchStrategy):
    """Smallest k worst-ranked fallbacks that pass, by bisection.

    State: ``lo`` is the largest k known to fail (0 = all quantized), ``hi`` the smallest k
    known to pass (N+1 until one passes).
    """

    name = "binary"

    def setup(self, context: SearchContext) -> None:
        super().setup(context)
        self.n = len(context.ranking)
        self.lo = -1  # -1: the all-quantized plan has not been evaluated yet
        self.hi = self.n + 1
        self.best_k: int | None = None
        self._asked: dict[str, int] = {}

    def estimate(self) -> int:
        return 1 + math.ceil(math.log2(self.n + 1))

    def _plan(self, k: int) -> QuantPlan:
        assert self.context is not None
        plan = self.context.plan(fallback=self.context.ranking[:k])
        self._asked[plan_key(plan)] = k
        return plan

    def ask(self) -> list[QuantPlan]:
        if self.lo == -1:
            return [self._plan(0)]
        if self.hi - self.lo <= 1:
            return []
        return [self._plan((self.lo + self.hi) // 2)]

    def tell(self, plan: QuantPlan, record: TrialRecord) -> None:
        k = self._asked[plan_key(plan)]
        if self.lo == -1:
            if record.passed:
                self.lo, self.hi, self.best_k = 0, 0, 0
            else:
                self.lo = 0
            return
        if record.passed:
            self.hi, self.best_k = k, k
        else:
            self.lo = k
