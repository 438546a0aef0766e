"""The pool's thread yields the CPU to its children (SCHED_BATCH) while it runs, and only then."""

from __future__ import annotations

import os
import sys

import pytest

from stem import Stem, Worker, signals
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.errors import ConfigurationError

from .test_cli import Workers
from .test_process_engine import lifecycle

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")


@pytest.fixture
def own_policy():
    """The test thread's policy is put back whatever a test does to it."""
    before = os.sched_getscheduler(0)
    yield
    os.sched_setscheduler(0, before, os.sched_param(0))


def run_burst(registry, tasks: int = 4, **kw):
    """Run ``tasks`` "policy" tasks with a burst worker on this thread: the children's policies
    (from their results) and this thread's policy while the pool turned (at task_prerun)."""
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    stem = Stem(broker, backend, registry)
    ids = stem.enqueue_many([("apps.sched_policy", {})] * tasks)
    seen: list[int] = []

    def on_prerun(sender, **_):
        seen.append(os.sched_getscheduler(0))

    signals.task_prerun.connect(on_prerun)
    try:
        Worker(broker, backend, registry, concurrency=1, isolation="process", lifecycle=lifecycle(**kw.pop("lc", {})),
               **kw).start(burst=True)
    finally:
        signals.task_prerun.disconnect(on_prerun)
    return [stem.get_status(i).result for i in ids], seen


def test_the_pool_thread_runs_batch_while_it_turns_and_gets_its_policy_back(own_policy):
    from tests.apps.tasks import registry
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    children, pool_thread = run_burst(registry)
    assert children == [os.SCHED_OTHER] * 4                  # children keep the default
    assert set(pool_thread) == {os.SCHED_BATCH}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER        # a library user's thread is given back


def test_children_spawned_from_the_yielding_thread_go_back_to_the_default(own_policy):
    from tests.apps.tasks import registry
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    # one task per child: every child after the first is spawned by the yielding thread
    children, _ = run_burst(registry, tasks=3, start_method="spawn", lc={"max_tasks_per_child": 1})
    assert children == [os.SCHED_OTHER] * 3
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_a_thread_started_under_another_policy_keeps_it(own_policy):
    from tests.apps.tasks import registry
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))   # as if run under `chrt -b`
    children, pool_thread = run_burst(registry)
    assert set(pool_thread) == {os.SCHED_BATCH}
    assert children == [os.SCHED_BATCH] * 4                  # inherited from the user's choice, not reset
    assert os.sched_getscheduler(0) == os.SCHED_BATCH        # not "restored" to the default


def test_a_refused_switch_changes_nothing_and_the_worker_runs(own_policy, monkeypatch):
    from tests.apps.tasks import registry
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    real = os.sched_setscheduler

    def refuse(pid, policy, param):
        if policy == os.SCHED_BATCH:
            raise PermissionError(1, "Operation not permitted (seccomp)")
        return real(pid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    children, pool_thread = run_burst(registry)
    assert children == [os.SCHED_OTHER] * 4 and set(pool_thread) == {os.SCHED_OTHER}


def test_yield_cpu_false_keeps_the_default_policy(own_policy):
    from tests.apps.tasks import registry
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    children, pool_thread = run_burst(registry, yield_cpu=False)
    assert children == [os.SCHED_OTHER] * 4 and set(pool_thread) == {os.SCHED_OTHER}


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_yield_cpu_must_be_a_bool(bad):
    from tests.apps.tasks import registry
    with pytest.raises(ConfigurationError, match="yield_cpu"):
        Worker(InMemoryBroker(), InMemoryResultBackend(), registry, isolation="process", yield_cpu=bad)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flag, expected", [((), os.SCHED_BATCH), (("--no-yield-cpu",), os.SCHED_OTHER)])
def test_the_cli_worker_yields_unless_told_not_to(tmp_path, flag, expected):
    workers = Workers(f"sqlite:///{tmp_path / 'stem.db'}", str(tmp_path))
    try:
        proc = workers.start(*flag)
        workers.wait_live(1)   # the pool is up: the main thread has switched (or not)
        assert os.sched_getscheduler(proc.pid) == expected, workers.logs()
    finally:
        workers.stop()
