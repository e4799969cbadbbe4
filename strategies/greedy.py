"""Greedy fallback: the classic one-by-one baseline.

Evaluate the fully quantized model; while it fails, fall back the next worst-ranked layer
and evaluate again. It finds the same k as `binary` when pass/fail is monotone in k, but
spends k+1 evaluations instead of about log2(N+1); it is kept as the reference the other
strategies are measured against. With ``context.workers = w > 1`` it evaluates the next w
values of k at once and stops at the first pass (same answer, up to w-1 extra evaluations).
"""

from __future__ import annotations

from autoquant.plan import QuantPlan, plan_key
from autoquant.search.strategy import SearchContext, SearchStrategy, TrialRecord

__all__ = ["GreedyStrategy"]


class GreedyStrategy(SearchStrategy):
    """Fall back the worst-ranked layers one at a time until the plan passes."""

    name = "greedy"

    def __init__(self) -> None:
        super().__init__()

    def setup(self, context: SearchContext) -> None:
        super().setup(context)
        self.n = len(context.ranking)
        self.next_k = 0
        self.best_k: int | None = None
        self._asked: dict[str, int] = {}

    def estimate(self) -> int:
        return self.n + 1

    def ask(self) -> list[QuantPlan]:
        assert self.context is not None
        if self.best_k is not None or self.next_k > self.n:
            return []
        plans = []
        for k in range(self.next_k, min(self.n, self.next_k + self.context.workers - 1) + 1):
            plan = self.context.plan(fallback=self.context.ranking[:k])
            self._asked[plan_key(plan)] = k
            plans.append(plan)
        return plans

    def tell(self, plan: QuantPlan, record: TrialRecord) -> None:
        k = self._asked[plan_key(plan)]
        if self.best_k is not None:
            return  # a larger k of the same batch: the first pass already decided
        if record.passed:
            self.best_k = k
        else:
            self.next_k = max(self.next_k, k + 1)
