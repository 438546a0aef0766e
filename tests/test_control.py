"""The control plane on every broker: ping, stats, inspect, revoke, pause, shutdown, resize."""

from __future__ import annotations

import os
import time

import pytest

from stem import PayloadSigner, ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker, signals
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.control import Control, control_queue, is_internal_queue
from stem.errors import ControlError

from .test_worker import NO_SIGNALS, Journal, set_flag, wait_flag, wait_until

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once


def _memory(request, tmp_path):
    return InMemoryBroker(), InMemoryResultBackend()


def _sqlite(request, tmp_path):
    from stem.backends.sqlite import SqliteResultBackend
    from stem.brokers.sqlite import SqliteBroker
    url = f"sqlite:///{tmp_path}/control.db"
    return SqliteBroker.from_url(url), SqliteResultBackend.from_url(url)


def _redis(request, tmp_path):
    url = request.getfixturevalue("redis_url")
    ns = request.getfixturevalue("namespace")
    from stem.backends.redis import RedisResultBackend
    from stem.brokers.redis import RedisBroker
    return RedisBroker.from_url(url, namespace=ns), RedisResultBackend.from_url(url, namespace=ns)


def _postgres(request, tmp_path):
    url = request.getfixturevalue("postgres_url")
    ns = request.getfixturevalue("namespace")
    from stem.backends.postgres import PostgresResultBackend
    from stem.brokers.postgres import PostgresBroker
    broker = PostgresBroker.from_url(url, schema=ns)
    backend = PostgresResultBackend.from_url(url, schema=ns)
    request.addfinalizer(lambda: _drop_schema(url, ns))
    return broker, backend


def _drop_schema(url, schema):
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


ADAPTERS = {"memory": _memory, "sqlite": _sqlite, "redis": _redis, "postgres": _postgres}


@pytest.fixture(params=sorted(ADAPTERS))
def cluster(request, tmp_path):
    """Two workers (inline engine: the control plane is engine-independent) sharing one broker."""
    broker, backend = ADAPTERS[request.param](request, tmp_path)
    registry = TaskRegistry()
    journal = Journal(tmp_path / "journal")
    release = journal.flag("release")

    @registry.task("block")
    def block(ctx):
        journal.add(ctx.id)
        wait_flag(release, 30)
        return "done"

    registry.task("add")(lambda ctx, a, b: a + b)
    workers = []

    def start(**kw):
        kw.setdefault("concurrency", 1)
        kw.setdefault("lifecycle", NO_SIGNALS)
        kw.setdefault("isolation", "inline")
        kw.setdefault("heartbeat_interval", 0.2)
        w = Worker(broker, backend, registry, **kw)
        w.run_in_background()
        workers.append(w)
        return w

    class C:
        pass

    c = C()
    c.broker, c.backend, c.registry, c.journal, c.release = broker, backend, registry, journal, release
    c.stem = Stem(broker, backend, registry)
    c.control = Control(broker, backend)
    c.start = start
    c.live = lambda: {h["worker_id"] for h in backend.heartbeats()}
    yield c
    set_flag(release)
    for w in workers:
        w.shutdown(ShutdownMode.HARD, timeout=20)
    broker.close()
    backend.close()


@pytest.mark.timeout(90)
def test_ping_and_stats_reach_every_worker(cluster):
    a, b = cluster.start(), cluster.start()
    assert wait_until(lambda: {a.id, b.id} <= cluster.live())
    pongs = cluster.control.ping(timeout=10)
    assert {p["worker"] for p in pongs} == {a.id, b.id}
    assert all(p["reply"]["pong"] for p in pongs)
    stats = cluster.control.stats(timeout=10)
    assert {s["worker"] for s in stats} == {a.id, b.id}
    assert all("processed" in s["reply"] and s["reply"]["concurrency"] == 1 for s in stats)


@pytest.mark.timeout(90)
def test_revoke_of_a_queued_task_prevents_it_running_also_on_a_worker_started_later(cluster):
    a = cluster.start(queues=["other"])
    assert wait_until(lambda: a.id in cluster.live())
    tid = cluster.stem.enqueue("add", {"a": 1, "b": 2})
    cluster.control.revoke(tid, timeout=5)
    cluster.start()  # consumes "default" after the revoke
    status = cluster.stem.wait_for_task(tid, timeout=30)
    assert status.state is TaskState.REVOKED


@pytest.mark.timeout(90)
def test_revoke_terminate_stops_a_running_task_and_marks_it_revoked(cluster):
    w = cluster.start()
    tid = cluster.stem.enqueue("block")
    assert wait_until(lambda: cluster.journal.lines() == [tid], timeout=30)
    # a heartbeat can miss a beat (SQLite busy): the broadcast targets workers it can see
    assert wait_until(lambda: w.id in cluster.live(), timeout=30)
    replies = cluster.control.revoke(tid, terminate=True, timeout=10)
    assert replies and replies[0]["reply"]["terminated"] == [tid]
    status = cluster.stem.wait_for_task(tid, timeout=30)
    assert status.state is TaskState.REVOKED
    assert wait_until(lambda: w.stats()["revoked"] >= 1)


@pytest.mark.timeout(90)
def test_pause_stops_a_queue_on_one_worker_only(cluster):
    a, b = cluster.start(), cluster.start()
    assert wait_until(lambda: {a.id, b.id} <= cluster.live())
    [reply] = cluster.control.pause("default", workers=[a.id], timeout=10)
    assert reply["worker"] == a.id and reply["reply"]["paused"] == ["default"]
    ids = cluster.stem.enqueue_many([("add", {"a": i, "b": 0}) for i in range(20)])
    for i in ids:
        cluster.stem.wait_for_task(i, timeout=30)
    workers = {cluster.stem.get_status(i).worker for i in ids}
    assert workers == {b.id}
    cluster.control.resume("default", workers=[a.id], timeout=10)
    assert wait_until(lambda: a.stats()["paused"] == [])


@pytest.mark.timeout(90)
def test_shutdown_of_one_worker_leaves_the_other_running(cluster):
    a, b = cluster.start(), cluster.start()
    assert wait_until(lambda: {a.id, b.id} <= cluster.live())
    cluster.control.shutdown("warm", workers=[a.id], timeout=10)
    assert a.join(30)
    assert not b.join(0.1)
    assert cluster.stem.wait_for_task(cluster.stem.enqueue("add", {"a": 2, "b": 2}), timeout=30).result == 4


@pytest.mark.timeout(90)
def test_inspect_lists_running_and_reserved_tasks(cluster):
    w = cluster.start(prefetch_multiplier=2)
    first = cluster.stem.enqueue("block")
    second = cluster.stem.enqueue("block")
    assert wait_until(lambda: cluster.journal.lines() == [first], timeout=30)
    assert wait_until(lambda: w.stats()["in_flight"] == 2, timeout=30)
    assert wait_until(lambda: w.id in cluster.live(), timeout=30)
    [reply] = cluster.control.inspect(timeout=10)
    running = reply["reply"]["running"]
    assert [r["id"] for r in running] == [first] and running[0]["name"] == "block"
    assert [r["id"] for r in reply["reply"]["reserved"]] == [second]


def test_pool_grow_and_shrink_change_concurrency():
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    registry = TaskRegistry()
    registry.task("pid")(lambda ctx: os.getpid())
    w = Worker(broker, backend, registry, concurrency=1, lifecycle=NO_SIGNALS, heartbeat_interval=0.2)
    w.run_in_background()
    try:
        control = Control(broker, backend)
        assert wait_until(lambda: w.id in {h["worker_id"] for h in backend.heartbeats()})
        [r] = control.pool_grow(2, timeout=10)
        assert r["reply"]["concurrency"] == 3
        assert wait_until(lambda: len([c for c in w.stats()["children"] if c["state"] == "ready"]) == 3)
        [r] = control.pool_shrink(1, timeout=10)
        assert r["reply"]["concurrency"] == 2
        assert wait_until(lambda: len(w.stats()["children"]) == 2)
        stem = Stem(broker, backend, registry)
        assert stem.wait_for_task(stem.enqueue("pid"), timeout=30).state is TaskState.SUCCEEDED
    finally:
        w.shutdown(timeout=20)


def test_control_commands_are_signed_and_unsigned_ones_are_ignored():
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    signer = PayloadSigner({"k": b"k" * 32})
    registry = TaskRegistry()
    w = Worker(broker, backend, registry, concurrency=1, isolation="inline", lifecycle=NO_SIGNALS, signer=signer,
               heartbeat_interval=0.2)
    w.run_in_background()
    try:
        assert wait_until(lambda: w.id in {h["worker_id"] for h in backend.heartbeats()})
        assert Control(broker, backend).ping(timeout=1.0) == []  # unsigned: ignored
        assert [r["worker"] for r in Control(broker, backend, signer).ping(timeout=10)] == [w.id]
    finally:
        w.shutdown(timeout=20)


def test_control_signals_fire_on_the_worker():
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    seen = []
    r1 = signals.control_command_received.connect(lambda s, command, arguments: seen.append(("in", command)))
    r2 = signals.control_command_completed.connect(lambda s, command, reply: seen.append(("out", command)))
    w = Worker(broker, backend, TaskRegistry(), concurrency=1, isolation="inline", lifecycle=NO_SIGNALS,
               heartbeat_interval=0.2)
    w.run_in_background()
    try:
        assert wait_until(lambda: w.id in {h["worker_id"] for h in backend.heartbeats()})
        Control(broker, backend).ping(timeout=10)
        assert wait_until(lambda: seen == [("in", "ping"), ("out", "ping")])
    finally:
        signals.control_command_received.disconnect(r1)
        signals.control_command_completed.disconnect(r2)
        w.shutdown(timeout=20)


def test_bad_control_input_is_rejected_before_sending():
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    control = Control(broker, backend)
    with pytest.raises(ControlError, match="unknown control command"):
        control.broadcast("explode")
    with pytest.raises(ControlError, match="shutdown mode"):
        control.shutdown("gentle")
    with pytest.raises(ControlError, match="task ids"):
        control.revoke([])
    with pytest.raises(ControlError, match="no live worker matches"):
        control.ping(workers=["nobody"])
    with pytest.raises(ControlError, match="n must be"):
        control.pool_grow(0)
    from stem.errors import ConfigurationError
    with pytest.raises(ConfigurationError, match="result backend"):
        Control(broker, None)


def test_control_queue_names_are_valid_and_internal():
    from stem.brokers.base import validate_queue_name
    q = control_queue("host name/with:odd*chars:123:abc")
    assert validate_queue_name(q) == q and is_internal_queue(q)
