"""The control plane leaves no broker state behind: reply queues, control queues, stale replies."""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from stem import ShutdownMode, TaskRegistry, Worker
from stem.brokers.base import Message
from stem.control import COMMAND_TTL, Control

from .test_control import ADAPTERS
from .test_worker import NO_SIGNALS, wait_until


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
def test_a_reply_queue_left_by_a_killed_controller_is_swept_by_a_worker(plane):
    now = time.time()
    stale = f"stem.reply.{int((now - 3 * COMMAND_TTL) * 1000)}.{uuid.uuid4().hex}"
    fresh = f"stem.reply.{int((now + COMMAND_TTL) * 1000)}.{uuid.uuid4().hex}"
    for q in (stale, fresh):
        plane.broker.publish(Message(uuid.uuid4().hex, q, b"a reply nobody reads"))
    assert {stale, fresh} <= set(plane.broker.queues())
    plane.start()                       # a control thread sweeps when it starts, then once a minute
    assert wait_until(lambda: stale not in plane.broker.queues(), timeout=30)
    assert fresh in plane.broker.queues() and plane.broker.stats(fresh).ready == 1
    plane.broker.delete_queue(fresh)
