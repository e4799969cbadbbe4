"""Trials on Ray through the same executor path: ``executor="ray"`` starts a local Ray,
evaluates the plans of each step as Ray tasks and stops it again."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import autoquant as aq
from autoquant.search.testing import SyntheticEvaluator, linear_stack, ranking_from_drops

ray = pytest.importorskip("ray")

N = 12
DROPS = {str(i): ((7 * i) % N + 1) / 1024 for i in range(N)}


def search(executor, workers=1):
    return aq.auto_quantize(linear_stack(N), SyntheticEvaluator(DROPS), max_loss=30 / 1024,
                            ranking=ranking_from_drops(DROPS), executor=executor,
                            workers=workers)


@pytest.mark.slow
def test_ray_tasks_run_the_same_search_as_any_other_executor_and_ray_is_stopped_after():
    with ThreadPoolExecutor(2) as pool:
        threads = search(pool, workers=2)
    on_ray = search("ray", workers=2)
    assert [(r.index, r.plan, r.metric) for r in on_ray.history] == \
        [(r.index, r.plan, r.metric) for r in threads.history]
    assert on_ray.checks["parallel"]["executor"] == "ray"
    assert all(device == "cpu" for device in on_ray.checks["parallel"]["workers"].values())
    assert not ray.is_initialized()  # the search started Ray, so it stopped it
