"""RedisBroker beyond the shared contract: round trips, key layout, leases, reclaim, recovery."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import redis
from redis.crc import key_slot

from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Message
from stem.brokers.redis import N_LANES, RedisBroker
from stem.errors import ConfigurationError

from .support import drop_namespace, wait_until

pytestmark = pytest.mark.redis
Q = "jobs"


def msg(frame: bytes = b"frame", *, queue: str = Q, priority: int = 0, not_before=None, vt=None) -> Message:
    return Message(uuid.uuid4().hex, queue, frame, priority, not_before, vt)


@pytest.fixture
def private_make(private_redis_url, namespace, private_raw):
    made = []

    def make(**kwargs):
        kwargs.setdefault("namespace", namespace)
        b = RedisBroker.from_url(private_redis_url, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def make(redis_url, namespace, raw):
    made = []

    def make(**kwargs):
        kwargs.setdefault("namespace", namespace)
        b = RedisBroker.from_url(redis_url, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def consume_n(broker, n, *, timeout=10.0, consumer="", queues=(Q,)):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += broker.consume(list(queues), n - len(got), 0.5, consumer=consumer)
    assert len(got) == n, f"expected {n} deliveries within {timeout}s, got {len(got)}"
    return got


class _RoundTrips:
    """Counts writes to Redis sockets made by this thread (one per pipeline or command)."""

    def __init__(self, monkeypatch):
        self.count = 0
        self.thread = threading.get_ident()
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(conn, command, check_health=True):
            if threading.get_ident() == self.thread:
                self.count += 1
            return original(conn, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)


def test_publish_many_is_one_round_trip_for_a_batch(make, monkeypatch):
    broker = make()
    broker.ping()                 # connect (handshake) before counting
    trips = _RoundTrips(monkeypatch)
    broker.publish_many([msg(str(i).encode(), priority=i % 3) for i in range(300)]
                        + [msg(b"later", not_before=time.time() + 60)])
    assert trips.count == 1
    s = broker.stats(Q)
    assert (s.ready, s.delayed) == (300, 1)


def test_ack_of_a_batch_is_one_round_trip(make, monkeypatch):
    broker = make()
    broker.publish_many([msg() for _ in range(50)])
    got = consume_n(broker, 50)
    trips = _RoundTrips(monkeypatch)
    broker.ack(got)
    assert trips.count == 1
    assert broker.stats(Q) == (Q, 0, 0, 0, 0, 0)


def test_every_key_of_a_queue_is_under_the_namespace_and_one_hash_slot(make, raw, namespace):
    broker = make(max_deliveries=1)
    broker.publish_many([msg(priority=p) for p in range(N_LANES)] + [msg(not_before=time.time() + 60)])
    d = broker.consume([Q], 1, 5.0)[0]
    broker.dead_letter(d, "test")
    broker.consume([Q], 1, 5.0)
    keys = sorted(k.decode() for k in raw.scan_iter(match=namespace + ":*"))
    queue_keys = [k for k in keys if k != f"{namespace}:queues"]
    assert len(queue_keys) == N_LANES + 3   # lanes, leases, delayed, dead
    assert all(k.startswith(f"{namespace}:{{q:{Q}}}:") for k in queue_keys)
    assert len({key_slot(k.encode()) for k in queue_keys}) == 1
    assert set(keys) == set(queue_keys) | {f"{namespace}:queues"}


def test_priorities_are_clamped_into_ten_lanes_highest_first(make):
    broker = make()
    broker.publish_many([msg(b"neg", priority=-5), msg(b"huge", priority=1000), msg(b"nine", priority=9),
                         msg(b"zero", priority=0)])
    got = [bytes(d.frame) for d in consume_n(broker, 4)]
    assert got == [b"huge", b"nine", b"neg", b"zero"]


def test_a_dead_consumers_deliveries_are_reclaimed_by_another_consumer(make, raw, namespace):
    producer = make()
    producer.publish_many([msg(str(i).encode(), vt=1.0) for i in range(5)])
    dead = make()
    taken = consume_n(dead, 5, consumer="worker-a")
    dead.close()                                  # worker-a vanishes without settling anything
    live = make()
    t0 = time.monotonic()
    again = consume_n(live, 5, timeout=1.0 + 5.0, consumer="worker-b")
    assert time.monotonic() - t0 < 1.0 + 3.0
    assert sorted(d.task_id for d in again) == sorted(d.task_id for d in taken)
    assert {d.delivery_count for d in again} == {2}
    lane = f"{namespace}:{{q:{Q}}}:lane:0"
    pending = raw.xpending_range(lane, "stem", "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"worker-b"}
    live.ack(again)
    assert raw.xlen(lane) == 0 and live.stats(Q).in_flight == 0


def test_a_long_lease_extension_never_creates_a_second_copy(make, raw, namespace):
    broker = make()
    broker.publish(msg(b"long", vt=0.6))
    d = broker.consume([Q], 1, 5.0, consumer="runner")[0]
    thief = make()
    deadline = time.monotonic() + 3.0             # five times the visibility timeout
    while time.monotonic() < deadline:
        broker.extend([d])
        assert thief.consume([Q], 1, 0.2, consumer="thief") == []
    lane = f"{namespace}:{{q:{Q}}}:lane:0"
    assert raw.xlen(lane) == 1
    [p] = raw.xpending_range(lane, "stem", "-", "+", 10)
    assert (p["consumer"], p["times_delivered"]) == (b"runner", 1)
    assert broker.stats(Q)[1:5] == (0, 1, 0, 0)
    broker.ack([d])
    assert raw.xlen(lane) == 0


def test_leases_expiring_past_max_deliveries_are_reclaimed_with_their_count_for_the_consumer(make, raw, namespace):
    broker = make(max_deliveries=2, default_visibility_timeout=0.3)
    m = msg(b"poison")
    broker.publish(m)
    counts = [consume_n(broker, 1, consumer=f"c{i}")[0].delivery_count for i in range(4)]
    assert counts == [1, 2, 3, 4]                  # XCLAIM counts on past the cap; nothing is buried
    [p] = raw.xpending_range(f"{namespace}:{{q:{Q}}}:lane:0", "stem", "-", "+", 10)
    assert (p["consumer"], p["times_delivered"]) == (b"c3", 4)
    assert broker.dead_letters(Q) == []
    d = consume_n(broker, 1)[0]
    broker.dead_letter(d, "max-deliveries")       # what the worker does
    [dl] = broker.dead_letters(Q)
    assert (dl.reason, dl.task_id, bytes(dl.frame)) == ("max-deliveries", m.task_id, b"poison")
    assert broker.stats(Q)[1:5] == (0, 0, 0, 1)


def test_settling_a_stale_delivery_never_adds_a_copy(make):
    broker = make(default_visibility_timeout=0.3)
    broker.publish(msg(b"v1"))
    stale = consume_n(broker, 1)[0]
    fresh = consume_n(broker, 1, timeout=5.0)[0]   # the lease expired: delivered again
    assert fresh.delivery_count == 2
    broker.ack([fresh])
    broker.retry(stale, b"v2", None)              # the message is already settled
    broker.dead_letter(stale, "late")
    broker.nack(stale)
    assert broker.stats(Q) == (Q, 0, 0, 0, 0, 0)
    assert broker.consume([Q], 1, 0.5) == []


def test_retry_into_the_future_sits_in_the_delayed_set_not_in_memory(make, raw, namespace):
    broker = make()
    broker.publish(msg(b"a0", priority=4))
    d = consume_n(broker, 1)[0]
    broker.retry(d, b"a1", time.time() + 0.5)
    assert raw.zcard(f"{namespace}:{{q:{Q}}}:delayed") == 1
    other = make()                                 # any broker instance picks it up when due
    again = consume_n(other, 1, timeout=5.0)[0]
    assert (bytes(again.frame), again.task_id, again.delivery_count) == (b"a1", d.task_id, 1)
    assert again.receipt.lane == 4                 # the retry keeps the priority lane


def test_a_lost_consumer_group_is_recreated_and_nothing_is_lost(make, raw, namespace):
    broker = make()
    broker.publish_many([msg(b"1"), msg(b"2")])
    first = consume_n(broker, 1)[0]
    lane = f"{namespace}:{{q:{Q}}}:lane:0"
    raw.xgroup_destroy(lane, "stem")               # as after a restart that lost the group
    got = consume_n(broker, 2)
    assert sorted(bytes(d.frame) for d in got) == [b"1", b"2"]
    broker.ack(got + [first])
    assert broker.stats(Q) == (Q, 0, 0, 0, 0, 0)


def test_blocked_consume_wakes_for_a_delayed_message_published_by_someone_else(make):
    consumer, producer = make(), make()
    consumer.consume([Q], 1, 0)
    result = []
    t = threading.Thread(target=lambda: result.extend(consumer.consume([Q], 1, 10.0)))
    t.start()
    producer.publish(msg(b"soon", not_before=time.time() + 0.3))
    t.join(10)
    assert [bytes(d.frame) for d in result] == [b"soon"]


def test_url_dispatch_builds_a_redis_broker_with_options(redis_url, namespace, raw):
    broker = broker_from_url(redis_url, namespace=namespace, default_visibility_timeout=7,
                             max_deliveries=3)
    try:
        assert isinstance(broker, RedisBroker)
        assert (broker.namespace, broker.default_visibility_timeout, broker.max_deliveries) == (namespace, 7.0, 3)
        broker.ping()
    finally:
        broker.close()
        broker.close()   # safe twice


def test_rediss_url_uses_tls_connections():
    broker = RedisBroker.from_url("rediss://127.0.0.1:6380/0", namespace="tls")
    try:
        assert broker.store.client.connection_pool.connection_class is redis.SSLConnection
    finally:
        broker.close()


def test_brokers_with_the_same_url_share_one_pool(redis_url, namespace):
    from stem.backends.redis import RedisResultBackend
    a = RedisBroker.from_url(redis_url, namespace=namespace)
    b = RedisBroker.from_url(redis_url, namespace=namespace + "b")
    c = RedisResultBackend.from_url(redis_url, namespace=namespace)
    try:
        assert a.store.client.connection_pool is b.store.client.connection_pool
        assert c.shares_store_with(a) and c.shares_store_with(b)
    finally:
        a.close(), b.close(), c.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(make, raw):
    broker = make()
    broker.ping()
    parent_id = broker.store.client.client_id()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.write(w, str(broker.store.client.client_id()).encode())
        finally:
            os._exit(0)
    os.close(w)
    child_id = int(os.read(r, 64) or b"0")
    os.close(r)
    os.waitpid(pid, 0)
    assert child_id and child_id != parent_id
    assert broker.store.client.client_id() == parent_id   # the parent's connection still works


@pytest.mark.parametrize("kwargs", [dict(namespace="has{brace}"), dict(namespace=""), dict(namespace="stem\n"),
                                    dict(namespace="x" * 65), dict(socket_connect_timeout=float("nan")),
                                    dict(default_visibility_timeout=0), dict(max_deliveries=0),
                                    dict(max_deliveries=1.5), dict(socket_timeout=1.0),
                                    dict(retry_attempts=0)])
def test_bad_arguments_are_configuration_errors(redis_url, kwargs):
    with pytest.raises(ConfigurationError):
        RedisBroker.from_url(redis_url, **kwargs)


def test_bad_url_is_a_configuration_error():
    with pytest.raises(ConfigurationError):
        RedisBroker.from_url("redis://127.0.0.1:notaport/0")


def test_consume_and_ack_survive_a_flushed_script_cache(private_make, private_raw):
    make, raw = private_make, private_raw
    """A Redis restart (or SCRIPT FLUSH) empties the script cache: consume and ack load it again."""
    broker = make()
    broker.publish_many([msg() for _ in range(5)] + [msg(queue="other") for _ in range(3)])
    raw.script_flush()
    got = consume_n(broker, 8, queues=(Q, "other"))
    raw.script_flush()
    broker.ack(got)
    assert broker.stats(Q) == (Q, 0, 0, 0, 0, 0)
    assert broker.stats("other") == ("other", 0, 0, 0, 0, 0)


def test_publish_frames_is_one_round_trip_and_declares_the_queue_once(make, monkeypatch):
    broker = make()
    broker.ping()
    trips = _RoundTrips(monkeypatch)
    broker.publish_frames(Q, [uuid.uuid4().hex for _ in range(300)], [b"f"] * 300)
    broker.publish_frames(Q, ["one"], [b"f"])
    assert trips.count == 2
    assert broker.stats(Q).ready == 301 and broker.queues() == [Q]


def test_publish_frames_raises_an_error_reply_as_a_broker_error(make, raw, namespace):
    from stem.errors import BrokerError
    broker = make()
    lane0 = broker.queue_keys(Q)[0]
    raw.set(lane0, "not a stream")   # every XADD into it fails with WRONGTYPE
    with pytest.raises(BrokerError, match="WRONGTYPE"):
        broker.publish_frames(Q, ["a", "b"], [b"x", b"y"])
    raw.delete(lane0)
    broker.publish_frames(Q, ["c"], [b"z"])   # the connection is clean afterwards
    assert [d.task_id for d in consume_n(broker, 1)] == ["c"]


# -- run_and_consume: settle commands and a consume in one round trip -------------------

def test_run_and_consume_runs_the_settle_commands_then_leases_in_one_round_trip(make, raw, namespace, monkeypatch):
    broker = make()
    broker.publish_many([msg() for _ in range(6)])
    first = consume_n(broker, 2)
    trips = _RoundTrips(monkeypatch)
    got = broker.run_and_consume(broker.ack_commands(first) + [("SET", f"{namespace}:marker", "1")], [Q], 3)
    assert trips.count == 1
    assert len(got) == 3 and not {d.task_id for d in got} & {d.task_id for d in first}
    assert broker.stats(Q) == (Q, 1, 3, 0, 0, 0)
    assert raw.get(f"{namespace}:marker") == b"1"
    broker.ack(got)
    assert broker.stats(Q) == (Q, 1, 0, 0, 0, 0)


def test_run_and_consume_takes_one_queue_at_a_time_in_turn(make):
    broker = make()
    broker.publish_many([msg() for _ in range(2)] + [msg(queue="other") for _ in range(2)])
    a = broker.run_and_consume([], [Q, "other"], 10)
    b = broker.run_and_consume([], [Q, "other"], 10)
    assert sorted([{d.queue for d in a}, {d.queue for d in b}]) == [{Q}, {"other"}]
    assert len(a) == len(b) == 2


def test_run_and_consume_after_a_flushed_script_cache_reloads_and_leases_once(private_make, private_raw):
    make, raw = private_make, private_raw
    broker = make()
    broker.publish_many([msg() for _ in range(5)])
    first = consume_n(broker, 2)
    raw.script_flush()   # the consume answers NOSCRIPT: it did not run, so all of it is sent again
    got = broker.run_and_consume(broker.ack_commands(first), [Q], 10)
    assert len(got) == 3
    assert broker.stats(Q) == (Q, 0, 3, 0, 0, 0)


def test_when_only_a_settle_script_answered_noscript_the_consume_is_not_sent_again(make, namespace, monkeypatch):
    """The script cache emptied between the ack and the consume of one pipeline: the consume
    ran, so only the settle commands go again (a second consume would lease twice)."""
    import stem.brokers.redis as redis_broker
    import stem.stores.redis as redis_store
    broker = make()
    broker.publish_many([msg() for _ in range(8)])
    first = consume_n(broker, 2)
    real, real_last = redis_store.execute, redis_broker.execute_last
    sent = []

    def execute_last(client, packed, n):
        sent.append(n)
        error, reply = real_last(client, packed, n)
        assert error is None
        # the ack ran, but answer as if it had met an empty script cache
        return redis.exceptions.NoScriptError("NOSCRIPT No matching script."), reply

    def execute(client, commands):
        sent.append(len(commands))
        return real(client, commands)

    monkeypatch.setattr(redis_broker, "execute_last", execute_last)
    monkeypatch.setattr(redis_store, "execute", execute)
    got = broker.run_and_consume(broker.ack_commands(first), [Q], 3)
    assert len(got) == 3
    assert sent == [2, 1]   # the pipeline, then the ack alone
    assert broker.stats(Q) == (Q, 3, 3, 0, 0, 0)


def test_a_failed_settle_command_gives_the_new_leases_back_and_raises(make, raw, namespace):
    from stem.errors import BrokerError
    broker = make()
    broker.publish_many([msg() for _ in range(4)])
    raw.set(f"{namespace}:not-a-list", "x")
    with pytest.raises(BrokerError, match="WRONGTYPE"):
        broker.run_and_consume([("LPUSH", f"{namespace}:not-a-list", "y")], [Q], 3)
    assert broker.stats(Q).in_flight == 0
    assert len(consume_n(broker, 4)) == 4   # the three given back come again at once


def test_a_failed_consume_raises_after_the_settle_commands_ran(make, raw, namespace):
    from stem.errors import BrokerError
    broker = make()
    broker.publish_many([msg()])
    raw.delete(broker.queue_keys("broken")[0])
    raw.set(broker.queue_keys("broken")[0], "x")   # a lane that is not a stream
    with pytest.raises(BrokerError):
        broker.run_and_consume([("SET", f"{namespace}:marker", "1")], ["broken"], 3)
    assert raw.get(f"{namespace}:marker") == b"1"


@pytest.mark.parametrize("when", ["before-sending", "after-the-consume-ran"])
def test_a_lost_connection_is_not_retried_since_the_consume_may_have_run(make, monkeypatch, when):
    import stem.brokers.redis as redis_broker
    from stem.errors import BrokerConnectionError
    broker = make(default_visibility_timeout=0.5)
    broker.publish_many([msg() for _ in range(5)])
    real = redis_broker.execute_last
    calls = []

    def execute_last(client, packed, n):
        calls.append(1)
        if when == "after-the-consume-ran":
            real(client, packed, n)
        raise redis.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(redis_broker, "execute_last", execute_last)
    with pytest.raises(BrokerConnectionError):
        broker.run_and_consume([], [Q], 3)
    assert calls == [1]
    monkeypatch.setattr(redis_broker, "execute_last", real)
    assert broker.stats(Q).in_flight == (3 if when == "after-the-consume-ran" else 0)
    assert len(consume_n(broker, 5)) == 5   # what the lost reply leased comes back after its lease


def test_entries_are_read_by_field_name_whatever_order_they_were_written_in(make, raw, namespace):
    """The consume script reads the fields by position when an entry has the order every
    XADD of stem writes (t, f, p, v), and by name otherwise (an entry added by hand or by
    another tool): both give the same delivery."""
    broker = make(default_visibility_timeout=30.0)
    broker.publish(msg(b"usual", vt=2.0))
    broker.publish(msg(b"default-vt"))
    lane0 = broker.queue_keys(Q)[0]
    raw.xadd(lane0, {"v": 3000, "f": b"by-hand", "p": 0, "t": "hand-id"})
    raw.xadd(lane0, {"f": b"no-vt", "t": "hand-id-2"})
    got = consume_n(broker, 4)
    assert [(d.frame, d.visibility_timeout) for d in got] == [
        (b"usual", 2.0), (b"default-vt", 30.0), (b"by-hand", 3.0), (b"no-vt", 30.0)]
    assert [d.task_id for d in got][2:] == ["hand-id", "hand-id-2"]
    broker.ack(got)
    assert broker.stats(Q).in_flight == 0


# -- entries the consume script cannot read (written by hand, by an old stem, by a bug) ---------

def _lane0(namespace: str) -> str:
    return f"{namespace}:{{q:{Q}}}:lane:0"


def _lease_by_hand(raw, namespace: str, *, ack: bool = False) -> list[str]:
    """Lease every entry of lane 0 as a consumer gone long ago would have (PEL + an expired lease
    record); ``ack`` takes them out of the PEL again, as a stray XACK would.  Returns their ids."""
    lane = _lane0(namespace)
    raw.xgroup_create(lane, "stem", id="0", mkstream=True)
    [(_, entries)] = raw.xreadgroup("stem", "gone", {lane: ">"})
    ids = [e[0].decode() for e in entries]
    raw.zadd(f"{namespace}:{{q:{Q}}}:leases", {f"0|{i}": 0 for i in ids})
    if ack:
        raw.xack(lane, "stem", *ids)
    return ids


def test_entries_without_a_task_id_are_dead_lettered_and_never_hold_back_the_entries_after_them(make, raw, namespace):
    broker = make()
    before = [msg(b"a%d" % i) for i in range(3)]
    after = [msg(b"b%d" % i) for i in range(3)]
    broker.publish_many(before)
    raw.xadd(_lane0(namespace), {"x": "y"})                      # no field stem knows
    raw.xadd(_lane0(namespace), {"f": b"frame-only", "p": 0})    # a frame but no task id
    broker.publish_many(after)
    got = broker.consume([Q], 10, 0)                             # one call: the whole batch
    assert [d.task_id for d in got] == [m.task_id for m in before + after]
    assert [dl.reason for dl in broker.dead_letters(Q)] == ["decode-error", "decode-error"]
    assert [(dl.task_id, bytes(dl.frame)) for dl in broker.dead_letters(Q)] == [("", b""), ("", b"frame-only")]
    assert broker.stats(Q)[1:5] == (0, 6, 0, 2)
    broker.ack(got)
    assert raw.xlen(_lane0(namespace)) == 0 and raw.zcard(f"{namespace}:{{q:{Q}}}:leases") == 0


def test_an_entry_without_a_frame_is_delivered_with_an_empty_one(make, raw, namespace):
    broker = make()
    raw.xadd(_lane0(namespace), {"t": "no-frame"})
    broker.publish(msg(b"next"))
    got = broker.consume([Q], 10, 0)
    assert [(d.task_id, bytes(d.frame)) for d in got[:1]] == [("no-frame", b"")]
    assert len(got) == 2 and got[0].visibility_timeout == broker.default_visibility_timeout


def test_a_batch_filled_by_bad_entries_does_not_leave_the_good_one_behind_it_for_later(make, raw, namespace):
    broker = make()
    for _ in range(3):
        raw.xadd(_lane0(namespace), {"bad": "entry"})
    m = msg(b"good")
    broker.publish(m)
    t0 = time.monotonic()
    assert [d.task_id for d in broker.consume([Q], 1, 5.0)] == [m.task_id]
    assert time.monotonic() - t0 < 0.5                            # not after a blocking tick
    assert broker.stats(Q).dead == 3


def test_thousands_of_bad_entries_are_cleared_in_bounded_script_runs_without_a_blocking_tick(make, raw, namespace,
                                                                                            monkeypatch):
    broker = make()
    lane = _lane0(namespace)
    pipe = raw.pipeline(transaction=False)
    for i in range(2500):
        pipe.xadd(lane, {"bad": i})
    pipe.execute()
    m = msg(b"good")
    broker.publish(m)
    runs = []
    real = broker.store.run
    monkeypatch.setattr(broker.store, "run", lambda commands: runs.append(1) or real(commands))
    t0 = time.monotonic()
    assert [d.task_id for d in broker.consume([Q], 10, 5.0)] == [m.task_id]
    assert time.monotonic() - t0 < 0.9                            # no XREAD waited out its block
    assert len(runs) == 3                                         # at most 1000 buried per script run
    assert broker.stats(Q).dead == 2500


@pytest.mark.parametrize("acked", [False, True], ids=["expired-lease", "lease-without-pel-entry"])
def test_an_expired_lease_of_an_entry_without_a_task_id_is_dead_lettered_and_its_neighbours_redelivered(
        make, raw, namespace, acked):
    broker = make()
    first, last = msg(b"first"), msg(b"last")
    broker.publish(first)
    raw.xadd(_lane0(namespace), {"f": b"orphan"})
    broker.publish(last)
    _lease_by_hand(raw, namespace, ack=acked)
    got = broker.consume([Q], 10, 0)
    assert [(d.task_id, bytes(d.frame)) for d in got] == [(first.task_id, b"first"), (last.task_id, b"last")]
    # re-delivered from the PEL (count 2), or, outside the PEL, put back as new entries (count 1)
    assert {d.delivery_count for d in got} == ({1} if acked else {2})
    [dl] = broker.dead_letters(Q)
    assert (dl.reason, dl.task_id, bytes(dl.frame)) == ("decode-error", "", b"orphan")
    broker.ack(got)
    assert broker.stats(Q)[1:5] == (0, 0, 0, 1)


def test_a_delayed_member_that_does_not_unpack_goes_to_the_dead_letters_not_nowhere(make, raw, namespace):
    broker = make()
    broker.publish(msg(b"due", not_before=time.time() + 0.2))
    delayed = f"{namespace}:{{q:{Q}}}:delayed"
    raw.zadd(delayed, {b"not a packed message": 0, b"abc 0 0 99 too-short": 0})
    got = consume_n(broker, 1)
    assert bytes(got[0].frame) == b"due"
    dead = broker.dead_letters(Q)
    assert sorted(bytes(dl.frame) for dl in dead) == [b"abc 0 0 99 too-short", b"not a packed message"]
    assert {dl.reason for dl in dead} == {"decode-error"} and raw.zcard(delayed) == 0


def test_a_task_id_that_is_not_utf8_does_not_fail_the_batch(make, raw, namespace):
    broker = make()
    broker.publish(msg(b"one"))
    raw.xadd(_lane0(namespace), {"t": b"\xff\xfe", "f": b"bytes", "p": 0, "v": 0})
    broker.publish(msg(b"three"))
    got = broker.consume([Q], 10, 0)
    assert [bytes(d.frame) for d in got] == [b"one", b"bytes", b"three"]
    assert got[1].task_id == "\ufffd\ufffd"
    broker.dead_letter(got[1], "decode-error")
    assert broker.dead_letters(Q)[0].task_id == "\ufffd\ufffd"


def test_an_entry_written_without_priority_or_visibility_timeout_can_be_retried_and_replayed(make, raw, namespace):
    broker = make()
    raw.xadd(_lane0(namespace), {"t": "bare", "f": b"v1"})
    d = consume_n(broker, 1)[0]
    broker.retry(d, b"v2", None)
    d = consume_n(broker, 1)[0]
    assert (d.task_id, bytes(d.frame), d.delivery_count) == ("bare", b"v2", 1)
    broker.retry(d, b"v3", time.time() + 0.2)
    d = consume_n(broker, 1)[0]
    assert (d.task_id, bytes(d.frame)) == ("bare", b"v3")
    broker.dead_letter(d, "error")
    assert broker.replay(Q) == 1
    assert (consume_n(broker, 1)[0].task_id, broker.stats(Q).dead) == ("bare", 0)


def test_a_worker_runs_the_tasks_around_a_malformed_entry_at_once_and_dead_letters_it(redis_url, namespace, raw):
    """Before: the entry cut the consume reply short, and the tasks after it in the batch waited
    out their visibility timeout (again and again, until max-deliveries)."""
    from stem import ShutdownMode, Stem, TaskRegistry, TaskState, Worker, WorkerLifecycleConfig
    from stem.backends.redis import RedisResultBackend
    registry = TaskRegistry()
    registry.task("add")(lambda ctx, a, b: a + b)
    broker = RedisBroker.from_url(redis_url, namespace=namespace, default_visibility_timeout=30.0)
    backend = RedisResultBackend.from_url(redis_url, namespace=namespace)
    stem = Stem(broker, backend, registry)
    lane = f"{namespace}:{{q:default}}:lane:0"
    ids = [stem.enqueue("add", {"a": i, "b": 1}) for i in range(3)]
    raw.xadd(lane, {"x": "no task id, no frame"})
    raw.xadd(lane, {"t": "no-frame"})
    ids += [stem.enqueue("add", {"a": i, "b": 1}) for i in range(3, 6)]
    worker = Worker(broker, backend, registry, concurrency=2,
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5,
                                                    force_shutdown_after=5)).run_in_background()
    try:
        t0 = time.monotonic()
        statuses = [stem.wait_for_task(i, timeout=10) for i in ids]
        assert time.monotonic() - t0 < 10                          # a third of the visibility timeout
        assert [(s.state, s.result) for s in statuses] == [(TaskState.SUCCEEDED, i + 1) for i in range(6)]
        status = stem.wait_for_task("no-frame", timeout=10)       # has a task id: the worker dead-letters it
        assert (status.state, status.reason) == (TaskState.DEAD, "decode-error")
        assert wait_until(lambda: broker.stats("default").dead == 2)
        assert sorted((dl.task_id, dl.reason) for dl in broker.dead_letters("default")) == [
            ("", "decode-error"), ("no-frame", "decode-error")]
        assert broker.stats("default")[1:3] == (0, 0)
    finally:
        worker.shutdown(ShutdownMode.HARD, timeout=15)
        broker.close()
        backend.close()


def test_an_empty_refill_answers_without_wake_times_or_last_ids(make, monkeypatch):
    """The settle pipeline's refill never blocks: its empty reply is ``[0]`` alone (the blocking
    consume's empty reply still carries the wake times and the eleven last ids)."""
    import stem.brokers.redis as redis_broker
    broker = make()
    replies = []
    real_last = redis_broker.execute_last

    def execute_last(client, packed, n):
        error, reply = real_last(client, packed, n)
        replies.append(reply)
        return error, reply
    monkeypatch.setattr(redis_broker, "execute_last", execute_last)
    assert broker.run_and_consume([], [Q], 10) == []
    assert replies == [[0]]
    broker.publish_many([msg() for _ in range(2)])
    assert len(broker.run_and_consume([], [Q], 10)) == 2
    command = broker._consume_command(Q, "c", 5)
    reply = broker.store.run([command])[0]
    assert reply[0] == 0 and len(reply) == 4 + N_LANES + 1


class _Calls:
    """Counts a broker's consume script rounds (``_consume_once``) and flags each XREAD BLOCK."""

    def __init__(self, broker, monkeypatch):
        self.consumes = 0
        self.blocking = threading.Event()
        real_once, real_block = broker._consume_once, broker._xread_block

        def once(*a, **k):
            self.consumes += 1
            return real_once(*a, **k)

        def block(*a, **k):
            self.blocking.set()
            return real_block(*a, **k)
        monkeypatch.setattr(broker, "_consume_once", once)
        monkeypatch.setattr(broker, "_xread_block", block)


def test_after_a_consume_that_drained_the_queue_the_next_blocks_at_once(make, monkeypatch):
    broker, publisher = make(), make()
    publisher.publish_many([msg() for _ in range(2)])
    assert len(broker.consume([Q], 10, 5.0)) == 2            # drained: 2 of 10
    calls = _Calls(broker, monkeypatch)
    late = msg(b"late")
    t = threading.Thread(target=lambda: (calls.blocking.wait(10), publisher.publish(late)))
    t.start()
    got = broker.consume([Q], 10, 10.0)
    t.join(10)
    assert [d.task_id for d in got] == [late.task_id]
    assert calls.consumes == 1                               # the one after the wake, none before the block


def test_a_consume_that_filled_its_count_asks_again_before_blocking(make, monkeypatch):
    broker = make()
    broker.publish_many([msg() for _ in range(3)])
    assert len(broker.consume([Q], 2, 5.0)) == 2             # not drained
    calls = _Calls(broker, monkeypatch)
    assert len(broker.consume([Q], 2, 5.0)) == 1
    assert calls.consumes == 1 and not calls.blocking.is_set()


def test_armed_ids_another_consumer_moved_past_cost_one_more_round_not_a_message(make, monkeypatch):
    a, b = make(), make()
    a.publish_many([msg()])
    assert len(a.consume([Q], 10, 5.0, consumer="a")) == 1   # armed
    a.publish(msg(b"taken"))
    assert len(b.consume([Q], 10, 5.0, consumer="b")) == 1   # taken by b after a armed
    calls = _Calls(a, monkeypatch)
    t0 = time.monotonic()
    assert a.consume([Q], 10, 1.0, consumer="a") == []       # woke at once, asked, then blocked
    # one round after the wake that found nothing, one when the block ran out: no spinning
    assert time.monotonic() - t0 >= 0.8 and calls.consumes == 2
    fresh = msg(b"fresh")
    t = threading.Thread(target=lambda: (time.sleep(0.2), b.publish(fresh)))
    t.start()
    got = a.consume([Q], 10, 10.0, consumer="a")
    t.join(10)
    assert [d.task_id for d in got] == [fresh.task_id]


def test_a_delayed_message_published_after_arming_is_late_by_at_most_one_block(make):
    broker = make()
    broker.publish_many([msg()])
    assert len(broker.consume([Q], 10, 5.0)) == 1            # armed, nothing delayed yet
    due = time.time() + 0.3
    broker.publish(msg(b"later", not_before=due))
    got = broker.consume([Q], 10, 5.0)
    assert [d.frame for d in got] == [b"later"] and time.time() - due < 1.0 + 0.5


def test_keyed_deliveries_of_a_drained_queue_keep_their_keys(make):
    from stem.brokers.base import Keyed
    broker = make()
    items = [Keyed(msg(b"k%d" % i), f"key-{i}", 60.0) for i in range(2)]
    assert broker.publish_keyed(items) == [None, None]
    got = broker.consume([Q], 10, 5.0)
    assert sorted(d.key for d in got) == ["key-0", "key-1"]
    assert broker._armed                                     # drained: armed with its block info
    broker.ack(got)
    assert broker.stats(Q)[1:4] == (0, 0, 0)


@pytest.mark.parametrize("armed", [False, True])
def test_a_blocked_consumer_wakes_for_a_high_lane_that_did_not_exist(make, monkeypatch, armed):
    """Lanes 1-9 that do not exist are blocked on from 0-0 without a lookup: the first entry of
    one still wakes the consumer (whether it blocked after an empty consume or armed)."""
    broker, publisher = make(), make()
    if armed:
        publisher.publish_many([msg()])
        assert len(broker.consume([Q], 10, 5.0)) == 1
    calls = _Calls(broker, monkeypatch)
    high = msg(b"urgent", priority=7)
    t = threading.Thread(target=lambda: (calls.blocking.wait(10), publisher.publish(high)))
    t.start()
    t0 = time.monotonic()
    got = broker.consume([Q], 10, 10.0)
    t.join(10)
    assert [d.task_id for d in got] == [high.task_id] and time.monotonic() - t0 < 5.0
