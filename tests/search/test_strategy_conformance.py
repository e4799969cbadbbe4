"""Every bundled strategy passes the `StrategyTestCase` conformance suite."""

from __future__ import annotations

from autoquant.search.testing import StrategyTestCase


class TestBinaryConformance(StrategyTestCase):
    strategy = "binary"


class TestBinaryRefineConformance(StrategyTestCase):
    strategy = "binary"
    options = {"refine": True}


class TestGreedyConformance(StrategyTestCase):
    strategy = "greedy"


class TestLadderConformance(StrategyTestCase):
    strategy = "ladder"
    options = {"ladder": [16]}


class TestOptunaConformance(StrategyTestCase):
    strategy = "optuna"
    options = {"n_trials": 8}
