"""Unique tasks through a real worker (memory broker): every way a task ends frees its key,
a retry's wait keeps it, and ``unique_until="started"`` frees it when the task starts."""

from __future__ import annotations

import os
import signal
import time

import pytest

from stem import PayloadSigner, ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.keys import id_key, unique_key
from stem.retry import FixedRetryStrategy
from .support import wait_for
from .test_worker import NO_SIGNALS, isolation, journal, set_flag, wait_flag  # noqa: F401 - fixtures

UNIQUE = TaskOptions(unique=True)
Q = "default"


class Env:
    def __init__(self, isolation: str, **broker_options):
        self.isolation = isolation
        self.registry = TaskRegistry()
        self.broker = InMemoryBroker(**broker_options)
        self.backend = InMemoryResultBackend()
        self.stem = Stem(self.broker, self.backend, self.registry)
        self.workers: list[Worker] = []

    def worker(self, **kw) -> Worker:
        kw.setdefault("concurrency", 2)
        kw.setdefault("lifecycle", NO_SIGNALS)
        kw.setdefault("retry_strategy", FixedRetryStrategy(0.01))
        kw.setdefault("isolation", self.isolation)
        w = Worker(self.broker, self.backend, self.registry, **kw)
        self.workers.append(w)
        return w.run_in_background()

    def key_owner(self, name: str, args: dict | None = None) -> str | None:
        return self.broker.key_owner(Q, unique_key(name, Q, args or {}))

    def ended(self, tid: str, timeout: float = 20.0):
        wait_for(lambda: (s := self.backend.get(tid)) is not None and s.is_terminal, timeout, f"task {tid} to end")
        return self.backend.get(tid)

    def assert_key_free_and_usable(self, name: str, tid: str, args: dict | None = None) -> None:
        """The key is free once the delivery is settled, and a new enqueue publishes a new task."""
        wait_for(lambda: self.key_owner(name, args) is None, 10, f"the key of {name} to be released")
        again = self.stem.enqueue(name, args, options=UNIQUE)
        assert again != tid and self.key_owner(name, args) == again

    def close(self) -> None:
        for w in self.workers:
            w.shutdown(ShutdownMode.HARD, timeout=15)


@pytest.fixture
def env(isolation):
    e = Env(isolation)
    yield e
    e.close()


# -- every terminal path frees the key ----------------------------------------------------------
def test_success_frees_the_key(env):
    env.registry.task("add")(lambda ctx, a: a + 1)
    tid = env.stem.enqueue("add", {"a": 1}, options=UNIQUE)
    assert env.stem.enqueue("add", {"a": 1}, options=UNIQUE) == tid   # queued: a duplicate
    env.worker()
    assert env.stem.wait_for_task(tid, timeout=20).result == 2
    env.assert_key_free_and_usable("add", tid, {"a": 1})


def test_failure_after_retries_frees_the_key(env, journal):
    @env.registry.task("boom", options=TaskOptions(max_retries=1))
    def boom(ctx):
        journal.add(ctx.attempt)
        raise RuntimeError("always")

    env.worker()
    tid = env.stem.enqueue("boom", options=UNIQUE)
    status = env.ended(tid)
    assert (status.state, status.attempt) == (TaskState.FAILED, 1)
    assert journal.lines() == ["0", "1"]
    env.assert_key_free_and_usable("boom", tid)


def test_a_retry_waiting_out_its_countdown_keeps_the_key(env, journal):
    @env.registry.task("boom", options=TaskOptions(max_retries=3))
    def boom(ctx):
        journal.add(ctx.attempt)
        raise RuntimeError("again")

    env.worker(retry_strategy=FixedRetryStrategy(60.0))
    tid = env.stem.enqueue("boom", options=UNIQUE)
    wait_for(lambda: (s := env.backend.get(tid)) is not None and s.state is TaskState.RETRYING, 20,
             "the retry to be scheduled")
    wait_for(lambda: env.broker.stats(Q).delayed == 1, 10, "the retry to wait in the broker")
    assert env.key_owner("boom") == tid
    assert env.stem.enqueue("boom", options=UNIQUE) == tid
    assert journal.lines() == ["0"]


def test_dead_letter_for_max_deliveries_frees_the_key(isolation):
    env = Env(isolation, max_deliveries=1, default_visibility_timeout=0.05)
    try:
        env.registry.task("noop")(lambda ctx: None)
        tid = env.stem.enqueue("noop", options=UNIQUE)
        [first] = env.broker.consume([Q], 1, 1.0)   # leased and never settled: its lease runs out
        assert first.task_id == tid and first.key is not None
        env.worker()
        status = env.ended(tid)
        assert (status.state, status.reason) == (TaskState.DEAD, "max-deliveries")
        env.assert_key_free_and_usable("noop", tid)
    finally:
        env.close()


def test_an_invalid_signature_frees_the_key(env):
    env.registry.task("noop")(lambda ctx: None)
    producer = Stem(env.broker, env.backend, env.registry, PayloadSigner({"k1": b"a" * 32}))
    tid = producer.enqueue("noop", options=UNIQUE)
    env.worker(signer=PayloadSigner({"k2": b"b" * 32}))
    status = env.ended(tid)
    assert (status.state, status.reason) == (TaskState.DEAD, "signature-invalid")
    wait_for(lambda: env.key_owner("noop") is None, 10, "the key to be released")
    assert producer.enqueue("noop", options=UNIQUE) != tid


def test_a_task_that_keeps_crashing_its_child_is_dead_lettered_and_frees_its_key(journal):
    env = Env("process")
    try:
        @env.registry.task("crash")
        def crash(ctx):
            journal.add(ctx.id)
            os.kill(os.getpid(), signal.SIGKILL)

        tid = env.stem.enqueue("crash", options=UNIQUE)
        env.worker(max_crash_redeliveries=2)
        status = env.ended(tid)
        assert (status.state, status.reason) == (TaskState.DEAD, "poison")
        assert journal.lines() == [tid, tid]   # the first crash redelivered it, key kept
        env.assert_key_free_and_usable("crash", tid)
    finally:
        env.close()


def test_an_unregistered_task_frees_its_key(env):
    env.registry.task("noop")(lambda ctx: None)
    free = Stem(env.broker, env.backend)   # no registry: any name goes
    tid = free.enqueue("not.registered", options=UNIQUE)
    env.worker()
    status = env.ended(tid)
    assert (status.state, status.reason) == (TaskState.DEAD, "unknown-task")
    wait_for(lambda: env.key_owner("not.registered") is None, 10, "the key to be released")
    assert free.enqueue("not.registered", options=UNIQUE) != tid


def test_a_revoked_task_frees_its_key(env, journal):
    env.registry.task("noop")(lambda ctx: journal.add(ctx.id))
    tid = env.stem.enqueue("noop", options=UNIQUE)
    env.stem.revoke(tid)
    env.worker()
    status = env.ended(tid)
    assert (status.state, status.reason) == (TaskState.REVOKED, "revoked")
    assert journal.lines() == []
    env.assert_key_free_and_usable("noop", tid)


def test_an_expired_task_frees_its_key(env, journal):
    env.registry.task("noop")(lambda ctx: journal.add(ctx.id))
    enqueued = time.time()
    tid = env.stem.enqueue("noop", options=TaskOptions(unique=True, expires=0.01))
    wait_for(lambda: time.time() > enqueued + 0.02, 1, "the deadline to pass before any worker exists")
    env.worker()
    status = env.ended(tid)
    assert (status.state, status.reason) == (TaskState.REVOKED, "expired")
    assert journal.lines() == []
    env.assert_key_free_and_usable("noop", tid)


# -- explicit ids ---------------------------------------------------------------------------------
def test_an_explicit_task_id_runs_once_and_stays_refused_while_its_result_lives(env, journal):
    env.registry.task("noop")(lambda ctx: journal.add(ctx.id))
    assert env.stem.enqueue("noop", task_id="order-42") == "order-42"
    assert env.stem.enqueue("noop", task_id="order-42") == "order-42"
    assert env.broker.stats(Q).ready == 1
    env.worker()
    assert env.stem.wait_for_task("order-42", timeout=20).state is TaskState.SUCCEEDED
    wait_for(lambda: env.broker.stats(Q).in_flight == 0, 10, "the ack")
    assert env.broker.key_owner(Q, id_key("order-42")) == "order-42"   # lingers with the result
    assert env.stem.enqueue("noop", task_id="order-42") == "order-42"
    assert env.broker.stats(Q).ready == 0 and env.broker.stats(Q).in_flight == 0
    assert journal.lines() == ["order-42"]


# -- unique_until -------------------------------------------------------------------------------------
def test_unique_until_started_frees_the_key_when_the_task_starts(env, journal):
    go = journal.flag("go")

    @env.registry.task("slow")
    def slow(ctx):
        journal.add(ctx.id)
        wait_flag(go)

    env.worker()
    tid = env.stem.enqueue("slow", options=TaskOptions(unique=True, unique_until="started"))
    wait_for(lambda: journal.lines() == [tid], 20, "the task to start")
    wait_for(lambda: env.key_owner("slow") is None, 10, "the key to be released at the start")
    second = env.stem.enqueue("slow", options=TaskOptions(unique=True, unique_until="started"))
    assert second != tid
    set_flag(go)
    assert env.stem.wait_for_task(tid, timeout=20).state is TaskState.SUCCEEDED
    assert env.stem.wait_for_task(second, timeout=20).state is TaskState.SUCCEEDED
    assert env.key_owner("slow") is None


def test_unique_until_finished_refuses_a_duplicate_while_the_task_runs(env, journal):
    go = journal.flag("go")

    @env.registry.task("slow")
    def slow(ctx):
        journal.add(ctx.id)
        wait_flag(go)

    env.worker()
    tid = env.stem.enqueue("slow", options=UNIQUE)
    wait_for(lambda: journal.lines() == [tid], 20, "the task to start")
    assert env.key_owner("slow") == tid
    assert env.stem.enqueue("slow", options=UNIQUE) == tid
    set_flag(go)
    assert env.stem.wait_for_task(tid, timeout=20).state is TaskState.SUCCEEDED
    assert journal.lines() == [tid]
    env.assert_key_free_and_usable("slow", tid)


def test_a_failed_release_at_the_start_is_left_to_the_terminal_settle(env, journal, caplog):
    go = journal.flag("go")

    @env.registry.task("slow")
    def slow(ctx):
        journal.add(ctx.id)
        wait_flag(go)

    calls = []

    def failing_release(queue, key, owner):
        from stem.errors import BrokerConnectionError
        calls.append((queue, key, owner))
        raise BrokerConnectionError("injected: the broker is gone")

    env.broker.release_key = failing_release
    env.worker()
    tid = env.stem.enqueue("slow", options=TaskOptions(unique=True, unique_until="started"))
    wait_for(lambda: calls, 10, "the release to be tried")
    assert calls == [(Q, unique_key("slow", Q, {}), tid)]
    assert env.key_owner("slow") == tid
    set_flag(go)
    assert env.stem.wait_for_task(tid, timeout=20).state is TaskState.SUCCEEDED
    wait_for(lambda: env.key_owner("slow") is None, 10, "the ack to release the key")
    assert len(calls) == 1   # once per delivery
    assert "could not release" in caplog.text
