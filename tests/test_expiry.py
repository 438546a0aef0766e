"""A task's deadline (``expires``) holds wherever it waits in a worker: at intake, in the
backlog, in a child about to run it, and before a retry is scheduled."""

from __future__ import annotations

import time

import pytest

from stem import ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.keys import unique_key
from stem.retry import FixedRetryStrategy
from stem.worker import child as child_module
from .support import wait_for, worker_env
from .test_worker import NO_SIGNALS, isolation, journal  # noqa: F401 - fixtures


@pytest.fixture
def env(isolation):
    yield from worker_env(isolation, concurrency=1)


def _terminal(env, tid, timeout=20.0):
    wait_for(lambda: (s := env.backend.get(tid)) is not None and s.is_terminal, timeout, f"task {tid} to end")
    return env.backend.get(tid)


def test_tasks_that_expire_in_the_backlog_behind_a_rate_limit_end_revoked_unrun(env, journal):
    @env.registry.task("limited", options=TaskOptions(rate_limit="1/s", rate_scope="worker"))
    def limited(ctx):
        journal.add(f"{ctx.id} {time.time()!r}")

    enqueued = time.time()
    ids = [env.stem.enqueue("limited", options=TaskOptions(expires=1.5)) for _ in range(5)]
    env.worker(concurrency=2).run_in_background()
    statuses = {tid: _terminal(env, tid) for tid in ids}
    ran = {line.split()[0]: float(line.split()[1]) for line in journal.lines()}
    deadline = enqueued + 1.5
    assert all(at <= deadline for at in ran.values()), f"ran after the deadline: {ran} > {deadline}"
    for tid, s in statuses.items():
        if tid in ran:
            assert s.state is TaskState.SUCCEEDED
        else:
            assert (s.state, s.reason) == (TaskState.REVOKED, "expired")
    assert statuses[ids[-1]].state is TaskState.REVOKED   # its token came at t = 4 s
    wait_for(lambda: env.broker.stats("default").in_flight == 0, what="the expired deliveries to be acked")
    assert env.broker.stats("default").dead == 0


class _SkewedClock:
    """``time`` as a child sees it: an hour ahead (a child that reads the clock past the
    deadline the supervisor did not see pass)."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return time.time() + 3600.0


def test_a_child_that_sees_the_deadline_passed_does_not_run_the_task(monkeypatch, journal):
    # the children are forked from this process (through the zygote): they inherit the skewed clock
    monkeypatch.setattr(child_module, "time", _SkewedClock())
    registry = TaskRegistry()
    registry.task("noop")(lambda ctx: journal.add(ctx.id))
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    stem = Stem(broker, backend, registry)
    w = Worker(broker, backend, registry, concurrency=1, lifecycle=NO_SIGNALS, isolation="process")
    try:
        w.run_in_background()
        tid = stem.enqueue("noop", options=TaskOptions(expires=600, unique=True))
        fresh = stem.enqueue("noop")
        assert stem.wait_for_task(fresh, timeout=20).state is TaskState.SUCCEEDED
        status = stem.wait_for_task(tid, timeout=20)
        assert (status.state, status.reason) == (TaskState.REVOKED, "expired")
        assert journal.lines() == [fresh]
        assert broker.key_owner("default", unique_key("noop", "default", {})) is None
        assert broker.stats("default").dead == 0
    finally:
        w.shutdown(ShutdownMode.HARD, timeout=15)


def test_a_retry_due_after_the_deadline_is_not_scheduled_the_task_ends_expired(env, journal):
    @env.registry.task("boom", options=TaskOptions(max_retries=5))
    def boom(ctx):
        journal.add(ctx.attempt)
        raise RuntimeError("boom")

    env.worker(retry_strategy=FixedRetryStrategy(30.0)).run_in_background()
    tid = env.stem.enqueue("boom", options=TaskOptions(expires=10, unique=True))
    status = _terminal(env, tid, timeout=10)
    assert (status.state, status.reason, status.attempt) == (TaskState.REVOKED, "expired", 0)
    assert status.error == "boom"
    assert journal.lines() == ["0"]
    stats = env.broker.stats("default")
    assert (stats.ready, stats.delayed, stats.dead) == (0, 0, 0)
    assert env.broker.key_owner("default", unique_key("boom", "default", {})) is None


def test_a_retry_due_before_the_deadline_is_still_scheduled(env, journal):
    @env.registry.task("flaky", options=TaskOptions(max_retries=2))
    def flaky(ctx):
        journal.add(ctx.attempt)
        if ctx.attempt == 0:
            raise RuntimeError("once")
        return "ok"

    env.worker().run_in_background()
    tid = env.stem.enqueue("flaky", options=TaskOptions(expires=60))
    status = env.stem.wait_for_task(tid, timeout=20)
    assert (status.state, status.attempt, status.result) == (TaskState.SUCCEEDED, 1, "ok")
