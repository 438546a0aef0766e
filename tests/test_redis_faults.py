"""Faults on a real Redis: each test starts its own ``redis-server`` on a free port
(appendonly yes, appendfsync always), kills it with SIGKILL and restarts it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from stem.backends.redis import RedisResultBackend
from stem.brokers.base import Keyed, Message
from stem.brokers.redis import N_LANES, RedisBroker
from stem.errors import BackendConnectionError, BrokerConnectionError
from stem.results import TaskState, TaskStatus
from tests.support import free_port as _free_port

pytestmark = pytest.mark.redis
Q = "faults"


def msg(frame: bytes, **kw) -> Message:
    return Message(uuid.uuid4().hex, Q, frame, **kw)


def test_publish_against_a_dead_server_raises_broker_connection_error_within_a_bounded_time(redis_server):
    broker = RedisBroker.from_url(redis_server.url, namespace="f")
    try:
        broker.publish(msg(b"ok"))
        redis_server.kill()
        t0 = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            broker.publish(msg(b"lost?"))
        assert time.monotonic() - t0 < 5.0
        t0 = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            broker.consume([Q], 1, 1.0)
        assert time.monotonic() - t0 < 5.0
    finally:
        broker.close()


def test_publish_to_a_server_that_never_answered_is_bounded_too():
    broker = RedisBroker.from_url(f"redis://127.0.0.1:{_free_port()}/0", namespace="f")
    try:
        t0 = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            broker.publish_many([msg(b"x")] * 10)
        assert time.monotonic() - t0 < 5.0
    finally:
        broker.close()


def test_consumer_resumes_after_kill_9_and_restart_without_losing_unacked_messages(redis_server):
    broker = RedisBroker.from_url(redis_server.url, namespace="f", default_visibility_timeout=1.0)
    try:
        published = [msg(str(i).encode()) for i in range(20)]
        broker.publish_many(published)
        broker.publish(msg(b"delayed", not_before=time.time() + 1.0))
        acked = broker.consume([Q], 5, 5.0)
        assert len(acked) == 5
        broker.ack(acked)
        unacked = broker.consume([Q], 3, 5.0)
        assert len(unacked) == 3

        redis_server.kill()
        with pytest.raises(BrokerConnectionError):
            broker.consume([Q], 1, 0.5)
        redis_server.start()

        expected = {m.task_id for m in published} - {d.task_id for d in acked}
        expected |= {"delayed"}
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 20
        while set(seen) != expected and time.monotonic() < deadline:
            for d in broker.consume([Q], 50, 0.5):     # the same broker instance reconnects
                seen[d.task_id if d.frame != b"delayed" else "delayed"] = d.delivery_count
                broker.ack([d])
        assert set(seen) == expected
        assert all(seen[d.task_id] == 2 for d in unacked)      # redelivered after their leases
        assert not {d.task_id for d in acked} & set(seen)      # acked before the crash: gone
        assert broker.stats(Q)[1:] == (0, 0, 0, 0)
    finally:
        broker.close()


def test_a_consumer_blocked_in_xread_survives_the_restart(redis_server):
    broker = RedisBroker.from_url(redis_server.url, namespace="f")
    producer = RedisBroker.from_url(redis_server.url, namespace="f", socket_timeout=3.0)
    errors: list[BaseException] = []
    got: list = []
    stop = threading.Event()

    def consume_forever():
        while not stop.is_set() and not got:
            try:
                got.extend(broker.consume([Q], 1, 0.5))
            except BrokerConnectionError as exc:
                errors.append(exc)
                time.sleep(0.1)

    t = threading.Thread(target=consume_forever)
    t.start()
    try:
        time.sleep(0.3)  # let it block first; the assertions do not depend on it
        redis_server.restart()
        producer.publish(msg(b"after"))
        t.join(20)
        assert [bytes(d.frame) for d in got] == [b"after"]
    finally:
        stop.set()
        t.join(10)
        broker.close()
        producer.close()


def test_results_survive_kill_9_and_a_wait_in_progress_fails_fast(redis_server):
    # a wait outlives a short outage (test_wait_shared.py); it fails once it lasts reconnect_timeout
    backend = RedisResultBackend.from_url(redis_server.url, namespace="f", reconnect_timeout=2.0)
    try:
        backend.store(TaskStatus(id="done", state=TaskState.SUCCEEDED, result=42))
        outcome: list = []

        def wait():
            try:
                outcome.append(backend.wait("never", 60.0))
            except BackendConnectionError as exc:
                outcome.append(exc)

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.3)  # let it subscribe; the assertions do not depend on it
        redis_server.kill()
        t.join(15)
        assert not t.is_alive() and isinstance(outcome[0], BackendConnectionError)
        redis_server.start()
        assert backend.get("done").result == 42
    finally:
        backend.close()


def _keys_and_messages(client, broker, queue) -> tuple[dict[str, str], dict[str, str]]:
    """What the server holds for ``queue``: {key: owner} of the held keys, and {key: task id}
    of the keyed messages not yet settled (lane entries and delayed members)."""
    prefix = broker.key_name(queue, "")
    held = {name.decode()[len(prefix):]: client.get(name).decode()
            for name in client.scan_iter(match=prefix + "*", count=1000)}
    messages: dict[str, str] = {}
    keys = broker.queue_keys(queue)
    for lane in keys[:N_LANES]:
        for _, fields in client.xrange(lane):
            if b"k" in fields:
                assert fields[b"k"].decode() not in messages, "two messages under one key"
                messages[fields[b"k"].decode()] = fields[b"t"].decode()
    for member in client.zrange(keys[N_LANES + 1], 0, -1):
        head, _, rest = member.partition(b" ")
        if head.startswith(b"K"):
            _p, _v, _kt, _kl, kn, tn, body = rest.split(b" ", 6)
            key, tid = body[:int(kn)].decode(), body[int(kn):int(kn) + int(tn)].decode()
            assert key not in messages, "two messages under one key"
            messages[key] = tid
    return held, messages


def _keyed(key: str, **kw) -> Keyed:
    return Keyed(msg(b"keyed", **kw), key, 600.0)


def test_keys_and_their_messages_survive_kill_9_together(redis_server):
    """appendfsync always: what publish_keyed and ack answered survives a SIGKILL, and the
    scripts' effects are whole in the AOF, so no key outlives its message nor the reverse."""
    broker = RedisBroker.from_url(redis_server.url, namespace="f", default_visibility_timeout=60.0)
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert broker.publish_keyed([_keyed(f"k{i}") for i in range(30)]) == [None] * 30
        assert broker.publish_keyed([_keyed(f"d{i}", not_before=time.time() + 600) for i in range(10)]) == [None] * 10
        acked = broker.consume([Q], 10, 5.0)
        broker.ack(acked)
        in_flight = broker.consume([Q], 5, 5.0)
        assert len(acked) == 10 and len(in_flight) == 5
        before = _keys_and_messages(client, broker, Q)

        redis_server.kill()
        redis_server.start()

        held, messages = _keys_and_messages(client, broker, Q)
        assert (held, messages) == before
        assert held == messages                        # every key has its message and the reverse
        assert set(held) == {f"k{i}" for i in range(10, 30)} | {f"d{i}" for i in range(10)}
        assert not {d.key for d in acked} & set(held)
        dupes = [_keyed(k) for k in sorted(held)]
        assert broker.publish_keyed(dupes) == [held[k] for k in sorted(held)]   # still refused
        assert broker.publish_keyed([_keyed(d.key) for d in acked]) == [None] * 10
    finally:
        broker.close()
        client.close()


def test_a_kill_9_in_the_middle_of_keyed_publishes_leaves_no_key_without_its_message(redis_server):
    """The server dies while a producer publishes keyed batches as fast as it can (and a
    consumer acks): after the restart, keys and messages still pair up one to one."""
    broker = RedisBroker.from_url(redis_server.url, namespace="f", retry_attempts=1)
    consumer = RedisBroker.from_url(redis_server.url, namespace="f", retry_attempts=1, socket_timeout=3.0)
    client = redis.Redis.from_url(redis_server.url)
    stop = threading.Event()
    published = [0]

    def produce():
        i = 0
        while not stop.is_set():
            try:
                broker.publish_keyed([_keyed(f"p{i + j}", not_before=time.time() + 600 if j % 3 == 0 else None)
                                      for j in range(200)])
                published[0] += 200
            except BrokerConnectionError:
                return
            i += 200

    def consume():
        while not stop.is_set():
            try:
                consumer.ack(consumer.consume([Q], 50, 0.2))
            except BrokerConnectionError:
                return

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while published[0] < 2000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert published[0] >= 2000, "the producer did not get going"
        redis_server.kill()                            # in the middle of the stream of publishes
        stop.set()
        for t in threads:
            t.join(20)
        redis_server.start()
        held, messages = _keys_and_messages(client, broker, Q)
        assert held == messages
        assert len(held) >= 1
        key = sorted(held)[0]
        assert broker.publish_keyed([_keyed(key)]) == [held[key]]
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        broker.close()
        consumer.close()
        client.close()
