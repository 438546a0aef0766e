"""The settle round trip that refills too (Redis): store, ack and consume in one pipeline.

With a backlog the fetcher mostly waits for room; the settle thread then leases the
refill in its own round trip and takes the deliveries in (``stem.worker.fetch``).
These tests hold the semantics of the plain path on that one: results before acks,
prefetch bound, pause, shutdown, burst, everything ``Fetcher.accept`` decides, and every
failure falling back to the plain settle.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from stem import (PayloadSigner, ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker,
                  WorkerLifecycleConfig, signals)
from stem.backends.base import ResultBackend
from stem.backends.redis import RedisResultBackend
from stem.brokers.base import Broker, Message
from stem.brokers.redis import RedisBroker
from stem.errors import BrokerConnectionError
from stem.retry import FixedRetryStrategy
from stem.worker.state import ConsumeTurn, WorkerState
from stem.worker.window import PrefetchWindow
from .support import drop_namespace, wait_for

pytestmark = pytest.mark.redis

NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)
Q = "default"


@pytest.fixture(params=["process", "inline"])
def isolation(request):
    return request.param


class Env:
    def __init__(self, url, namespace, **broker_kw):
        self.url, self.namespace = url, namespace
        self.registry = TaskRegistry()
        self.registry.task("add")(lambda ctx, a, b: a + b)
        self.broker = RedisBroker(url, namespace=namespace, **broker_kw)
        self.backend = RedisResultBackend(url, namespace=namespace)
        self.stem = Stem(self.broker, self.backend, self.registry)
        self.workers: list[Worker] = []
        self.refills: list[int] = []      # deliveries leased by each settle+consume round trip
        self.fetches: list[int] = []      # ... by each consume of the fetcher

    def worker(self, *, results: bool = True, **kw) -> Worker:
        kw.setdefault("concurrency", 2)
        kw.setdefault("prefetch_multiplier", 4)
        # a fixed window: these tests count refills of a known size (the window that follows run
        # times is tested on its own below and in test_window.py)
        kw.setdefault("max_prefetch_multiplier", kw["prefetch_multiplier"])
        kw.setdefault("lifecycle", NO_SIGNALS)
        kw.setdefault("retry_strategy", FixedRetryStrategy(0.01))
        w = Worker(self.broker, self.backend if results else None, self.registry, **kw)
        self.workers.append(w)
        return w

    def count_consumes(self, monkeypatch, after=None) -> None:
        """Record how many deliveries every consume leased and the leases held right after."""
        real_refill, real_consume = self.broker.run_and_consume, self.broker.consume
        self.held: list[int] = []

        def run_and_consume(*a, **k):
            out = real_refill(*a, **k)
            self.refills.append(len(out))
            self.held.append(self.broker.stats(Q).in_flight)
            if after is not None:
                after(out)
            return out

        def consume(*a, **k):
            out = real_consume(*a, **k)
            self.fetches.append(len(out))
            self.held.append(self.broker.stats(Q).in_flight)
            return out

        monkeypatch.setattr(self.broker, "run_and_consume", run_and_consume)
        monkeypatch.setattr(self.broker, "consume", consume)

    def close(self):
        for w in self.workers:
            w.shutdown(ShutdownMode.HARD, timeout=15)
        self.stem.close()
        self.broker.close()
        self.backend.close()
        import redis
        client = redis.Redis.from_url(self.url)
        drop_namespace(client, self.namespace)
        client.close()


@pytest.fixture
def env(redis_url, namespace):
    e = Env(redis_url, namespace)
    yield e
    e.close()


def enqueue_backlog(env, n):
    return env.stem.enqueue_many([("add", {"a": i, "b": 1}) for i in range(n)])


def assert_all_succeeded(env, ids):
    for i, tid in enumerate(ids):
        status = env.stem.wait_for_task(tid, timeout=30)
        assert status.state is TaskState.SUCCEEDED and status.result == i + 1, (tid, status)
    assert env.broker.stats(Q)[1:5] == (0, 0, 0, 0)


def test_with_a_backlog_the_settle_round_trip_refills_and_the_fetcher_stays_asleep(env, monkeypatch, isolation):
    env.count_consumes(monkeypatch)
    ids = enqueue_backlog(env, 400)
    w = env.worker(isolation=isolation)
    w.run_in_background(burst=True)
    assert w.join(60)
    assert_all_succeeded(env, ids)
    assert sum(env.refills) > 200                     # most of the run was leased by settle round trips
    assert len(env.fetches) < len(env.refills)
    assert max(env.held) <= w.prefetch_limit          # never more unsettled than the window
    assert w.stats()["succeeded"] == 400


def test_accept_still_decides_for_refilled_deliveries(env, monkeypatch):
    """Bad signatures, unknown tasks, revoked and expired tasks in the middle of a backlog
    that the settle thread leases end the way the fetcher would end them."""
    from stem.envelope import Envelope, encode_frame
    signer = PayloadSigner({"k1": b"s" * 32})
    signed = Stem(env.broker, env.backend, env.registry, signer)
    free = Stem(env.broker, env.backend, signer=signer)   # no registry: any task name goes
    env.count_consumes(monkeypatch)
    ids = signed.enqueue_many([("add", {"a": i, "b": 1}) for i in range(100)])
    special = {}
    special["unsigned"] = env.stem.enqueue("add", {"a": 0, "b": 0})
    frame = bytearray(encode_frame(Envelope(id="tampered", name="add", args={"a": 1, "b": 1}), signer))
    frame[-2] ^= 0x01
    env.broker.publish(Message("tampered", Q, bytes(frame)))
    special["tampered"] = "tampered"
    special["unknown"] = free.enqueue("not.registered")
    special["revoked"] = signed.enqueue("add", {"a": 0, "b": 0})
    signed.revoke(special["revoked"])      # a worker that verifies honours signed revokes only
    expires_at = time.time() + 0.01
    special["expired"] = signed.enqueue("add", {"a": 0, "b": 0}, options=TaskOptions(expires=0.01))
    more = signed.enqueue_many([("add", {"a": i, "b": 1}) for i in range(100)])
    wait_for(lambda: time.time() > expires_at + 0.05, what="the expiry to pass")
    w = env.worker(signer=signer, concurrency=1, prefetch_multiplier=2)
    w.run_in_background(burst=True)
    assert w.join(60)
    for i, tid in enumerate(ids + more):
        assert env.stem.wait_for_task(tid, timeout=30).result == i % 100 + 1
    expected = {"unsigned": (TaskState.DEAD, "signature-invalid"), "tampered": (TaskState.DEAD, "signature-invalid"),
                "unknown": (TaskState.DEAD, "unknown-task"), "revoked": (TaskState.REVOKED, "revoked"),
                "expired": (TaskState.REVOKED, "expired")}
    for kind, tid in special.items():
        status = env.stem.wait_for_task(tid, timeout=30)
        assert (status.state, status.reason) == expected[kind], kind
    assert sum(env.refills) > 100
    signed.close()
    free.close()


def test_without_results_the_ack_round_trip_refills(env, monkeypatch, isolation):
    """Fire-and-forget: no backend, so the broker acks and leases the refill in one round trip."""
    env.count_consumes(monkeypatch)
    enqueue_backlog(env, 400)
    w = env.worker(results=False, isolation=isolation)
    w.run_in_background(burst=True)
    assert w.join(60)
    assert w.stats()["succeeded"] == 400
    assert env.broker.stats(Q)[1:5] == (0, 0, 0, 0)     # every delivery acked
    assert sum(env.refills) > 200 and len(env.fetches) < len(env.refills)
    assert max(env.held) <= w.prefetch_limit


@pytest.mark.parametrize("results", [True, False], ids=["backend", "broker"])
def test_an_adapter_that_cannot_refill_is_asked_once_then_settles_the_usual_way(env, monkeypatch, results):
    """With results the backend stores, acks and refills; without, the broker acks and refills."""
    owner, name, base = ((env.backend, "store_many_ack_and_consume", ResultBackend) if results
                         else (env.broker, "ack_and_consume", Broker))
    asked = []

    def cannot(*a, **k):
        asked.append(1)
        return getattr(base, name)(owner, *a, **k)

    monkeypatch.setattr(owner, name, cannot)
    ids = enqueue_backlog(env, 200)
    w = env.worker(results=results)
    w.run_in_background(burst=True)
    assert w.join(60)
    if results:
        assert_all_succeeded(env, ids)
    assert w.stats()["succeeded"] == 200 and env.broker.stats(Q)[1:5] == (0, 0, 0, 0)
    assert asked == [1]


def test_a_window_that_widens_for_short_tasks_bounds_what_the_refills_lease(env, monkeypatch, isolation):
    env.count_consumes(monkeypatch)
    ids = enqueue_backlog(env, 2000)
    w = env.worker(isolation=isolation, prefetch_multiplier=1, max_prefetch_multiplier=8)
    w.run_in_background(burst=True)
    assert w.join(60)
    assert_all_succeeded(env, ids)
    assert sum(env.refills) > 1000                    # the settle round trips still lease most of it
    assert 2 < max(env.held) <= 16                    # wider than 2 x 1, never wider than 2 x 8
    assert w.stats()["succeeded"] == 2000


@pytest.mark.parametrize("when", ["before-sending", "after-the-consume-ran"])
def test_a_failed_refill_round_trip_loses_no_result_and_no_ack_and_the_fetcher_takes_over(
        redis_url, namespace, monkeypatch, when, caplog):
    env = Env(redis_url, namespace, default_visibility_timeout=1.0)
    try:
        real = env.broker.run_and_consume
        calls = []

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) in (2, 3, 5):
                if when == "after-the-consume-ran":
                    real(*a, **k)     # leased, but the reply is lost: back after the 1 s lease
                raise BrokerConnectionError("Redis unreachable during settle+consume (test)")
            return real(*a, **k)

        monkeypatch.setattr(env.broker, "run_and_consume", flaky)
        ids = enqueue_backlog(env, 300)
        w = env.worker()
        w.run_in_background(burst=True)
        assert w.join(60)
        assert_all_succeeded(env, ids)
        assert len(calls) > 5
        assert "settling without the refill" in caplog.text
        assert w.stats()["succeeded"] == 300
    finally:
        env.close()


class Gate:
    """Holds the settle thread inside one refill round trip (after Redis ran it) until released."""

    def __init__(self):
        self.armed = threading.Event()
        self.inside = threading.Event()
        self.release = threading.Event()

    def __call__(self, leased):
        if self.armed.is_set() and leased and not self.inside.is_set():
            self.held = [d.task_id for d in leased]
            self.inside.set()
            assert self.release.wait(20)


def test_pause_waits_for_a_refill_in_flight_and_its_deliveries_go_back(env, monkeypatch):
    gate = Gate()
    env.count_consumes(monkeypatch, after=gate)
    ids = enqueue_backlog(env, 300)
    w = env.worker()
    w.run_in_background()
    wait_for(lambda: w.stats()["succeeded"] >= 20, what="a first batch")
    gate.armed.set()
    wait_for(gate.inside.is_set, what="a refill round trip in flight")
    pauser = threading.Thread(target=w.pause, args=(Q,))
    pauser.start()
    pauser.join(0.3)
    assert pauser.is_alive()        # that consume included the queue: pause() waits for it
    gate.release.set()
    pauser.join(10)
    assert not pauser.is_alive()
    wait_for(lambda: w.stats()["in_flight"] == 0, what="the paused worker to drain")
    received = w.stats()["received"]
    done = w.stats()["processed"]
    stats = env.broker.stats(Q)
    assert stats.in_flight == 0 and stats.ready == 300 - done == 300 - received   # the refill went back
    w.resume(Q)
    assert_all_succeeded(env, ids)


def test_a_shutdown_during_a_refill_requeues_its_deliveries_and_no_refill_starts_after(env, monkeypatch):
    gate = Gate()
    env.count_consumes(monkeypatch, after=gate)
    ids = enqueue_backlog(env, 300)
    w = env.worker()
    stopped = threading.Event()
    late = []
    real_claim = ConsumeTurn.settle_claim

    def claim(turn, acks):
        before = stopped.is_set()
        got = real_claim(turn, acks)
        if before and got is not None:
            late.append(got)
        return got

    monkeypatch.setattr(ConsumeTurn, "settle_claim", claim)
    w.run_in_background()
    wait_for(lambda: w.stats()["succeeded"] >= 20, what="a first batch")
    gate.armed.set()
    wait_for(gate.inside.is_set, what="a refill round trip in flight")
    stopping = threading.Event()

    def on_stopping(sender, **kw):
        stopping.set()

    signals.worker_stopping.connect(on_stopping)
    try:
        w.shutdown_nowait(ShutdownMode.WARM)
        stopped.set()
        assert stopping.wait(20)   # the main loop is past dispatching and about to requeue the backlog
        gate.release.set()
        assert w.join(30)
    finally:
        signals.worker_stopping.disconnect(on_stopping)
    assert late == []
    stats = env.broker.stats(Q)
    succeeded = [tid for tid in ids if (s := env.stem.get_status(tid)) and s.state is TaskState.SUCCEEDED]
    assert stats.in_flight == 0 and stats.ready == 300 - len(succeeded) > 0
    assert not set(gate.held) & set(succeeded)   # leased as the stop came: requeued, not run
    # nothing lost: a second worker finishes the rest
    env.worker().run_in_background(burst=True)
    assert_all_succeeded(env, ids)


def test_a_claim_is_never_granted_without_a_waiting_fetcher_or_room():
    state = WorkerState(queues=[Q], concurrency=2, window=PrefetchWindow(4, 4))   # window 8, refill at 4
    turn = state.turn
    jobs = state.admit([(SimpleNamespace(), SimpleNamespace(id=f"t{i}"), None, False) for i in range(8)])
    turn.waiting = True
    assert turn.settle_claim(jobs[:3]) is None                # 3 free < 4
    assert turn.settle_claim(jobs[:4]) == ([Q], 4)
    assert turn.settle_claim(jobs[:4]) is None                # one refill at a time
    turn.settle_release(None)                                 # failed: nothing forgotten, fetching handed back
    assert state.held() == 8 and not turn.consuming and not turn.refilling
    state.pause(Q, timeout=1)
    assert turn.settle_claim(jobs) is None                    # no unpaused queue
    state.resume(Q)
    turn.waiting = False
    assert turn.settle_claim(jobs) is None                    # the fetcher is not waiting: its own consume
    turn.waiting = True
    state.request_stop(ShutdownMode.WARM)
    assert turn.settle_claim(jobs) is None                    # stopping: no consume any more