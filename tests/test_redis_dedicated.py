"""The dedicated connection of a Redis pool (``stem.stores.redis_dedicated``): round trips on one
checked-out connection, the pool when it is busy, and every way it goes stale -- an error, the
pool's disconnect and reset, a fork, a Sentinel failover, a server restart -- with no enqueue
lost and no error but stem's."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from stem import PayloadSigner, Stem, TaskRegistry
from stem.backends.redis import RedisResultBackend
from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Message
from stem.brokers.redis import RedisBroker
from stem.errors import BrokerConnectionError, StemError
from stem.stores.redis_dedicated import dedicated
from stem.stores.redis_pipe import execute_one, pack_command, pack_commands

from .support import wait_for

pytestmark = pytest.mark.redis

registry = TaskRegistry()


@registry.task("ded.echo")
def echo(ctx, i: int = 0) -> int:
    return i


def _stem(url: str, namespace: str, **kw) -> Stem:
    return Stem(RedisBroker(url, namespace=namespace, **kw), RedisResultBackend(url, namespace=namespace),
                registry, PayloadSigner({"k": b"k" * 32}, "k"))


def _stored_ids(url: str, stem: Stem) -> list[str]:
    key = stem.broker.queue_keys("default")[0]
    with redis.Redis.from_url(url) as r:
        return [fields[b"t"].decode() for _, fields in r.xrange(key)]


class _Counting:
    """Counts a pool's checkouts (``get_connection``)."""

    def __init__(self, pool, monkeypatch):
        self.n = 0
        real = pool.get_connection

        def get_connection(*a, **k):
            self.n += 1
            return real(*a, **k)
        monkeypatch.setattr(pool, "get_connection", get_connection)


def test_round_trips_use_one_checked_out_connection_without_a_checkout_each(redis_url, namespace, monkeypatch):
    stem = _stem(redis_url, namespace)
    try:
        stem.enqueue("ded.echo", {"i": 0})
        pool = stem.broker._client.connection_pool
        d = dedicated(pool)
        assert d is not None and d.conn in pool._in_use_connections
        counting = _Counting(pool, monkeypatch)
        ids = [stem.enqueue("ded.echo", {"i": i}) for i in range(50)]
        assert counting.n == 0
        assert _stored_ids(redis_url, stem)[1:] == ids
    finally:
        stem.close()
    assert dedicated(pool) is None and not pool._in_use_connections   # handed back on close


def test_a_spliced_xadd_is_the_packed_command_byte_for_byte(redis_url, namespace, monkeypatch):
    broker = RedisBroker(redis_url, namespace=namespace)
    try:
        sent = []
        import stem.brokers.redis as module
        real = module._group_execute_one
        monkeypatch.setattr(module, "_group_execute_one",
                            lambda c, packed, r=False: (sent.append(packed), real(c, packed, r))[1])
        for m in (Message("a" * 32, "q", b"f1"), Message("b" * 32, "q", b"\r\n" * 10, 9),
                  Message("id-\u00e9", "q", bytearray(b"x" * 300), 3, None, 12.5)):
            broker.publish(m)   # the first declares the queue (publish_many); then spliced
            broker.publish(m)
        keys = broker.queue_keys("q")
        expected = [pack_command("XADD", keys[p], "*", "t", tid, "f", bytes(f), "p", p, "v", vt)
                    for tid, f, p, vt in (("a" * 32, b"f1", 0, 0), ("b" * 32, b"\r\n" * 10, 9, 0),
                                          ("id-\u00e9", b"x" * 300, 3, 12500))]
        assert sent == [expected[0], expected[1], expected[1], expected[2], expected[2]]
        assert broker.stats("q").ready == 6
    finally:
        broker.close()


def test_a_thread_that_finds_it_busy_takes_a_pooled_connection(redis_url, namespace, monkeypatch):
    stem = _stem(redis_url, namespace)
    try:
        stem.enqueue("ded.echo")
        pool = stem.broker._client.connection_pool
        counting = _Counting(pool, monkeypatch)
        d = dedicated(pool)
        with d.lock:                       # another caller's round trip in flight
            tid = stem.enqueue("ded.echo")
        assert counting.n == 1 and tid in _stored_ids(redis_url, stem)
        assert pool._in_use_connections == {d.conn}     # the pooled one went back
    finally:
        stem.close()


def test_threads_enqueueing_at_once_all_land(redis_url, namespace):
    stem = _stem(redis_url, namespace)
    ids: list[str] = []
    errors: list[BaseException] = []

    def run():
        try:
            for i in range(200):
                ids.append(stem.enqueue("ded.echo", {"i": i}))
        except BaseException as exc:   # pragma: no cover - reported below
            errors.append(exc)
    try:
        threads = [threading.Thread(target=run) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert sorted(_stored_ids(redis_url, stem)) == sorted(ids) and len(set(ids)) == 1200
    finally:
        stem.close()


def test_an_error_mid_round_trip_drops_it_and_the_retry_checks_out_another(redis_url, namespace):
    stem = _stem(redis_url, namespace)
    try:
        stem.enqueue("ded.echo")
        pool = stem.broker._client.connection_pool
        d = dedicated(pool)
        old = d.conn
        old._sock.shutdown(2)              # the socket dies under the connection
        tid = stem.enqueue("ded.echo")     # fails on the dead socket, retried by the store
        assert tid in _stored_ids(redis_url, stem)
        assert d.conn is not None and d.conn._sock is not None
        assert pool._in_use_connections == {d.conn}
    finally:
        stem.close()


@pytest.mark.parametrize("how", ["disconnect", "reset"])
def test_the_pools_disconnect_and_reset_are_followed(redis_url, namespace, how):
    stem = _stem(redis_url, namespace)
    try:
        stem.enqueue("ded.echo")
        pool = stem.broker._client.connection_pool
        d = dedicated(pool)
        old, old_sock = d.conn, d.conn._sock
        getattr(pool, how)()
        tid = stem.enqueue("ded.echo")
        assert tid in _stored_ids(redis_url, stem)
        assert d.conn._sock is not old_sock and d.conn in pool._in_use_connections
        if how == "reset":                 # the old one is not the pool's any more: closed, not kept
            assert d.conn is not old and old._sock is None
    finally:
        stem.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_writes_on_its_parents_connection(redis_url, namespace):
    stem = _stem(redis_url, namespace)
    try:
        stem.enqueue("ded.echo")
        client = stem.broker._client
        d = dedicated(client.connection_pool)
        parent_conn, parent_sock = d.conn, d.conn._sock
        pid = os.fork()
        if pid == 0:                                     # the child: its own connection
            code = 1
            try:
                ok = all(stem.enqueue("ded.echo", {"i": i}) for i in range(20))
                mine = dedicated(client.connection_pool).conn
                code = 0 if ok and mine is not parent_conn and mine._sock is not parent_sock else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # the parent's connection is in step: each reply is to its own command
        for i in range(20):
            assert execute_one(client, pack_command("ECHO", f"p{i}")) == f"p{i}".encode()
        assert d.conn is parent_conn and d.conn._sock is parent_sock
        assert len(_stored_ids(redis_url, stem)) == 21
    finally:
        stem.close()


def test_a_stopped_server_times_out_through_the_kernel_timeout(redis_server, namespace):
    """The dedicated socket is blocking with SO_RCVTIMEO: a server that stops answering still
    ends the call within the socket timeout, as stem's error."""
    stem = _stem(redis_server.url, namespace, socket_timeout=2.5, retry_attempts=1)
    try:
        stem.enqueue("ded.echo")
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(BrokerConnectionError):
                stem.enqueue("ded.echo")
            assert 2.0 < time.monotonic() - t0 < 8
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        tid = stem.enqueue("ded.echo")
        assert tid in _stored_ids(redis_server.url, stem)
    finally:
        stem.close()


class _Producer(threading.Thread):
    """Enqueues until told to stop: the ids it got back and every error it met."""

    def __init__(self, stem: Stem):
        super().__init__(daemon=True)
        self.stem = stem
        self.ids: list[str] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                self.ids.append(self.stem.enqueue("ded.echo", {"i": i}))
            except BaseException as exc:
                self.errors.append(exc)
                if not isinstance(exc, StemError):
                    return
                time.sleep(0.01)
            i += 1

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive()


def _count_after(producer: _Producer, n: int) -> bool:
    return len(producer.ids) >= n


@pytest.mark.timeout(120)
def test_a_server_restart_mid_stream_loses_no_enqueue(redis_server, namespace):
    stem = _stem(redis_server.url, namespace, retry_attempts=6)
    producer = _Producer(stem)
    try:
        producer.start()
        wait_for(lambda: _count_after(producer, 300), 30, "enqueues before the restart")
        redis_server.kill()                      # kill -9; appendfsync always keeps what was answered
        time.sleep(0.2)                          # down for a while: the producer's retries meet it
        redis_server.start()
        before = len(producer.ids)
        wait_for(lambda: _count_after(producer, before + 300), 30, "enqueues after the restart")
        producer.finish()
        assert all(isinstance(e, StemError) for e in producer.errors), producer.errors
        stored = set(_stored_ids(redis_server.url, stem))
        assert set(producer.ids) <= stored
    finally:
        producer.stop.set()
        stem.close()


@pytest.mark.timeout(180)
def test_a_sentinel_failover_mid_stream_loses_no_enqueue(own_sentinel, namespace):
    """A coordinated failover (writes paused on the old master until the replica has them all,
    as Redis's own FAILOVER does): every enqueue that returned its id is on the new master,
    and the producer met nothing but stem's errors."""
    url = own_sentinel.url()
    stem = _stem(url, namespace, retry_attempts=8)
    producer = _Producer(stem)
    old = own_sentinel.master.port
    try:
        producer.start()
        wait_for(lambda: _count_after(producer, 300), 30, "enqueues before the failover")
        with redis.Redis(port=old) as master:
            master.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
            own_sentinel.wait_replicated()
            with own_sentinel._sentinel_client() as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", own_sentinel.SERVICE)
            wait_for(lambda: own_sentinel.master_port() not in (None, old), 60, "the sentinel to fail over")
            wait_for(lambda: master.info("replication")["role"] == "slave", 60, "the old master to be demoted")
            master.execute_command("CLIENT", "UNPAUSE")
        before = len(producer.ids)
        wait_for(lambda: _count_after(producer, before + 300), 60, "enqueues after the failover")
        producer.finish()
        assert all(isinstance(e, StemError) for e in producer.errors), producer.errors
        new = own_sentinel.master_port()
        key = stem.broker.queue_keys("default")[0]
        with redis.Redis(port=new) as r:
            stored = {fields[b"t"].decode() for _, fields in r.xrange(key)}
        assert set(producer.ids) <= stored
        conn = dedicated(stem.broker._client.connection_pool).conn
        assert conn is not None and conn.port == new
    finally:
        producer.stop.set()
        stem.close()


@pytest.mark.timeout(180)
def test_behind_sentinel_a_kill_9_mid_stream_raises_only_stem_errors(own_sentinel, namespace):
    """kill -9 of the master: Redis's asynchronous replication may lose what the old master
    answered and had not passed on, so the check here is that the producer carries on to the
    promoted replica with nothing but stem's errors, and what it wrote there stays."""
    url = own_sentinel.url()
    stem = _stem(url, namespace, retry_attempts=8)
    producer = _Producer(stem)
    try:
        producer.start()
        wait_for(lambda: _count_after(producer, 300), 30, "enqueues before the kill")
        own_sentinel.failover_by_kill()
        before = len(producer.ids)
        wait_for(lambda: _count_after(producer, before + 300), 60, "enqueues after the failover")
        producer.finish()
        assert all(isinstance(e, StemError) for e in producer.errors), producer.errors
        key = stem.broker.queue_keys("default")[0]
        with redis.Redis(port=own_sentinel.master_port()) as r:
            stored = {fields[b"t"].decode() for _, fields in r.xrange(key)}
        assert set(producer.ids[before + 1:]) <= stored
    finally:
        producer.stop.set()
        stem.close()


def test_behind_sentinel_a_master_the_pool_learned_elsewhere_is_followed(sentinel_setup, namespace, monkeypatch):
    broker = broker_from_url(sentinel_setup.url(), namespace=namespace)
    try:
        broker.publish(Message("a" * 32, "q", b"f"))
        pool = broker._client.connection_pool
        d = dedicated(pool)
        first = d.conn
        counting = _Counting(pool, monkeypatch)
        broker.publish(Message("b" * 32, "q", b"f"))
        assert counting.n == 0
        pool.proxy.master_address = ("127.0.0.1", 1)   # as after another connection's failover lookup
        broker.publish(Message("c" * 32, "q", b"f"))
        assert counting.n == 1 and first._sock is None   # dropped, and checked out anew
        assert broker.stats("q").ready == 3
    finally:
        broker.close()


def test_pipelines_keep_working_beside_it(redis_url, namespace):
    """``execute`` and the C-skipped replies of ``publish_frames`` share the connection."""
    broker = RedisBroker(redis_url, namespace=namespace)
    try:
        broker.publish_frames("q", ["a" * 32, "b" * 32], [b"1", b"2"])
        broker.publish(Message("c" * 32, "q", b"3"))
        client = broker._client
        assert execute_one(client, pack_commands([("PING",)])) == b"PONG"
        got = broker.consume(["q"], 10, 1.0)
        assert [g.task_id for g in got] == ["a" * 32, "b" * 32, "c" * 32]
    finally:
        broker.close()
