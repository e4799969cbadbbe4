"""Binary search over the sensitivity ranking (AMCT's strategy, without re-calibration),
with optional refinement.

Evaluate the fully quantized model; if it fails, find the smallest k such that falling back
the k most sensitive layers passes, assuming the pass/fail outcome is monotone in k. The
k range [1, N] plus "none passes" is N+1 outcomes, so at most ceil(log2(N+1)) further
evaluations. Every accepted k was evaluated (no extrapolated result). With
``context.workers = w > 1`` each round probes w split points at once (a (w+1)-ary search).

Refinement (``refine=True`` or a number of evaluations) then tries to re-quantize each
fallen-back layer alone, most similar to float first (highest sensitivity score), keeping
every move that still passes. It only ever moves from a passing plan to another passing
plan with one more layer quantized, so the result is never worse than plain binary.
If the bisection sees a pass at k and a fail at some k' > k (the ranking is not monotone
for this evaluator), refinement runs even if it was not asked for: the prefix answer is not
to be trusted as minimal.

When the bisection would answer "every layer falls back" (only the float model passes),
it does not say so before it has tried the best single layers: up to ``rescue`` (3)
refinement evaluations re-quantize the layers one at a time, least sensitive first. The
bisection only ever tried the least sensitive layer alone, and a misleading ranking can
put a harmless layer anywhere; a layer that passes alone stays quantized.
"""

from __future__ import annotations

import logging
import math

from autoquant.errors import ConfigError
from autoquant.plan import QuantPlan, plan_key
from autoquant.search.strategy import SearchContext, SearchStrategy, TrialRecord
from autoquant.strategies._bisect import Bisection

__all__ = ["BinarySearchStrategy"]

logger = logging.getLogger(__name__)


class BinarySearchStrategy(SearchStrategy):
    """Smallest k worst-ranked fallbacks that pass, by bisection; then optional refinement.

    Args:
        refine: False (plain binary), True (try every fallback layer once) or an int, the
            most refinement evaluations to spend.
        verify: after the bisection, also evaluate k+1 fallbacks: a fail there exposes a
            non-monotone ranking (which then triggers refinement). One extra evaluation.
        rescue: the most refinement evaluations spent before answering "all float" when
            `refine` is off (0: answer at once).
    """

    name = "binary"

    def __init__(self, refine: bool | int = False, verify: bool = False,
                 rescue: int = 3) -> None:
        if not isinstance(refine, (bool, int)) or (not isinstance(refine, bool) and refine < 0):
            raise ConfigError(f"refine must be a bool or an int >= 0, got {refine!r}")
        if not isinstance(verify, bool):
            raise ConfigError(f"verify must be a bool, got {verify!r}")
        if isinstance(rescue, bool) or not isinstance(rescue, int) or rescue < 0:
            raise ConfigError(f"rescue must be an int >= 0 (evaluations), got {rescue!r}")
        super().__init__(refine=refine, verify=verify, rescue=rescue)
        self.refine = refine
        self.verify = verify
        self.rescue = rescue

    def setup(self, context: SearchContext) -> None:
        super().setup(context)
        self.n = len(context.ranking)
        self.phase = "first"
        self.search = Bisection(0, self.n + 1)
        self.best_k: int | None = None
        self.violations: list[tuple[int, int]] = []
        self._asked: dict[str, int] = {}
        self._current: list[str] = []  # fallback layers of the best passing plan (refinement)
        self._todo: list[str] = []
        self._refine_left = 0
        self._pending = 0
        self._known: dict[str, bool] = {}

    def estimate(self) -> int:
        width = self.context.workers if self.context else 1
        rounds = math.ceil(math.log(self.n + 1, width + 1)) if self.n else 0
        if self.refine:
            extra = self.n if self.refine is True else int(self.refine)
        else:  # the rescue, when the answer would be "float only"
            extra = min(self.rescue, max(self.n - 1, 0))
        return 1 + rounds * width + (1 if self.verify else 0) + extra

    def _plan(self, k: int) -> QuantPlan:
        assert self.context is not None
        plan = self.context.plan(fallback=self.context.ranking[:k])
        self._asked[plan_key(plan)] = k
        return plan

    def _start_refinement(self) -> None:
        assert self.context is not None and self.best_k is not None
        forced = bool(self.violations) and not self.refine
        rescue = not self.refine and not forced and self.best_k == self.n and self.n > 0 \
            and self.rescue > 0
        if not self.refine and not forced and not rescue:
            self.phase = "done"
            return
        self._current = list(self.context.ranking[:self.best_k])
        # most similar to float first: the fallen-back layers in reverse ranking order
        self._todo = list(reversed(self._current))
        self._refine_left = len(self._todo) if self.refine is True or forced else \
            self.rescue if rescue else int(self.refine)
        if forced:
            logger.warning("non-monotone pass/fail %s: refining the binary result",
                           self.violations)
        if rescue:
            logger.info("every layer fell back: trying up to %d layer(s) re-quantized one at "
                        "a time before answering 'float only'", self.rescue)
        self.phase = "refine"

    def ask(self) -> list[QuantPlan]:
        assert self.context is not None
        if self.phase == "first":
            return [self._plan(0)]
        if self.phase == "bisect":
            points = self.search.points(self.context.workers)
            if not points:
                self._finish_bisection()
                return self.ask()
            self._pending = len(points)
            return [self._plan(k) for k in points]
        if self.phase == "verify":
            return [self._plan(self.best_k + 1)]
        if self.phase == "refine":
            while self._todo and self._refine_left > 0:
                layer = self._todo.pop(0)
                plan = self.context.plan(fallback=[n for n in self._current if n != layer])
                known = self._known.get(plan_key(plan))
                if known is None:
                    self._refine_left -= 1
                    self._candidate = layer
                    return [plan]
                if known:  # already evaluated (e.g. a bisection prefix): no budget spent
                    self._current.remove(layer)
            self.phase = "done"
        return []

    def tell(self, plan: QuantPlan, record: TrialRecord) -> None:
        self._known[plan_key(plan)] = record.passed
        if self.phase == "first":
            if record.passed:
                self.best_k, self.phase = 0, "done"
            else:
                self.search.update(0, False)
                self.phase = "bisect"
            return
        if self.phase == "refine":
            if record.passed:
                self._current.remove(self._candidate)
            return
        k = self._asked[plan_key(plan)]
        self.search.update(k, record.passed)
        for pair in self.search.violations:
            if pair not in self.violations:
                self.violations.append(pair)
        if self.phase == "verify":
            self._start_refinement()
            return
        self._pending -= 1
        if self._pending == 0 and self.search.done:
            self._finish_bisection()

    def _finish_bisection(self) -> None:
        if self.search.hi > self.n:
            self.phase = "done"  # nothing passes, not even every layer fallen back
            return
        self.best_k = self.search.hi
        if self.verify and self.best_k < self.n and \
                self.best_k + 1 not in self.search.passes | self.search.fails:
            self.phase = "verify"
        else:
            self._start_refinement()
