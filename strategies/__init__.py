"""Search strategies for autoquant, each registered by name in `autoquant.strategy.STRATEGIES`."""

from strategies.binary import BinarySearchStrategy
from strategies.greedy import GreedyStrategy
from strategies.ladder import LadderStrategy
from strategies.optuna_search import OptunaStrategy

__all__ = ["BinarySearchStrategy", "GreedyStrategy", "LadderStrategy", "OptunaStrategy"]
