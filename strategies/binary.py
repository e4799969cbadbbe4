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
plan with one more layer quantized, so the result is never worse than plain binary. A
layer whose re-quantization already failed (a bisection prefix) is not tried again.
If the bisection sees a pass at k and a fail at some k' > k (the ranking is not monotone
for this evaluator), refinement runs even if it was not asked for: the prefix answer is not
to be trusted as minimal.

When the bisection would answer "every layer falls back" (only the float model passes),
it does not say so before it has tried the best single layers: up to ``rescue`` (3)
refinement evaluations re-quantize the layers one at a time. The bisection only ever tried
the least sensitive layer alone, and a misleading ranking can put a harmless layer
anywhere; a layer that passes alone stays quantized.

The bisection's own losses also say where the ranking misleads. Between two evaluated
prefixes k < k', falling back the layers ``ranking[k:k']`` should lower the loss; when it
does not (the loss at k' is no lower than at k), those layers are harmless to re-quantize as
far as the evaluator can tell, and the ranking was wrong to put them first. Up to
``notice`` (2) refinement evaluations then re-quantize fallen-back layers before the search
answers. A ranking measured at the model's output (the gradient scope) also brings a
second opinion from the same pass, each layer's own output error: a fallen-back layer that
it does not rank among its best_k most sensitive is disputed. With no loss evidence beside
it, a dispute spends one evaluation on re-quantizing a disputed layer and one more for each
that passes, up to ``notice``. Every refinement tries the layers in the order of the
evidence: the least loss gained per layer fallen back first (a span's gain split evenly
over its layers); ties least sensitive by the ranking and the second opinion together
(the sum of the two ranks), then most similar to float first. The rescue tries each layer
alone in a float model, where the ranking was measured, while each span's gain was
measured beside other quantized layers, with which it can interact: there the three
witnesses count alike, the layers tried first being least sensitive by the sum of their
ranks by the ranking, the second opinion and the gain per layer.
"""

from __future__ import annotations

import logging
import math

from autoquant.errors import ConfigError
from autoquant.plan import QuantPlan, plan_key
from autoquant.search.strategy import SearchContext, SearchStrategy, TrialRecord
from autoquant.search.trust import disputed_fallbacks, local_ranks, prefix_spans
from autoquant.sensitivity.ranking import average_ranks
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
        notice: the most refinement evaluations spent, when `refine` is off, after a span
            of fallbacks that did not lower the loss or on a disputed fallback (0: never).
    """

    name = "binary"

    def __init__(self, refine: bool | int = False, verify: bool = False,
                 rescue: int = 3, notice: int = 2) -> None:
        if not isinstance(refine, (bool, int)) or (not isinstance(refine, bool) and refine < 0):
            raise ConfigError(f"refine must be a bool or an int >= 0, got {refine!r}")
        if not isinstance(verify, bool):
            raise ConfigError(f"verify must be a bool, got {verify!r}")
        for key, value in (("rescue", rescue), ("notice", notice)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key} must be an int >= 0 (evaluations), got {value!r}")
        super().__init__(refine=refine, verify=verify, rescue=rescue, notice=notice)
        self.refine = refine
        self.verify = verify
        self.rescue = rescue
        self.notice = notice

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
        self._grants = 0  # evaluations a passing re-quantization adds (a dispute alone)
        self._pending = 0
        self._known: dict[str, bool] = {}
        self._batch: dict[str, str] = {}
        self._batch_passed: dict[str, bool] = {}
        self._tried: set[str] = set()
        self._joint: list[str] = []  # passing layers of a batch whose union is asked next
        self._losses: dict[int, float] = {}  # evaluated prefix k -> its loss

    def estimate(self) -> int:
        width = self.context.workers if self.context else 1
        rounds = math.ceil(math.log(self.n + 1, width + 1)) if self.n else 0
        if self.refine:
            extra = self.n if self.refine is True else int(self.refine)
        else:  # the rescue (the answer would be "float only") or the notice
            extra = max(min(self.rescue, max(self.n - 1, 0)), min(self.notice, self.n))
        extra *= width  # with workers, a batch's later passes are tried again
        return 1 + rounds * width + (1 if self.verify else 0) + extra

    def _plan(self, k: int) -> QuantPlan:
        assert self.context is not None
        plan = self.context.plan(fallback=self.context.ranking[:k])
        self._asked[plan_key(plan)] = k
        return plan

    def _gains(self) -> dict[str, float]:
        """Loss gained per layer fallen back, for each layer of a span between two evaluated
        prefixes up to the answer (the span's gain split evenly over its layers)."""
        assert self.context is not None and self.best_k is not None
        gains = {}
        upto = {k: loss for k, loss in self._losses.items() if k <= self.best_k}
        for lo, hi in prefix_spans(upto):
            for name in self.context.ranking[lo:hi]:
                gains[name] = (self._losses[lo] - self._losses[hi]) / (hi - lo)
        return gains

    def _start_refinement(self) -> None:
        assert self.context is not None and self.best_k is not None
        forced = bool(self.violations) and not self.refine
        self._current = list(self.context.ranking[:self.best_k])
        gains = self._gains()
        idle = [n for n in self._current if gains.get(n, math.inf) <= 0]
        disputed = [row["layer"] for row in disputed_fallbacks(self.context, self._current)]
        budget = len(self._current) if self.refine is True or forced else int(self.refine)
        rescue = self.rescue if self.best_k == self.n else 0
        if not self.refine and not forced:  # the rescue and the notice
            budget = max(rescue, self.notice if idle or disputed else 0)
        if budget == 0 or not self._current:
            self.phase = "done"
            return
        # only a dispute (no loss evidence): the disputed layers first, one evaluation, and
        # one more for each that passes (a second opinion that was wrong costs one)
        only = set(disputed) if not (self.refine or forced or idle or rescue) else set()
        self._todo = self._refinement_order(gains, only, forced)
        # layers to try (a batch's later passes are tried again for free: workers > 1)
        self._refine_left = 1 if only else budget
        self._grants = budget - 1 if only else 0
        self._tried = set()
        if forced:
            logger.warning("non-monotone pass/fail %s: refining the binary result",
                           self.violations)
        elif not self.refine and self.best_k == self.n and self.rescue:
            logger.info("every layer fell back: trying up to %d layer(s) re-quantized one at "
                        "a time before answering 'float only'", budget)
        elif not self.refine and idle:
            logger.info("falling back %s did not lower the loss: the ranking misleads here; "
                        "trying up to %d layer(s) re-quantized before answering",
                        ", ".join(idle[:5]) + (" ..." if len(idle) > 5 else ""), budget)
        elif not self.refine:
            logger.info("%s fell back, but each layer's own output error ranks it among the "
                        "least sensitive: trying up to %d layer(s) re-quantized before "
                        "answering", ", ".join(disputed[:5]) + (" ..." if len(disputed) > 5
                                                               else ""), budget)
        self.phase = "refine"

    def _refinement_order(self, gains: dict[str, float], first: set[str], forced: bool
                          ) -> list[str]:
        """The fallen-back layers to try re-quantizing, in order: `first` ahead, then the
        least loss gained per layer; ties (and layers without a measured span) least
        sensitive first by the ranking and its second opinion together (the sum of the two
        ranks), then by the ranking alone (reverse ranking order). A layer whose
        re-quantization already failed (a bisection prefix) is left out: with fewer layers
        fallen back later it could only fail again (unless pass/fail was seen not to be
        monotone, `forced`: then every layer is tried)."""
        assert self.context is not None
        rank = {name: i for i, name in enumerate(self.context.ranking)}
        local = local_ranks(self.context)
        opinions = {n: rank[n] + local.get(n, rank[n]) for n in self._current}
        votes = self._rescue_votes(gains, opinions) if self.best_k == self.n else {}
        order = sorted(self._current, key=lambda n: (
            n not in first, -votes.get(n, 0.0), gains.get(n, math.inf), -opinions[n],
            -rank[n]))
        if forced:
            return order
        return [n for n in order if self._known.get(plan_key(self.context.plan(
            fallback=[m for m in self._current if m != n]))) is not False]

    def _rescue_votes(self, gains: dict[str, float], opinions: dict[str, int]
                      ) -> dict[str, float]:
        """How harmless alone each layer looks when every layer fell back: its `opinions`
        (the sum of its ranks by the ranking and by the second opinion, else the ranking
        again; higher: less sensitive) plus its rank by the loss its span gained per layer
        (ties averaged; a layer without a span gets the middle rank).

        A rescue tries each layer alone in a float model, which is where the ranking was
        measured; the spans' gains were measured with other layers quantized beside them,
        where layers interact (PESTO's encoder at W4A4: two layers that each pass alone
        gained more than twice the budget together, and a layer whose span gained the
        least failed alone). So no witness is trusted over the others."""
        spanned = [n for n in opinions if n in gains]
        by_gain = dict(zip(spanned, average_ranks([-gains[n] for n in spanned]), strict=True))
        middle = (len(spanned) - 1) / 2
        return {n: votes + by_gain.get(n, middle) for n, votes in opinions.items()}

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
        if self.phase == "refine" and self._joint:
            return [self.context.plan(
                fallback=[n for n in self._current if n not in self._joint])]
        if self.phase == "refine":
            batch = self._refine_batch(self.context.workers)
            if batch:
                return batch
            self.phase = "done"
        return []

    def _refine_batch(self, width: int) -> list[QuantPlan]:
        """Up to `width` single-layer re-quantizations of the current plan, each judged
        against it. Plans already evaluated cost nothing: a pass is taken at once when the
        batch is empty, else it waits for the batch (taking it would change their base)."""
        assert self.context is not None
        self._batch = {}  # plan key -> the layer it re-quantizes, in asked order
        plans = []
        while self._todo and len(plans) < width and \
                (self._refine_left > 0 or self._todo[0] in self._tried):
            layer = self._todo[0]
            plan = self.context.plan(fallback=[n for n in self._current if n != layer])
            known = self._known.get(plan_key(plan))
            if known and plans:
                break
            self._todo.pop(0)
            if known is None:
                self._refine_left -= layer not in self._tried
                self._tried.add(layer)
                self._batch[plan_key(plan)] = layer
                plans.append(plan)
            elif known:
                self._current.remove(layer)
        self._batch_passed = {}
        return plans

    def tell(self, plan: QuantPlan, record: TrialRecord) -> None:
        self._known[plan_key(plan)] = record.passed
        if self.phase == "first":
            self._losses[0] = record.loss
            if record.passed:
                self.best_k, self.phase = 0, "done"
            else:
                self.search.update(0, False)
                self.phase = "bisect"
            return
        if self.phase == "refine" and self._joint:
            passed, self._joint = self._joint, []
            if record.passed:  # every step one worker takes would pass: take them all
                for layer in passed:
                    self._current.remove(layer)
                self._grant(len(passed))
            else:
                self._current.remove(passed[0])
                self._grant(1)
                self._todo[:0] = passed[1:]
            return
        if self.phase == "refine":
            self._batch_passed[self._batch[plan_key(plan)]] = record.passed
            if len(self._batch_passed) == len(self._batch):
                self._end_refine_batch()
            return
        k = self._asked[plan_key(plan)]
        self._losses[k] = record.loss
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

    def _end_refine_batch(self) -> None:
        """What one worker, trying the batch's layers in order, would keep.

        Fails are dropped (with fewer layers in float a plan can only get worse). One pass
        is taken. Several passes were each judged against the plan before the batch, so
        their union is evaluated next (`_joint`): if it passes, one worker would have taken
        each in turn; if not, the first is taken and the others are tried again.
        """
        passed = [n for n in self._batch.values() if self._batch_passed[n]]
        if len(passed) == 1:
            self._current.remove(passed[0])
            self._grant(1)
        elif passed:
            self._joint = passed

    def _grant(self, passes: int) -> None:
        """After a dispute alone started the refinement: one more evaluation per pass."""
        more = min(passes, self._grants)
        self._refine_left += more
        self._grants -= more

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
