"""The prefetch window follows the tasks' run times (stem.worker.window)."""

from __future__ import annotations

import time

import pytest

from stem import StemConfig, TaskRegistry, Worker
from stem.errors import ConfigurationError
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.worker.execution import OK, Outcome
from stem.worker.window import DEFAULT_MAX_MULTIPLIER, WORK_PER_CHILD, PrefetchWindow

from .support import record_peak_in_flight, wait_for
from .test_worker import env, isolation  # noqa: F401 - the fixtures


def _ran(seconds: float, n: int = 8, start: float = 1_000_000.0) -> list[tuple[None, Outcome]]:
    return [(None, Outcome("t", OK, started_at=start, finished_at=start + seconds)) for _ in range(n)]


def test_microsecond_tasks_open_the_window_to_its_cap():
    w = PrefetchWindow(4, 64)
    assert w.observe(_ran(20e-6)) is True
    assert w.per_child == 64
    assert w.observe(_ran(0.0)) is False        # same width: no change reported
    assert w.per_child == 64


def test_the_window_holds_about_its_work_per_child_and_never_less_than_its_floor():
    w = PrefetchWindow(4, 64)
    w.observe(_ran(0.001))
    assert w.per_child == round(WORK_PER_CHILD / 0.001) == 10
    assert w.observe(_ran(0.05)) is True        # tasks got longer: back to the floor at once
    assert w.per_child == 4


def test_jitter_in_run_times_does_not_move_the_window():
    w = PrefetchWindow(4, 64)
    w.observe(_ran(0.001))
    assert w.per_child == 10
    assert w.observe(_ran(0.0008)) is False and w.per_child == 10    # 12.5: within half again
    assert w.observe(_ran(0.0013)) is False and w.per_child == 10    # 7.7
    assert w.observe(_ran(0.0006)) is True and w.per_child == 17     # 16.7: half again and more
    assert w.observe(_ran(0.0011)) is True and w.per_child == 9


def test_tasks_that_never_ran_do_not_move_the_window():
    w = PrefetchWindow(4, 64)
    unrun = [(None, Outcome("t", OK))] * 8      # no start: nothing to learn from
    assert w.observe(unrun) is False and w.per_child == 4
    assert w.observe(unrun + _ran(20e-6, n=1)) is True and w.per_child == 64


def test_a_fixed_window_never_moves():
    w = PrefetchWindow(4, 4)
    assert w.observe(_ran(1e-6)) is False
    assert w.per_child == 4


def test_short_tasks_widen_the_workers_window_and_long_ones_narrow_it_again(env):
    env.registry.task("noop")(lambda ctx: None)

    @env.registry.task("slow")
    def slow(ctx):
        time.sleep(0.03)        # 30 ms: a third of a task per child fits WORK_PER_CHILD

    w = env.worker(concurrency=2, prefetch_multiplier=2, max_prefetch_multiplier=16)
    w.run_in_background()
    assert w.prefetch_limit == 4
    ids = env.stem.enqueue_many([("noop", {})] * 300)
    wait_for(lambda: w.prefetch_limit == 32, what="the window at its cap (2 children x 16)")
    assert all(env.stem.wait_for_task(i, timeout=30).state.value == "SUCCEEDED" for i in ids)
    ids = env.stem.enqueue_many([("slow", {})] * 6)
    assert all(env.stem.wait_for_task(i, timeout=30).state.value == "SUCCEEDED" for i in ids)
    assert w.prefetch_limit == 4          # the settle batches of slow tasks set it back to the floor
    assert w.stats()["prefetch_limit"] == 4   # what heartbeats carry


def test_a_widened_window_still_bounds_the_leases(env):
    env.registry.task("noop")(lambda ctx: None)
    peak = record_peak_in_flight(env.broker)
    env.stem.enqueue_many([("noop", {})] * 2000)
    w = env.worker(concurrency=2, prefetch_multiplier=1, max_prefetch_multiplier=8)
    w.run_in_background(burst=True)
    assert w.join(60)
    assert w.stats()["succeeded"] == 2000
    assert 2 < peak[0] <= 16              # wider than the floor's 2, never wider than 2 x 8


def test_max_prefetch_multiplier_equal_to_the_multiplier_keeps_the_window_fixed(env):
    env.registry.task("noop")(lambda ctx: None)
    w = env.worker(concurrency=2, prefetch_multiplier=3, max_prefetch_multiplier=3)
    w.run_in_background()
    ids = env.stem.enqueue_many([("noop", {})] * 200)
    assert all(env.stem.wait_for_task(i, timeout=30).state.value == "SUCCEEDED" for i in ids)
    assert w.prefetch_limit == 6


def test_the_default_cap_is_64_or_the_multiplier_when_that_is_larger():
    args = {"broker": InMemoryBroker(), "backend": InMemoryResultBackend(), "registry": TaskRegistry()}
    assert Worker(**args).max_prefetch_multiplier == DEFAULT_MAX_MULTIPLIER == 64
    assert Worker(prefetch_multiplier=100, **args).max_prefetch_multiplier == 100


@pytest.mark.parametrize("value", [0, 3, True, 8.0, "16"])
def test_worker_rejects_a_bad_max_prefetch_multiplier(value):
    with pytest.raises(ConfigurationError, match="max_prefetch_multiplier"):
        Worker(InMemoryBroker(), InMemoryResultBackend(), TaskRegistry(), prefetch_multiplier=4,
               max_prefetch_multiplier=value)


def test_config_reads_the_max_prefetch_multiplier():
    assert StemConfig.from_environment({"STEM_MAX_PREFETCH_MULTIPLIER": "8"}).max_prefetch_multiplier == 8
    assert StemConfig.from_environment({}).max_prefetch_multiplier is None
    with pytest.raises(ConfigurationError, match="STEM_MAX_PREFETCH_MULTIPLIER"):
        StemConfig.from_environment({"STEM_MAX_PREFETCH_MULTIPLIER": "lots"})
