"""Search strategies for autoquant, each registered by name in
`autoquant.search.strategy.STRATEGIES`."""

# imported as a top-level `strategies` (the repository folder on sys.path): say so
if __name__ != "autoquant.strategies":
    raise ImportError(
        f"this folder installs as autoquant.strategies, not as a top-level package {__name__!r}: "
        "import autoquant.strategies (or use the autoquant.* names), and pip install -e . first"
    )

from autoquant.strategies.binary import BinarySearchStrategy
from autoquant.strategies.greedy import GreedyStrategy
from autoquant.strategies.ladder import LadderStrategy
from autoquant.strategies.optuna_search import OptunaStrategy

__all__ = ["BinarySearchStrategy", "GreedyStrategy", "LadderStrategy", "OptunaStrategy"]
