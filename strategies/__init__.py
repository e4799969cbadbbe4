"""Search strategies for autoquant, each registered by name in `autoquant.strategy.STRATEGIES`."""

from strategies.binary import BinarySearchStrategy

__all__ = ["BinarySearchStrategy"]
