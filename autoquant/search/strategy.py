"""The search-strategy interface: strategies propose plans, the core evaluates them.

A strategy never calls the Evaluator: the core's loop asks it for plans (`ask`), evaluates
them through its cache, budget and journal, and reports each outcome (`tell`). Strategies
are registered by name in `STRATEGIES` (an explicit table of import paths) or through the
``autoquant.strategies`` entry-point group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from autoquant.plan import QuantPlan
from autoquant.registry import Registry

__all__ = ["SearchContext", "SearchStrategy", "TrialRecord", "STRATEGIES", "register_strategy"]


@dataclass
class TrialRecord:
    """The outcome of evaluating one plan.

    Attributes:
        index: the evaluation number (0 is the float baseline).
        label: a short description (``"float"``, ``"all quantized"``, ``"fallback k=3"``).
        plan: the plan evaluated, ``{layer: scheme}``.
        fallback_layers: layers not at their quantized scheme, in ranking order.
        metric: the evaluator's metric.
        loss: the loss against the float metric (from the criterion or ``metric_eval``).
        passed: whether the loss is within the budget.
        seconds: wall time of the evaluation.
    """

    index: int
    label: str
    plan: QuantPlan
    fallback_layers: list[str]
    metric: float
    loss: float
    passed: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRecord:
        """Inverse of `to_dict`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class SearchContext:
    """What a strategy knows about the search (read-only).

    Attributes:
        ranking: the searchable layers, most sensitive first.
        scores: each layer's sensitivity score (higher = closer to float).
        quant_schemes: each layer's quantized scheme (e.g. ``"w8a8"``).
        fallback_schemes: each layer's fallback scheme (``"float"`` or e.g. ``"w16a16"``).
        max_evaluations: the budget of evaluations left after the float baseline, or None.
        workers: how many plans the core can evaluate at once.
        options: strategy-specific options from the user.
        params: each layer's parameter count (for effective-bits objectives).
        local_scores: each layer's layer-scope cosine, measured in the same pass when the
            ranking was measured at the model's output (a second opinion); else empty.
    """

    ranking: tuple[str, ...]
    scores: Mapping[str, float]
    quant_schemes: Mapping[str, str]
    fallback_schemes: Mapping[str, str]
    max_evaluations: int | None = None
    workers: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, int] = field(default_factory=dict)
    local_scores: Mapping[str, float] = field(default_factory=dict)

    def plan(self, fallback: Iterable[str] = (), overrides: Mapping[str, str] | None = None
             ) -> QuantPlan:
        """A plan with `fallback` layers at their fallback scheme, the rest quantized;
        `overrides` sets explicit schemes last."""
        back = set(fallback)
        out = {n: (self.fallback_schemes[n] if n in back else self.quant_schemes[n])
               for n in self.ranking}
        out.update(overrides or {})
        return out


class SearchStrategy(ABC):
    """Base class of search strategies (ask/tell).

    Contract: `setup` is called once before the first `ask`. `ask` returns the next plans to
    evaluate (several = independent candidates the core may evaluate in parallel); an empty
    list means the search is finished. `tell` is called once per asked plan, in order, with
    its record (possibly served from the cache). A strategy is deterministic given its
    context, never mutates a plan after asking, and keeps no state outside itself.
    """

    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.context: SearchContext | None = None

    def setup(self, context: SearchContext) -> None:
        """Receive the search context; override to initialise state (call super)."""
        self.context = context

    def estimate(self) -> int | None:
        """The most evaluations this strategy will ask for (after the float one), if known."""
        return None

    @abstractmethod
    def ask(self) -> list[QuantPlan]:
        """The next plans to evaluate; ``[]`` when finished."""

    @abstractmethod
    def tell(self, plan: QuantPlan, record: TrialRecord) -> None:
        """The outcome of one asked plan."""

    def finish(self) -> None:  # noqa: B027 - optional hook
        """Called once when the loop ends (finished or out of budget); release resources."""


STRATEGIES: Registry[type[SearchStrategy]] = Registry(
    "strategy",
    {
        "binary": "autoquant.strategies.binary:BinarySearchStrategy",
        "greedy": "autoquant.strategies.greedy:GreedyStrategy",
        "ladder": "autoquant.strategies.ladder:LadderStrategy",
        "optuna": "autoquant.strategies.optuna_search:OptunaStrategy",
    },
    entry_point_group="autoquant.strategies",
    aliases={"BinarySearch": "binary"},
)


def register_strategy(name: str, strategy: type[SearchStrategy]) -> None:
    """Register a strategy class under `name` (for third-party strategies in code)."""
    STRATEGIES.register(name, strategy)
