"""An evaluator's odd answers are autoquant's own errors with the fix: non-bool `ok` or
`higher_is_better`, metrics beyond float range, sys.exit, absurd timeouts."""

from __future__ import annotations

import pytest

import autoquant as aq
from autoquant.errors import EvaluatorError
from autoquant.settings import SettingError
from tests.helpers.synthetic import DropEvaluator, ListEvaluator, mlp


@pytest.mark.parametrize("ok", ["False", None, 1])
def test_metric_eval_ok_must_be_a_bool(ok):
    class Odd(DropEvaluator):
        def metric_eval(self, original, new):
            return ok, 0.0

    with pytest.raises(EvaluatorError, match=r"metric_eval\(\) returned ok=.*must be True or "
                                             r"False"):
        aq.auto_quantize(mlp(3), Odd({}), max_loss=0.1)


def test_higher_is_better_must_be_a_bool():
    class Odd(DropEvaluator):
        higher_is_better = "False"

    with pytest.raises(EvaluatorError, match=r"higher_is_better is str 'False'; it must be "
                                             r"True or False"):
        aq.auto_quantize(mlp(3), Odd({}), max_loss=0.1)


def test_a_metric_beyond_float_range_is_an_evaluator_error():
    with pytest.raises(EvaluatorError, match="expected a finite number"):
        aq.auto_quantize(mlp(3), ListEvaluator([10**400]), max_loss=0.1)


def test_sys_exit_inside_evaluate_is_an_evaluator_error_not_an_exit():
    class Exits(DropEvaluator):
        def evaluate(self, model):
            raise SystemExit(3)

    with pytest.raises(EvaluatorError, match=r"Exits.evaluate\(\) .*called sys.exit\(3\); "
                                             r"return a metric"):
        aq.auto_quantize(mlp(3), Exits({}), max_loss=0.1)


@pytest.mark.parametrize("key", ["eval_timeout", "max_seconds"])
def test_a_timeout_beyond_what_a_thread_can_wait_is_a_setting_error(key):
    with pytest.raises(SettingError, match=rf"{key}.*must be at most"):
        aq.auto_quantize(mlp(3), DropEvaluator({}), max_loss=0.1, **{key: 1e10})
