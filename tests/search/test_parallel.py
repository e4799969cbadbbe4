"""workers=N: the plans of one ask() are evaluated in spawned processes, same answers."""

from __future__ import annotations

import pytest

import autoquant as aq
from autoquant.errors import ConfigError
from autoquant.search.testing import SyntheticEvaluator, linear_stack, ranking_from_drops

N = 12
DROPS = {str(i): ((7 * i) % N + 1) / 1024 for i in range(N)}


class SpecEvaluator(SyntheticEvaluator):
    """Rebuilt in each worker from an import path instead of being pickled."""

    def worker_spec(self):
        return "autoquant.search.testing:SyntheticEvaluator", {"drops": self.drops}


def run(strategy, evaluator, workers, **kwargs):
    return aq.auto_quantize(
        linear_stack(N), evaluator, max_loss=30 / 1024, strategy=strategy,
        ranking=ranking_from_drops(DROPS), workers=workers, **kwargs,
    )


@pytest.mark.slow
def test_two_workers_give_the_same_answer_in_fewer_rounds() -> None:
    # one pool for the whole test (spawning workers costs seconds): binary, then the audit
    one = run("binary", SyntheticEvaluator(DROPS), 1, audit=3)
    two = run("binary", SpecEvaluator(DROPS), 2, audit=3)
    assert two.plan == one.plan and two.loss == one.loss
    # 3-ary search: k=0, then {4 fail, 8 pass}, then {5 pass, 6 pass}: 3 rounds, not 5
    assert [len(r.fallback_layers) for r in two.history[:6]] == [12, 0, 4, 8, 5, 6]
    assert [r.index for r in two.history] == list(range(9))
    assert two.checks["audit"] == one.checks["audit"]  # evaluated in the workers
    assert two.settings.workers == 2


def test_unpicklable_evaluator_is_a_config_error_naming_the_fix() -> None:
    evaluator = SyntheticEvaluator(DROPS)
    evaluator.hook = lambda m: m  # lambdas do not pickle
    with pytest.raises(ConfigError, match="worker_spec"):
        run("binary", evaluator, 2)
    with pytest.raises(ConfigError, match="workers"):
        run("binary", SyntheticEvaluator(DROPS), 0)
