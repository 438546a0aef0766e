"""The control plane leaves no broker state behind: reply queues, control queues, stale replies."""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from stem import ShutdownMode, TaskRegistry, Worker
from stem import control
from stem.brokers.base import Message
from stem.control import COMMAND_TTL, Control, control_queue

from .test_control import ADAPTERS
from .test_worker import NO_SIGNALS, wait_until

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once


def _footprint(kind: str, broker, request, tmp_path) -> dict:
    """Everything the broker stores, as a comparable value (keys, rows, registry entries)."""
    state: dict = {"queues": sorted(broker.queues())}
    if kind == "redis":
        import redis
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        try:
            ns = request.getfixturevalue("namespace")
            # heartbeats are renewed (new values, same keys); everything else must not change
            state["keys"] = sorted(k.decode() for k in client.scan_iter(match=ns + ":*", count=1000))
            state["registry"] = sorted(m.decode() for m in client.smembers(f"{ns}:queues"))
        finally:
            client.close()
    elif kind == "sqlite":
        with sqlite3.connect(f"{tmp_path}/control.db") as conn:
            for table in ("stem_messages", "stem_dead_letters", "stem_queues"):
                state[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        conn.close()
    elif kind == "postgres":
        import psycopg
        ns = request.getfixturevalue("namespace")
        with psycopg.connect(request.getfixturevalue("postgres_url")) as conn:
            for table in ("stem_jobs", "stem_dead_letters", "stem_queues"):
                state[table] = conn.execute(f'SELECT count(*) FROM "{ns}".{table}').fetchone()[0]
    else:
        state["in_flight"] = broker.stats("default").in_flight
    return state


@pytest.fixture(params=sorted(ADAPTERS))
def plane(request, tmp_path):
    broker, backend = ADAPTERS[request.param](request, tmp_path)
    registry = TaskRegistry()
    registry.task("add")(lambda ctx, a, b: a + b)
    workers: list[Worker] = []

    def start() -> Worker:
        w = Worker(broker, backend, registry, concurrency=1, isolation="inline", lifecycle=NO_SIGNALS,
                   heartbeat_interval=0.2)
        w.run_in_background()
        workers.append(w)
        assert wait_until(lambda: w.id in {h["worker_id"] for h in backend.heartbeats()}, timeout=30)
        return w

    class P:
        pass

    p = P()
    p.kind, p.broker, p.backend, p.start = request.param, broker, backend, start
    p.control = Control(broker, backend)
    p.footprint = lambda: _footprint(request.param, broker, request, tmp_path)
    yield p
    for w in workers:
        w.shutdown(ShutdownMode.HARD, timeout=20)
    broker.close()
    backend.close()


@pytest.mark.timeout(120)
def test_control_calls_and_a_worker_exit_leave_no_broker_state_behind(plane):
    a = plane.start()
    plane.control.ping(timeout=20)      # the first command creates the worker's control queue
    assert wait_until(lambda: "default" in plane.broker.queues())   # and the first fetch its task queue
    before_calls = plane.footprint()
    for i in range(100):
        command = ("ping", "stats", "inspect", "ping")[i % 4]
        assert [r["worker"] for r in getattr(plane.control, command)(timeout=20)] == [a.id]
    assert plane.footprint() == before_calls
    b = plane.start()
    assert len(plane.control.ping(timeout=20)) == 2
    assert b.shutdown(ShutdownMode.WARM, timeout=30)
    assert plane.footprint() == before_calls


@pytest.mark.timeout(90)
def test_queues_left_by_a_killed_controller_or_a_crashed_worker_are_swept_by_a_worker(plane, monkeypatch):
    monkeypatch.setattr(control, "SWEEP_EVERY_S", 0.2)     # a control thread sweeps once a minute
    now = time.time()
    stale = f"stem.reply.{int((now - 3 * COMMAND_TTL) * 1000)}.{uuid.uuid4().hex}"
    fresh = f"stem.reply.{int((now + COMMAND_TTL) * 1000)}.{uuid.uuid4().hex}"
    orphan = control_queue("crashed-host:123:abcdef")      # a worker that died without a clean stop
    for q in (stale, fresh, orphan):
        plane.broker.publish(Message(uuid.uuid4().hex, q, b"nobody reads this"))
    assert {stale, fresh, orphan} <= set(plane.broker.queues())
    w = plane.start()                  # a control thread sweeps when it starts, then every SWEEP_EVERY_S
    assert wait_until(lambda: not {stale, orphan} & set(plane.broker.queues()), timeout=30)
    assert fresh in plane.broker.queues() and plane.broker.stats(fresh).ready == 1
    assert [r["worker"] for r in plane.control.ping(timeout=20)] == [w.id]
    plane.broker.delete_queue(fresh)


@pytest.mark.timeout(60)
def test_a_worker_forgets_the_reply_queues_it_answered_once_they_expire(redis_url, namespace, monkeypatch):
    """What the worker's broker client remembers per queue (Redis: its keys and that it declared
    the queue) must not grow by one entry per command it answers."""
    from stem.backends.redis import RedisResultBackend
    from stem.brokers.redis import RedisBroker
    monkeypatch.setattr(control, "COMMAND_TTL", 0.2)
    monkeypatch.setattr(control, "SWEEP_GRACE_S", 0.0)
    monkeypatch.setattr(control, "SWEEP_EVERY_S", 0.2)
    worker_broker = RedisBroker.from_url(redis_url, namespace=namespace)
    controller_broker = RedisBroker.from_url(redis_url, namespace=namespace)
    backend = RedisResultBackend.from_url(redis_url, namespace=namespace)
    w = Worker(worker_broker, backend, TaskRegistry(), concurrency=1, isolation="inline", lifecycle=NO_SIGNALS,
               heartbeat_interval=0.2)
    w.run_in_background()
    try:
        assert wait_until(lambda: w.id in {h["worker_id"] for h in backend.heartbeats()}, timeout=30)
        for _ in range(5):
            assert len(Control(controller_broker, backend).ping(timeout=3)) == 1

        def remembered():
            return [q for q in (*worker_broker._keys, *worker_broker._declared) if q.startswith("stem.reply.")]

        assert remembered()
        assert wait_until(lambda: not remembered(), timeout=20)
    finally:
        w.shutdown(ShutdownMode.HARD, timeout=20)
        for obj in (worker_broker, controller_broker, backend):
            obj.close()
