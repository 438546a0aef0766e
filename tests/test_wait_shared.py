"""Waits share their connections: Redis (one pub/sub listener + one command connection, whatever
the number of waits; a lost or restarted server), SQLite (one poller per backend instance)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from stem.backends.redis import RedisResultBackend
from stem.backends.sqlite import SqliteResultBackend
from stem.errors import BackendConnectionError
from stem.results import TaskState, TaskStatus
from tests.support import drop_namespace, wait_for


def tid() -> str:
    return uuid.uuid4().hex


def ok(i: str) -> TaskStatus:
    return TaskStatus(id=i, state=TaskState.SUCCEEDED, result=i)


@pytest.fixture
def named(redis_url, namespace):
    """A backend whose connections carry a client name of their own (its own pool, too), a
    plain client to watch the server with, and a second backend that does the storing."""
    name = "stemwait-" + uuid.uuid4().hex[:10]
    sep = "&" if "?" in redis_url else "?"
    backend = RedisResultBackend.from_url(f"{redis_url}{sep}client_name={name}", namespace=namespace)
    storer = RedisResultBackend.from_url(redis_url, namespace=namespace)
    raw = redis.Redis.from_url(redis_url)
    yield backend, storer, raw, name
    backend.close()
    storer.close()
    drop_namespace(raw, namespace)
    raw.close()


def connections(raw, name: str) -> list[dict]:
    return [c for c in raw.client_list() if c.get("name") == name]


def subscriptions(raw, name: str) -> int:
    return sum(int(c.get("sub", 0)) for c in connections(raw, name))


def _many_concurrent_waits_use_two_connections(named, n_threads: int, n_many: int) -> None:
    backend, storer, raw, name = named
    thread_ids = [tid() for _ in range(n_threads)]
    many_ids = [tid() for _ in range(n_many)]
    results: dict = {}
    old = threading.stack_size(256 * 1024)
    try:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, backend.wait(i, 120.0)))
                   for i in thread_ids]
        threads.append(threading.Thread(target=lambda: results.__setitem__("many", backend.wait_many(many_ids, 120.0))))
        for t in threads:
            t.start()
    finally:
        threading.stack_size(old)
    total = n_threads + n_many
    wait_for(lambda: subscriptions(raw, name) == total, timeout=60, what=f"{total} subscriptions")
    peak = len(connections(raw, name))
    for start in range(0, total, 5000):
        storer.store_many([ok(i) for i in (thread_ids + many_ids)[start:start + 5000]])
        peak = max(peak, len(connections(raw, name)))
    for t in threads:
        t.join(120)
    peak = max(peak, len(connections(raw, name)))
    assert all(results[i].result == i for i in thread_ids)
    assert len(results["many"]) == n_many
    assert peak <= 2, f"{peak} connections for {total} concurrent waits"
    wait_for(lambda: subscriptions(raw, name) == 0, timeout=30, what="every channel unsubscribed")


def test_ten_thousand_concurrent_waits_use_at_most_two_connections(named):
    _many_concurrent_waits_use_two_connections(named, n_threads=1000, n_many=9000)


@pytest.mark.slow
def test_a_hundred_thousand_concurrent_waits_use_at_most_two_connections(named):
    _many_concurrent_waits_use_two_connections(named, n_threads=2000, n_many=98000)


def test_waiters_survive_the_listener_connection_being_killed(named):
    backend, storer, raw, name = named
    ids = [tid() for _ in range(50)]
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(backend.wait_many(ids, 60.0)))
    t.start()
    wait_for(lambda: subscriptions(raw, name) == len(ids), timeout=20, what="subscribed")
    [listener] = [c for c in connections(raw, name) if int(c.get("sub", 0))]
    raw.execute_command("CLIENT", "KILL", "ID", listener["id"])       # the fault: the pub/sub link drops
    storer.store_many([ok(i) for i in ids[:25]])                      # while it is gone, or just back
    wait_for(lambda: subscriptions(raw, name) == len(ids) - 25, timeout=20, what="subscribed again")
    storer.store_many([ok(i) for i in ids[25:]])                      # announced on the new connection
    t.join(30)
    assert set(out) == set(ids)


def test_waiters_get_statuses_stored_after_a_redis_restart(redis_server):
    backend = RedisResultBackend.from_url(redis_server.url, namespace="w")
    try:
        before = tid()
        backend.store(ok(before))
        ids = [tid() for _ in range(20)]
        results: dict = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, backend.wait(i, 60.0))) for i in ids]
        threads.append(threading.Thread(target=lambda: results.__setitem__("many", backend.wait_many(ids, 60.0))))
        for t in threads:
            t.start()
        raw = redis.Redis(port=redis_server.port)
        wait_for(lambda: int(raw.execute_command("PUBSUB", "NUMSUB", backend._channel(ids[-1]))[1]) == 1,
                 timeout=20, what="subscribed")
        raw.close()
        redis_server.restart()                       # SIGKILL, then a new server on the same port
        other = RedisResultBackend.from_url(redis_server.url, namespace="w")
        try:
            other.store_many([ok(i) for i in ids[:10]])  # maybe before the listener is back: the re-read finds them
            raw = redis.Redis(port=redis_server.port)
            wait_for(lambda: int(raw.execute_command("PUBSUB", "NUMSUB", backend._channel(ids[-1]))[1]) == 1,
                     timeout=20, what="subscribed again")
            raw.close()
            other.store_many([ok(i) for i in ids[10:]])  # announced to the new subscription
        finally:
            other.close()
        for t in threads:
            t.join(60)
        assert all(results[i] is not None and results[i].result == i for i in ids)
        assert set(results["many"]) == set(ids)
        assert backend.wait(before, 5.0).result == before      # appendfsync always: it survived
    finally:
        backend.close()


def test_a_wait_fails_once_redis_stays_unreachable_for_reconnect_timeout(redis_server):
    backend = RedisResultBackend.from_url(redis_server.url, namespace="w", reconnect_timeout=1.0)
    try:
        outcome: list = []

        def wait():
            try:
                outcome.append(backend.wait_many(["never"], 60.0))
            except BackendConnectionError as exc:
                outcome.append(exc)

        t = threading.Thread(target=wait)
        t.start()
        raw = redis.Redis(port=redis_server.port)
        wait_for(lambda: int(raw.execute_command("PUBSUB", "NUMSUB", backend._channel("never"))[1]) == 1,
                 timeout=20, what="subscribed")
        raw.close()
        redis_server.kill()
        t0 = time.monotonic()
        t.join(20)
        assert not t.is_alive() and isinstance(outcome[0], BackendConnectionError)
        assert 0.9 <= time.monotonic() - t0 < 10.0
    finally:
        backend.close()


def test_closing_the_backend_ends_its_waits_with_an_error(named):
    from stem.errors import BackendError
    backend, _, raw, name = named
    outcome: list = []

    def wait():
        try:
            outcome.append(backend.wait_many(["never"], 60.0))
        except BackendError as exc:
            outcome.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    wait_for(lambda: subscriptions(raw, name) == 1, timeout=20, what="subscribed")
    backend.close()
    t.join(10)
    assert not t.is_alive() and isinstance(outcome[0], BackendError)


# -- SQLite: one poller per instance ------------------------------------------------------------
def test_sqlite_waits_share_one_poller_reading_every_id_in_one_query(tmp_path, monkeypatch):
    backend = SqliteResultBackend(str(tmp_path / "r.db"))
    storer = SqliteResultBackend(str(tmp_path / "r.db"))     # another instance: no in-process wake-up
    try:
        reads: list[int] = []
        real = backend._read_found
        monkeypatch.setattr(backend, "_read_found", lambda ids: reads.append(len(ids)) or real(ids))
        backend._waits._read = backend._read_found
        ids = [tid() for _ in range(300)]
        results: dict = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, backend.wait(i, 30.0))) for i in ids]
        for t in threads:
            t.start()
        wait_for(lambda: len(backend._waits.waited_ids()) == len(ids), timeout=20, what="all registered")
        pollers = [t for t in threading.enumerate() if t.name == "stem-wait-sqlite" and t.is_alive()]
        assert len(pollers) == 1
        wait_for(lambda: reads and reads[-1] == len(ids), timeout=20, what="a poll of every waited id")
        reads.clear()
        time.sleep(0.5)     # idle: measure how often the poller reads (the figure under test is a rate)
        idle_reads = list(reads)
        t0 = time.monotonic()
        storer.store_many([ok(i) for i in ids])
        for t in threads:
            t.join(30)
        assert all(results[i].result == i for i in ids)
        assert time.monotonic() - t0 < 2.0
        assert 1 <= len(idle_reads) <= 20, idle_reads           # ~every 50 ms, not once per waiter
        assert all(n == len(ids) for n in idle_reads)          # each poll: every waited id in one read
    finally:
        backend.close()
        storer.close()
