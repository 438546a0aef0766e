"""Group members acked with their counts (``stem.canvas.Runner.record_and_ack``, a single
Redis): the completion the last member causes runs after its ack, noted in the backend
(``{groups}:completing``) until it ran; a worker's heartbeat sweep runs a noted completion
its worker never finished, and running a completion twice publishes the callback once.
Faults are injected here at the exact points (an exception in the worker's settle thread);
a kill -9 at the same point is ``tests/e2e/test_canvas_faults.py``."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from stem import ShutdownMode, Stem, TaskRegistry, TaskState, Worker, WorkerLifecycleConfig
from stem.backends.redis import RedisResultBackend
from stem.brokers.redis import RedisBroker
from stem.canvas import Runner, Signature, chain, chord, group
from stem.errors import BackendConnectionError, ConfigurationError
from stem.retry import FixedRetryStrategy

from .support import wait_for

pytestmark = pytest.mark.redis

NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)


class Env:
    def __init__(self, url: str, namespace: str, **broker_kwargs):
        self.ran: dict[str, int] = {}
        self.lock = threading.Lock()
        self.registry = TaskRegistry()

        def note(task_id: str) -> None:
            with self.lock:
                self.ran[task_id] = self.ran.get(task_id, 0) + 1

        @self.registry.task("add")
        def add(ctx, a: int = 0):
            note(ctx.id)
            return (ctx.previous or 0) + a

        @self.registry.task("listed")
        def listed(ctx):
            note(ctx.id)
            return list(ctx.previous)

        self.broker = RedisBroker.from_url(url, namespace=namespace, **broker_kwargs)
        self.backend = RedisResultBackend.from_url(url, namespace=namespace)
        self.stem = Stem(self.broker, self.backend, self.registry)
        self.workers: list[Worker] = []

    def worker(self, **kw) -> Worker:
        kw.setdefault("concurrency", 2)
        kw.setdefault("lifecycle", NO_SIGNALS)
        kw.setdefault("isolation", "inline")
        kw.setdefault("retry_strategy", FixedRetryStrategy(0.01))
        w = Worker(self.broker, self.backend, self.registry, **kw)
        self.workers.append(w)
        w.run_in_background()
        return w

    def close(self) -> None:
        for w in self.workers:
            w.shutdown(ShutdownMode.HARD, timeout=15)
        self.stem.close()


@pytest.fixture
def env(redis_url, namespace, raw):
    e = Env(redis_url, namespace)
    yield e
    e.close()


def sig(name, args=None):
    return Signature(name, args)


def a_chord(n: int) -> chord:
    return chord(group(sig("add", {"a": i}) for i in range(n)), sig("listed"))


def test_a_completion_that_failed_after_the_ack_is_run_by_the_sweep_once(env, monkeypatch, caplog):
    """The runner fails right after the round trip that counted and acked the last member,
    before the completion ran: nothing is redelivered (every member ran once), and the
    sweep runs the noted completion after ``completion_grace``."""
    real = Runner.complete
    injected: list[list[str]] = []

    def broken(self, records):
        if records and not injected:
            injected.append([r.id for r in records])
            raise RuntimeError("injected: the worker stops before the completion")
        return real(self, records)

    monkeypatch.setattr(Runner, "complete", broken)
    caplog.set_level(logging.WARNING, logger="stem.worker")
    env.worker(heartbeat_interval=0.1, completion_grace=0.3)
    n = 30
    h = env.stem.apply(a_chord(n))
    status = h.wait(30)
    assert status.state is TaskState.SUCCEEDED and status.result == list(range(n))
    assert h.results() == list(range(n))
    assert injected == [[h.id]]
    assert env.ran[h.id] == 1
    assert all(env.ran[f"{h.id}.{i}"] == 1 for i in range(n))         # acked with their counts
    wait_for(lambda: "ran 1 group completion(s) noted" in caplog.text, 10, "the sweep's log line")
    assert env.backend.group_completions_due(time.time() + 3600) == []


def test_a_failing_unsealed_sweep_does_not_keep_the_completion_sweep_from_running(env, monkeypatch, caplog):
    """The heartbeat's two sweeps are independent: with the unsealed-group sweep failing at
    every heartbeat (its backend call refused), a noted completion is still run."""
    real = Runner.complete
    injected: list[str] = []

    def broken(self, records):
        if records and not injected:
            injected.append(records[0].id)
            raise RuntimeError("injected: the worker stops before the completion")
        return real(self, records)

    def refused(self):
        raise BackendConnectionError("injected: the unsealed-group sweep is refused")

    monkeypatch.setattr(Runner, "complete", broken)
    monkeypatch.setattr(Runner, "sweep", refused)
    caplog.set_level(logging.WARNING, logger="stem.worker")
    env.worker(heartbeat_interval=0.1, completion_grace=0.3)
    h = env.stem.apply(a_chord(5))
    status = h.wait(30)
    assert status.state is TaskState.SUCCEEDED and status.result == list(range(5))
    assert injected == [h.id]
    assert "could not sweep unsealed groups" in caplog.text
    wait_for(lambda: "ran 1 group completion(s) noted" in caplog.text, 10, "the completion sweep's log line")


def test_a_completion_run_twice_publishes_the_callback_once(env, monkeypatch, caplog):
    """The completion ran but the worker failed before its note went: the sweep runs it a
    second time, and the callback (a keyed publish under the chord's id) is published once."""
    real = Runner.complete
    injected: list[str] = []

    def ran_then_failed(self, records):
        if records and not injected:
            for record in records:
                self.recorded(record, True)       # the completion ran...
            injected.append(records[0].id)
            raise RuntimeError("injected: ...and the worker stopped before its note went")
        return real(self, records)

    monkeypatch.setattr(Runner, "complete", ran_then_failed)
    caplog.set_level(logging.WARNING, logger="stem.worker")
    env.worker(heartbeat_interval=0.1, completion_grace=0.3)
    h = env.stem.apply(a_chord(12))
    assert h.wait(30).result == list(range(12))
    wait_for(lambda: "ran 1 group completion(s) noted" in caplog.text, 10, "the sweep to run it again")
    assert injected == [h.id]
    assert env.backend.group_completions_due(time.time() + 3600) == []
    # and once more by hand, after the callback ended: its id key still refuses it
    runner = Runner(env.stem)
    record = env.backend.group_get(h.id)
    runner.completed(record)
    runner.completed(record)
    wait_for(lambda: env.broker.stats("default").in_flight == 0, 10, "the workers to settle")
    stats = env.broker.stats("default")
    assert (stats.ready, stats.in_flight) == (0, 0)
    assert env.ran[h.id] == 1


def test_a_redelivered_last_member_completes_once(env):
    """Every member is counted and acked, then the last one is counted again (a resend, or a
    redelivery after a lost reply): the callback is published once."""
    env.worker()
    h = env.stem.apply(a_chord(5))
    assert h.wait(30).result == list(range(5))
    from stem.results import TaskStatus
    again = TaskStatus(id=f"{h.id}.4", state=TaskState.SUCCEEDED, result=4)
    records, _ = env.backend.store_record_and_ack([again], [(h.id, f"{h.id}.4", 4, True, b"\x92\x01\x04", None)],
                                                  env.broker, [])
    assert records[0].complete
    Runner(env.stem).complete([records[0]])
    wait_for(lambda: env.broker.stats("default").in_flight == 0, 10, "the workers to settle")
    assert env.broker.stats("default").ready == 0 and env.ran[h.id] == 1


def test_a_failed_round_trip_settles_the_usual_way(redis_url, namespace, raw, monkeypatch, caplog):
    """The combined round trip fails (it may have run in part): the batch is recorded,
    completed, then acked the usual way, and the chord still ends once.  What its consume
    leased comes back after its lease (1 s here), as after any lost consume reply."""
    real = RedisResultBackend.store_record_and_ack
    failures: list[int] = []

    def flaky(self, *args, **kwargs):
        if not failures:
            failures.append(1)
            real(self, *args, **kwargs)           # it ran, and the reply was lost
            raise BackendConnectionError("injected: connection lost after the pipeline ran")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RedisResultBackend, "store_record_and_ack", flaky)
    env = Env(redis_url, namespace, default_visibility_timeout=1.0)
    try:
        env.worker()
        h = env.stem.apply(a_chord(40))
        assert h.wait(60).result == list(range(40))
        assert len(failures) == 1 and env.ran[h.id] == 1
        assert "settling them the usual way" in caplog.text
    finally:
        env.close()


def test_chains_and_nested_groups_complete_on_redis(env):
    """Chain steps and readers keep their work before their acks; the members of the groups
    inside go the one-round-trip way; every completion runs once."""
    env.worker(concurrency=3)
    inner = chord(group([sig("add", {"a": 1}), sig("add", {"a": 2})]), sig("listed"))
    h = env.stem.apply(group(chain(sig("add", {"a": i}), inner) for i in range(3)))
    assert h.wait(30).state is TaskState.SUCCEEDED
    assert h.results() == [[1 + i, 2 + i] for i in range(3)]
    h2 = env.stem.apply(chain(group(sig("add", {"a": i}) for i in range(4)), sig("listed")))
    assert h2.get(30) == [0, 1, 2, 3]
    assert env.backend.group_completions_due(time.time() + 3600) == []
    # the group step's completion run again (a sweep after a slow runner): the next chain
    # step is a keyed publish, refused while its id key lingers
    runner = Runner(env.stem)
    for _ in range(2):
        runner.completed(env.backend.group_get(f"{h2.id}.s0"))
    stats = env.broker.stats("default")
    assert (stats.ready, stats.in_flight) == (0, 0)
    assert all(n == 1 for n in env.ran.values())


def test_the_grace_is_checked():
    from stem.brokers import InMemoryBroker
    for bad in (-1, float("nan"), "1"):
        with pytest.raises(ConfigurationError):
            Worker(InMemoryBroker(), None, TaskRegistry(), completion_grace=bad)
