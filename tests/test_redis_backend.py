"""RedisResultBackend beyond the shared contract: TTLs, cross-process wait, no polling, round trips."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

from stem.backends import from_url as backend_from_url
from stem.backends.groups import GroupRecord
from stem.backends.redis import RedisResultBackend
from stem.errors import BackendConnectionError, ConfigurationError
from stem.results import TaskState, TaskStatus

from .support import drop_namespace

pytestmark = pytest.mark.redis


@pytest.fixture
def private_backend(private_redis_url, namespace, private_raw):
    b = RedisResultBackend.from_url(private_redis_url, namespace=namespace, result_expires=600)
    yield b
    b.close()


@pytest.fixture
def backend(redis_url, namespace, raw):
    b = RedisResultBackend.from_url(redis_url, namespace=namespace, result_expires=600)
    yield b
    b.close()


def tid() -> str:
    return uuid.uuid4().hex


def test_statuses_carry_the_result_expires_ttl_under_the_namespace(backend, raw, namespace):
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.SUCCEEDED, result=1))
    key = f"{namespace}:{{t:{i}}}:status"
    assert 590_000 < raw.pttl(key) <= 600_000


def test_store_many_is_one_round_trip(backend, monkeypatch):
    backend.ping()
    calls = []
    original = redis.connection.AbstractConnection.send_packed_command
    me = threading.get_ident()

    def counting(conn, command, check_health=True):
        if threading.get_ident() == me:
            calls.append(1)
        return original(conn, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    backend.store_many([TaskStatus(id=tid(), state=TaskState.SUCCEEDED, result=n) for n in range(100)])
    assert len(calls) == 1


_STORE_LATER = """
import sys, time
from stem.backends.groups import GroupRecord
from stem.backends.redis import RedisResultBackend
from stem.results import TaskState, TaskStatus
b = RedisResultBackend.from_url(sys.argv[1], namespace=sys.argv[2])
time.sleep(float(sys.argv[4]))
b.store(TaskStatus(id=sys.argv[3], state=TaskState.SUCCEEDED, result={"from": "child"}))
b.close()
"""


def test_wait_returns_a_status_stored_by_another_process(backend, redis_url, namespace):
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.RUNNING))
    child = subprocess.Popen([sys.executable, "-c", _STORE_LATER, redis_url, namespace, i, "0.5"])
    try:
        t0 = time.monotonic()
        got = backend.wait(i, 30.0)
        assert got.state is TaskState.SUCCEEDED and got.result == {"from": "child"}
        assert time.monotonic() - t0 < 20.0
    finally:
        assert child.wait(30) == 0


def test_wait_does_not_poll_the_server(backend, monkeypatch):
    """While it waits, nothing is sent to Redis after the SUBSCRIBE and the one read behind it:
    count what every thread of the process writes (the wait's listener and reader included)."""
    backend.ping()
    sent = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(conn, command, check_health=True):
        sent.append(b"".join(command) if isinstance(command, (list, tuple)) else command)
        return original(conn, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    t0 = time.monotonic()
    assert backend.wait(tid(), 1.5) is None
    assert time.monotonic() - t0 >= 1.4
    reads = [c for c in sent if b"GET\r\n" in c]
    assert len(reads) == 1      # one GET after the SUBSCRIBE is confirmed; then it sleeps on the channel
    # "$9\r\nSUBSCRIBE": not the UNSUBSCRIBE the listener may send once the wait returned
    assert len([c for c in sent if b"$9\r\nSUBSCRIBE\r\n" in c]) == 1
    assert len(sent) <= 8       # + UNSUBSCRIBE and the new connections' handshakes


def test_a_terminal_store_right_after_subscribe_is_not_missed(backend):
    """The race get-vs-subscribe: many waiters, each store lands while they start waiting."""
    ids = [tid() for _ in range(30)]
    results = {}

    def waiter(i):
        results[i] = backend.wait(i, 20.0)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for i in ids:
        backend.store(TaskStatus(id=i, state=TaskState.FAILED, error="x"))
    for t in threads:
        t.join(30)
    assert all(results[i] is not None and results[i].state is TaskState.FAILED for i in ids)


def test_heartbeats_are_indexed_without_keys_and_pruned(backend, raw, namespace):
    backend.put_heartbeat("w1", {"pid": 1}, ttl=0.2)
    backend.put_heartbeat("w2", {"pid": 2}, ttl=30)
    index = f"{namespace}:{{hb}}:index"
    assert raw.zcard(index) == 2
    deadline = time.monotonic() + 5
    while raw.exists(f"{namespace}:{{hb}}:w:w1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [b["worker_id"] for b in backend.heartbeats()] == ["w2"]
    assert raw.zrange(index, 0, -1) == [b"w2"]


def test_schedule_records_are_hash_tagged_hashes_indexed_in_a_set_without_expiry(backend, raw, namespace):
    backend.put_schedule("nightly", b"def")
    backend.mark_fired("code-only", 1_700_000_000.5, "sched:code-only:1700000000500")
    record, index = f"{namespace}:{{sched}}:s:nightly", f"{namespace}:{{sched}}:index"
    assert raw.smembers(index) == {b"nightly", b"code-only"}
    assert raw.hgetall(record) == {b"def": b"def", b"paused": b"0", b"updated_at": raw.hget(record, "updated_at")}
    for key in (record, index, f"{namespace}:{{sched}}:s:code-only"):
        assert raw.ttl(key) == -1          # records never expire
    assert all(k.startswith(f"{namespace}:{{sched}}:".encode()) for k in raw.keys(f"{namespace}:*"))
    assert backend.remove_schedule("nightly") is True
    assert raw.smembers(index) == {b"code-only"} and not raw.exists(record)


def test_schedule_writes_survive_a_flushed_script_cache(private_backend, private_raw):
    backend, raw = private_backend, private_raw
    backend.put_schedule("s", None)
    raw.script_flush()
    backend.mark_fired("s", 10.0, "r10")
    raw.script_flush()
    assert backend.pause_schedule("s", True) is True
    r = backend.schedule_records(["s"])["s"]
    assert (r.paused, r.last_fired, r.last_run_id) == (True, 10.0, "r10")


def test_url_dispatch_builds_a_redis_backend(redis_url, namespace):
    b = backend_from_url(redis_url, namespace=namespace, result_expires=60)
    try:
        assert isinstance(b, RedisResultBackend) and b.result_expires == 60.0
    finally:
        b.close()


def test_an_unreachable_server_is_a_backend_connection_error():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = RedisResultBackend.from_url(f"redis://127.0.0.1:{port}/0", retry_attempts=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendConnectionError):
            b.get("x")
        assert time.monotonic() - t0 < 5.0
    finally:
        b.close()


@pytest.mark.parametrize("kwargs", [dict(namespace="a b"), dict(result_expires=0), dict(retry_attempts=0)])
def test_bad_arguments_are_configuration_errors(redis_url, kwargs):
    with pytest.raises(ConfigurationError):
        RedisResultBackend.from_url(redis_url, **kwargs)


def test_store_and_ack_in_one_round_trip_survives_a_flushed_script_cache(private_backend, private_redis_url,
                                                                          namespace, private_raw, monkeypatch):
    backend, redis_url, raw = private_backend, private_redis_url, private_raw
    from stem.brokers.base import Message
    from stem.brokers.redis import RedisBroker
    broker = RedisBroker.from_url(redis_url, namespace=namespace)
    try:
        broker.publish_many([Message(tid(), "q", b"f", 0, None, None) for _ in range(4)])
        got = broker.consume(["q"], 4, 2.0)
        assert len(got) == 4
        raw.script_flush()
        statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, result=i) for i, d in enumerate(got)]
        backend.ping()
        calls = []
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(conn, command, check_health=True):
            calls.append(1)
            return original(conn, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        assert backend.store_many_and_ack(statuses, broker, got) is True
        monkeypatch.undo()
        assert [backend.get(d.task_id).result for d in got] == [0, 1, 2, 3]
        assert broker.stats("q") == ("q", 0, 0, 0, 0, 0)
        # one round trip, plus (only because the cache was flushed) the script loads and the resend
        assert len(calls) >= 2
        calls.clear()
        broker.publish_many([Message(tid(), "q", b"f", 0, None, None)])
        got = broker.consume(["q"], 1, 2.0)
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        backend.store_many_and_ack([TaskStatus(id=got[0].task_id, state=TaskState.SUCCEEDED)], broker, got)
        monkeypatch.undo()
        assert len(calls) == 1
    finally:
        broker.close()


def test_each_status_gets_its_own_px_on_every_store_path(backend, raw, namespace, redis_url):
    """TaskStatus.ttl becomes the key's PX in the same pipeline: store_many, the fused store+ack
    and store+ack+consume, and store_if_not_terminal (at least result_expires for a RUNNING)."""
    from stem.brokers.base import Message
    from stem.brokers.redis import RedisBroker

    def pttl(i):
        return raw.pttl(f"{namespace}:{{t:{i}}}:status")

    a, b = tid(), tid()
    backend.store_many([TaskStatus(id=a, state=TaskState.SUCCEEDED, ttl=30), TaskStatus(id=b, state=TaskState.FAILED)])
    assert 25_000 < pttl(a) <= 30_000 and 590_000 < pttl(b) <= 600_000
    short, long = tid(), tid()
    backend.store_if_not_terminal([TaskStatus(id=short, state=TaskState.RUNNING, ttl=30),
                                   TaskStatus(id=long, state=TaskState.RUNNING, ttl=3600)])
    assert 590_000 < pttl(short) <= 600_000 and 3_590_000 < pttl(long) <= 3_600_000
    broker = RedisBroker.from_url(redis_url, namespace=namespace)
    try:
        broker.publish_many([Message(tid(), "q", b"f", 0, None, None) for _ in range(4)])
        got = broker.consume(["q"], 2, 2.0)
        assert backend.store_many_and_ack([TaskStatus(id=got[0].task_id, state=TaskState.SUCCEEDED, ttl=40),
                                           TaskStatus(id=got[1].task_id, state=TaskState.DEAD, ttl=7200)],
                                          broker, got) is True
        assert 35_000 < pttl(got[0].task_id) <= 40_000 and 7_190_000 < pttl(got[1].task_id) <= 7_200_000
        more = broker.consume(["q"], 1, 2.0)
        leased = backend.store_many_ack_and_consume([TaskStatus(id=more[0].task_id, state=TaskState.SUCCEEDED,
                                                                ttl=50)], broker, more, ["q"], 1, "c")
        assert len(leased) == 1 and 45_000 < pttl(more[0].task_id) <= 50_000
    finally:
        broker.close()


def test_a_batch_of_statuses_is_one_command_that_stores_all_and_publishes_the_terminal_ones(backend, raw, namespace):
    ids = [tid() for _ in range(3)]
    statuses = [TaskStatus(id=ids[0], state=TaskState.SUCCEEDED, result=1),
                TaskStatus(id=ids[1], state=TaskState.RUNNING),
                TaskStatus(id=ids[2], state=TaskState.FAILED, error="boom", ttl=30.0)]
    commands = backend._status_commands(statuses)
    assert len(commands) == 1 and commands[0][0] == "EVALSHA"
    sub = raw.pubsub()
    sub.subscribe(*[backend.done_channel(i) for i in ids])
    for _ in ids:                                   # the three subscribe confirmations
        assert sub.get_message(timeout=5)["type"] == "subscribe"
    backend.store_many(statuses)
    got = []
    while len(got) < 2:
        m = sub.get_message(timeout=5)
        assert m is not None, got
        got.append((m["channel"].decode(), m["data"]))
    assert sub.get_message(timeout=0.2) is None     # the RUNNING status is not published
    sub.close()
    assert got == [(backend.done_channel(i), raw.get(f"{namespace}:{{t:{i}}}:status")) for i in (ids[0], ids[2])]
    assert [backend.get(i).state for i in ids] == [TaskState.SUCCEEDED, TaskState.RUNNING, TaskState.FAILED]
    assert 29_000 < raw.pttl(f"{namespace}:{{t:{ids[2]}}}:status") <= 30_000
    assert raw.pttl(f"{namespace}:{{t:{ids[1]}}}:status") > backend.result_expires * 1000 - 5_000


def test_more_statuses_than_one_call_takes_are_split(backend, monkeypatch):
    import stem.backends.redis as module
    monkeypatch.setattr(module, "_STATUSES_PER_CALL", 2)
    statuses = [TaskStatus(id=tid(), state=TaskState.SUCCEEDED, result=i) for i in range(5)]
    assert len(backend._status_commands(statuses)) == 3
    backend.store_many(statuses)
    assert [backend.get(s.id).result for s in statuses] == list(range(5))


def test_settle_and_refill_after_a_flushed_script_cache_store_every_result(private_backend, private_redis_url,
                                                                           namespace, private_raw):
    """The results' script is the backend's, sent in the broker's pipeline: the NOSCRIPT it
    meets there loads it too."""
    from stem.brokers.base import Message
    from stem.brokers.redis import RedisBroker
    backend, raw = private_backend, private_raw
    broker = RedisBroker.from_url(private_redis_url, namespace=namespace)
    try:
        broker.publish_many([Message(tid(), "q", b"f", 0, None, None) for _ in range(6)])
        got = broker.consume(["q"], 3, 2.0)
        raw.script_flush()
        statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, result=i) for i, d in enumerate(got)]
        more = backend.store_many_ack_and_consume(statuses, broker, got, ["q"], 10, "c")
        assert more is not None and len(more) == 3
        assert [backend.get(s.id).result for s in statuses] == [0, 1, 2]
        assert broker.stats("q")[1:3] == (0, 3)     # the three settled are acked; three leased
    finally:
        broker.close()


@pytest.mark.parametrize("refill", [False, True])
def test_counts_acks_and_refill_in_one_round_trip_survive_a_flushed_script_cache(private_backend, private_redis_url,
                                                                                 namespace, private_raw, refill):
    """``store_record_and_ack`` after a Redis restart emptied the script cache: the counts
    (the backend's script), the acks and the consume (the broker's) are loaded and sent
    again; each member counts once, the completion is answered and noted once."""
    backend, raw = private_backend, private_raw
    from stem.brokers.base import Message
    from stem.brokers.redis import RedisBroker
    broker = RedisBroker.from_url(private_redis_url, namespace=namespace)
    try:
        g = "g-" + tid()
        backend.group_create(g, 2, b"d", seal_by=time.time() + 60, ttl=60)
        backend.group_seal(g)
        broker.publish_many([Message(f"{g}.{i}", "q", b"f") for i in range(2)] + [Message("next", "q", b"n")])
        got = broker.consume(["q"], 2, 2.0)
        assert sorted(d.task_id for d in got) == [f"{g}.0", f"{g}.1"]
        raw.script_flush()
        statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, result=1) for d in got]
        members = [(g, d.task_id, int(d.task_id.rsplit(".", 1)[1]), True, b"\x92\x01\x01", None) for d in got]
        records, leased = backend.store_record_and_ack(statuses, members, broker, got, *(
            (["q"], 5, "w") if refill else ()))
        assert isinstance(records[-1], GroupRecord) and records[-1].complete and records[-1].finished == 2
        assert (leased is None) if not refill else [d.task_id for d in leased] == ["next"]
        assert broker.stats("q").in_flight == (1 if refill else 0)
        assert [r.id for r in backend.group_completions_due(time.time() + 1)] == [g]
        assert raw.zcard(f"{namespace}:{{groups}}:completing") == 1
    finally:
        broker.close()
