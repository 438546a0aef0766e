"""Limit lanes on Redis beyond the shared contract (``tests/contract/test_limits_contract.py``):
where throttled messages live (never in a stream, so never in the PEL), that their bookkeeping
does not pile up, what the scripts do with members written by hand, the hash tag of every key,
round-robin turns inside one consume, and a flushed script cache."""

from __future__ import annotations

import time
import uuid

import pytest
from redis.crc import key_slot

from stem.brokers.base import Keyed, Limit, Message
from stem.brokers.redis import N_LANES, RedisBroker

from .support import wait_for

pytestmark = pytest.mark.redis
Q = "lim"
CLOSED = Limit(rate_key="closed", rate=0.01, burst=1)      # one token, the next 100 s later


def msg(limit: Limit | None = None, *, queue: str = Q, frame: bytes = b"frame", vt: float | None = None,
        not_before: float | None = None) -> Message:
    return Message(uuid.uuid4().hex, queue, frame, 0, not_before, vt, limit)


@pytest.fixture
def broker(redis_url, namespace, raw):
    b = RedisBroker.from_url(redis_url, namespace=namespace)
    yield b
    b.close()


def base(broker: RedisBroker, queue: str = Q) -> str:
    return broker.queue_keys(queue)[N_LANES + 2][:-4]     # "N:{q:Q}:"


def namespace_keys(raw, namespace: str) -> list[str]:
    return sorted(k.decode() for k in raw.scan_iter(match=f"{namespace}:*", count=1000))


def test_throttled_and_limited_deliveries_are_never_in_a_stream_or_the_pel(broker, raw):
    broker.publish_many([msg(CLOSED) for _ in range(3)])
    got = broker.consume([Q], 10, 0)
    assert len(got) == 1 and got[0].limit == CLOSED
    for lane_key in broker.queue_keys(Q)[:N_LANES]:
        assert raw.exists(lane_key) == 0            # no stream entry, so no XPENDING entry either
    assert raw.zcard(broker.queue_keys(Q)[N_LANES]) == 0     # nor a plain lease record
    assert raw.hlen(base(broker) + "lflight") == 1
    assert broker.stats(Q).throttled == 2


def test_a_plain_consumes_pel_holds_only_unlimited_deliveries(broker, raw):
    broker.publish_many([msg(CLOSED), msg(), msg(CLOSED)])
    got = broker.consume([Q], 10, 0, consumer="w1")
    assert sorted(d.limit is None for d in got) == [False, True]
    pending = raw.xpending(broker.queue_keys(Q)[0], "stem")
    assert pending["pending"] == 1
    assert pending["consumers"] == [{"name": b"w1", "pending": 1}]


def test_lanes_slots_and_buckets_do_not_pile_up(broker, raw, namespace):
    limit = Limit(rate_key="fast", rate=50.0, burst=1, concurrency_key="pool", concurrency=2)
    broker.publish_many([msg(limit) for _ in range(6)])
    done = 0
    deadline = time.monotonic() + 20
    while done < 6 and time.monotonic() < deadline:
        got = broker.consume([Q], 10, 1.0)
        broker.ack(got)
        done += len(got)
    assert done == 6
    b = base(broker)
    left = set(namespace_keys(raw, namespace))
    # the lanes, their index and sizes, the leases and slots went with the last message
    for gone in ("llanes", "lsizes", "lleases", "lflight", "lslots:pool", "llane:4:fast|pool"):
        assert b + gone not in left, (gone, left)
    # the bucket lives until its TAT (at most one interval, 20 ms, after the last lease)
    ttl = raw.pttl(b + "lrate:fast")
    assert ttl <= 100
    wait_for(lambda: raw.exists(b + "lrate:fast") == 0, timeout=5, what="the idle bucket to expire")
    broker.publish(msg(Limit(concurrency_key="other", concurrency=1)))
    broker.ack(broker.consume([Q], 10, 0))          # a consume that serves a lane prunes the index
    # what is left of the queue's limits: its counter, its last turn (PX 60 s), its wake-up stream
    left = {k[len(b):] for k in namespace_keys(raw, namespace) if k.startswith(b + "l")}
    assert left == {"lseq", "lturn", "lnotify"}, left


def test_a_lane_member_that_does_not_unpack_is_dead_lettered_and_the_lane_goes_on(broker, raw):
    good = msg(Limit(concurrency_key="c", concurrency=5))
    broker.publish(good)
    lane = base(broker) + "llane:0:|c"
    assert raw.zcard(lane) == 1
    raw.zadd(lane, {b"garbage, not a packed message": 0})       # ahead of the good one
    raw.zincrby(base(broker) + "lsizes", 1, "0:|c")
    got = broker.consume([Q], 10, 0)
    assert [d.task_id for d in got] == [good.task_id]
    dead = broker.dead_letters(Q)
    assert [(d.reason, d.frame) for d in dead] == [("decode-error", b"garbage, not a packed message")]
    broker.ack(got)
    assert raw.exists(lane) == 0 and broker.stats(Q).throttled == 0


def test_a_lease_record_that_does_not_unpack_is_dead_lettered_when_it_expires(broker, raw):
    broker.publish(msg(Limit(concurrency_key="c", concurrency=1), vt=0.2))
    d = broker.consume([Q], 1, 0)[0]
    raw.hset(base(broker) + "lflight", d.receipt.entry_id, b"mangled")
    # (stats count a lease as ended at its deadline; the consume that finds it expired buries it)
    wait_for(lambda: broker.consume([Q], 1, 0) == [] and broker.dead_letters(Q), timeout=10,
             what="the expired lease handled")
    assert [(x.reason, x.frame) for x in broker.dead_letters(Q)] == [("decode-error", b"mangled")]
    assert broker.stats(Q).in_flight == 0 and raw.hlen(base(broker) + "lflight") == 0
    broker.ack([d])                                  # its record is gone: a no-op


def test_every_key_of_a_limited_queue_shares_the_queues_hash_slot(broker, raw, namespace):
    limit = Limit(rate_key="t{1}", rate=0.01, burst=1, concurrency_key="a}b{", concurrency=1)
    broker.publish_many([msg(limit), msg(limit, not_before=time.time() + 60), msg(CLOSED), msg(CLOSED)])
    broker.publish_keyed([Keyed(msg(CLOSED), "k", 60.0)])
    got = broker.consume([Q], 10, 0)
    broker.dead_letter(got[0], "boom")
    broker.replay(Q)
    keys = namespace_keys(raw, namespace)
    slots = {key_slot(k.encode()) for k in keys if not k.endswith(":queues")}
    assert len(keys) > 8 and slots == {key_slot(f"{{q:{Q}}}".encode())}, keys


def test_one_consume_serves_its_lanes_in_turns(broker):
    fast = {name: Limit(rate_key=name, rate=1000.0, burst=100) for name in "abc"}
    for name in "abc":
        broker.publish_many([msg(fast[name]) for _ in range(4)])
    got = broker.consume([Q], 9, 0)
    assert "".join(d.limit.rate_key for d in got) == "abcabcabc"
    more = broker.consume([Q], 2, 0) + broker.consume([Q], 1, 0)
    assert "".join(d.limit.rate_key for d in more) == "abc"


def test_a_limited_publish_after_a_flushed_script_cache_writes_the_plain_messages_once(
        private_redis_url, namespace, private_raw):
    b = RedisBroker.from_url(private_redis_url, namespace=namespace)
    try:
        private_raw.script_flush()
        b.publish_many([msg(), msg(CLOSED), msg()])
        s = b.stats(Q)
        assert (s.ready, s.throttled) == (2, 1)
        private_raw.script_flush()
        got = b.consume([Q], 10, 0)
        assert sorted(d.limit is None for d in got) == [False, True, True]
        private_raw.script_flush()
        b.ack(got)
        assert b.stats(Q)[:6] == (Q, 0, 0, 0, 0, 0)
    finally:
        b.close()


def test_publish_commands_say_whether_they_hold_a_script_call(broker):
    """What ``publish_many`` picks its runner by: a script call may answer NOSCRIPT, and then
    only the calls that did not run may be sent again."""
    delayed = msg(not_before=time.time() + 60)
    for batch, scripted in [([msg()], False), ([delayed], False), ([msg(CLOSED)], True),
                            ([msg(), msg(CLOSED), delayed], True), ([msg(CLOSED, queue="other"), msg()], True)]:
        commands, _, says = broker.publish_commands(batch)
        assert says is scripted
        assert any(c[0] == "EVALSHA" for c in commands) is scripted


def test_a_limited_publish_to_a_declared_queue_after_a_flushed_script_cache_writes_once(
        private_redis_url, namespace, private_raw):
    """The queue is declared (no SADD in the pipeline): the script call is its last command."""
    b = RedisBroker.from_url(private_redis_url, namespace=namespace)
    try:
        b.publish_many([msg()])
        private_raw.script_flush()
        b.publish_many([msg(), msg(CLOSED)])
        s = b.stats(Q)
        assert (s.ready, s.throttled) == (2, 1)
    finally:
        b.close()


def test_a_limited_delivery_is_acked_in_the_fused_results_round_trip(broker, redis_url, namespace):
    from stem.backends.redis import RedisResultBackend
    backend = RedisResultBackend.from_url(redis_url, namespace=namespace)
    try:
        limit = Limit(concurrency_key="fused", concurrency=1)
        broker.publish_many([msg(limit), msg(limit)])
        d = broker.consume([Q], 10, 0)
        assert len(d) == 1
        refill = broker.run_and_consume(broker.ack_commands(d), [Q], 10)
        assert len(refill) == 1 and refill[0].limit == limit      # the ack freed the slot first
        broker.ack(refill)
        assert broker.lane_stats(Q) == []
    finally:
        backend.close()


def _consumers(redis_url, namespace, n, work):
    """``n`` brokers (each its own instance, as separate workers have), each in a thread
    running ``work(broker)`` until it returns; joined with a deadline."""
    import threading
    brokers = [RedisBroker.from_url(redis_url, namespace=namespace) for _ in range(n)]
    errors: list[BaseException] = []

    def run(b):
        try:
            work(b)
        except BaseException as exc:   # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in brokers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for b in brokers:
        b.close()
    assert not any(t.is_alive() for t in threads), "a consumer did not finish within 60 s"
    assert not errors, errors


def test_a_rate_key_holds_across_several_consumers(broker, redis_url, namespace):
    per_second, burst, total = 20.0, 3, 60
    limit = Limit(rate_key="shared-api", rate=per_second, burst=burst)
    broker.publish_many([msg(limit) for _ in range(total)])
    import threading
    lock = threading.Lock()
    stamps: list[float] = []

    def work(b):
        while True:
            with lock:
                if len(stamps) >= total:
                    return
            got = b.consume([Q], 5, 0.5)
            now = time.monotonic()
            with lock:
                stamps.extend(now for _ in got)
            b.ack(got)

    _consumers(redis_url, namespace, 3, work)
    stamps.sort()
    assert len(stamps) == total
    # never faster than the bucket: the first burst at once, then one per 1/rate
    assert stamps[-1] - stamps[0] >= (total - burst) / per_second - 0.1
    # any window of the (client-side) return times: at most burst + rate * w, with one lease of
    # slack for the time between a lease in Redis and its reply reaching the thread
    for i in range(total):
        for j in range(i, total):
            assert j - i + 1 <= burst + per_second * (stamps[j] - stamps[i]) + 1, (i, j)


def test_a_concurrency_key_holds_across_several_consumers(broker, redis_url, namespace):
    limit = Limit(concurrency_key="db", concurrency=2)
    total = 30
    broker.publish_many([msg(limit) for _ in range(total)])
    import threading
    lock = threading.Lock()
    state = {"running": 0, "peak": 0, "done": 0}

    def work(b):
        while True:
            with lock:
                if state["done"] >= total:
                    return
            got = b.consume([Q], 3, 0.5)
            with lock:   # counted after the lease and until before the ack: never more than held
                state["running"] += len(got)
                state["peak"] = max(state["peak"], state["running"])
            time.sleep(0.01)                     # the task's work
            with lock:
                state["running"] -= len(got)
                state["done"] += len(got)
            b.ack(got)

    _consumers(redis_url, namespace, 3, work)
    assert state["done"] == total
    assert state["peak"] <= 2
    assert broker.lane_stats(Q) == []


@pytest.mark.parametrize("event", ["publish", "ack frees a slot", "nack requeues", "retry", "route"])
def test_a_blocked_consume_wakes_at_once_for_what_makes_a_lane_eligible(redis_url, namespace, raw, monkeypatch,
                                                                        event):
    """Without the lnotify stream a blocked consumer would only look again at its next tick;
    with ticks of 30 s, returning within 10 s shows the stream woke it."""
    import threading

    import stem.brokers.redis as redis_broker
    producer = RedisBroker.from_url(redis_url, namespace=namespace)
    monkeypatch.setattr(redis_broker, "_MAX_BLOCK_S", 30.0)
    waiter = RedisBroker.from_url(redis_url, namespace=namespace, socket_timeout=70.0)
    blocking = threading.Event()
    execute_command = waiter._client.execute_command

    def spy(*args, **kwargs):
        if args[0] == "XREAD":   # its consume script ran and found nothing: what follows must wake it
            blocking.set()
        return execute_command(*args, **kwargs)

    monkeypatch.setattr(waiter._client, "execute_command", spy)
    try:
        one_slot = Limit(concurrency_key="slot", concurrency=1)
        held = None
        if event in ("ack frees a slot", "nack requeues", "retry"):
            producer.publish_many([msg(one_slot, vt=60.0), msg(one_slot, vt=60.0)])
            held = producer.consume([Q], 1, 0)[0]
        elif event == "route":
            producer.publish(msg())
            held = producer.consume([Q], 1, 0)[0]
        out: list = []
        t = threading.Thread(target=lambda: out.extend(waiter.consume([Q], 1, 25.0)))
        t.start()
        assert blocking.wait(10), "the consumer never came to block"
        start = time.monotonic()
        if event == "publish":
            producer.publish(msg(one_slot))
        elif event == "ack frees a slot":
            producer.ack([held])
        elif event == "nack requeues":
            producer.nack(held, requeue=True)
        elif event == "retry":
            producer.retry(held, b"again", None)
        else:
            producer.route_limited(held, one_slot)
        t.join(20.0)
        assert not t.is_alive() and len(out) == 1, out
        assert time.monotonic() - start < 10.0
        assert out[0].limit == one_slot
    finally:
        producer.close()
        waiter.close()


def test_route_limited_moves_a_limited_delivery_to_another_lane_and_frees_its_slot(broker):
    old, new = Limit(concurrency_key="old", concurrency=1), Limit(rate_key="new", rate=1000.0, burst=10)
    broker.publish_many([msg(old), msg(old)])
    d = broker.consume([Q], 10, 0)
    assert len(d) == 1
    broker.route_limited(d[0], new)
    got = broker.consume([Q], 10, 0)
    assert sorted((x.limit.rate_key or "", x.delivery_count) for x in got) == [("", 1), ("new", 1)]
    assert {(s.rate_key, s.concurrency_key) for s in broker.lane_stats(Q)} == {(None, "old")}


def test_keys_of_limited_messages_are_released_by_purge_dead_letter_and_delete_queue(broker):
    def publish(key, **kw):
        assert broker.publish_keyed([Keyed(msg(CLOSED, **kw), key, 60.0)]) == [None]

    publish("waiting")
    publish("delayed", not_before=time.time() + 60)
    assert broker.purge(Q) == 2
    assert broker.key_owner(Q, "waiting") is None and broker.key_owner(Q, "delayed") is None
    publish("leased")
    d = broker.consume([Q], 1, 0)[0]
    broker.dead_letter(d, "boom")
    assert broker.key_owner(Q, "leased") is None
    assert [dl.key for dl in broker.dead_letters(Q)] == ["leased"]
    publish("kept")
    broker.delete_queue(Q)
    assert broker.key_owner(Q, "kept") is None


def test_lane_stats_refuses_a_bad_limit(broker):
    from stem.errors import ConfigurationError
    for bad in (0, -1, "10", 1.5):
        with pytest.raises(ConfigurationError):
            broker.lane_stats(Q, bad)


def test_lanes_buckets_and_slots_survive_a_kill_9_of_redis(tmp_path):
    """With appendfsync always, what a limit holds survives a SIGKILL of the server: the
    throttled messages stay in their lanes, a spent bucket stays spent, a held slot stays
    held until its lease ends, and then its message comes back under the limit."""
    import shutil

    from stem.errors import BrokerConnectionError
    from tests.conftest import REQUIRE_SERVICES
    from tests.support import RedisServer
    if shutil.which("redis-server") is None:
        if REQUIRE_SERVICES:
            pytest.fail("redis-server is not on PATH and STEM_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path).start()
    broker = RedisBroker.from_url(server.url, namespace="lim")
    try:
        slot = Limit(concurrency_key="one", concurrency=1)
        held_msg, waiting_msg = msg(slot, vt=2.0), msg(slot, vt=2.0)
        broker.publish_many([held_msg, waiting_msg, msg(CLOSED), msg(CLOSED)])
        got = broker.consume([Q], 10, 0)
        assert sorted(d.task_id for d in got if d.limit == slot) == [held_msg.task_id]
        assert sum(d.limit == CLOSED for d in got) == 1          # the closed bucket's one token
        before = broker.stats(Q)
        assert (before.in_flight, before.throttled) == (2, 2)

        server.kill()
        with pytest.raises(BrokerConnectionError):
            broker.consume([Q], 1, 0)
        server.start()                                  # an empty script cache: NOSCRIPT, reloaded

        assert broker.stats(Q)[1:6] == before[1:6]
        assert broker.consume([Q], 10, 0) == []         # the slot is still held, the bucket still spent
        back = []
        deadline = time.monotonic() + 20
        while not back and time.monotonic() < deadline:
            back = broker.consume([Q], 10, 1.0)         # the slot's lease (2 s) runs out
        # the expired delivery went back behind the waiting one, which takes the freed slot
        assert [(d.task_id, d.delivery_count, d.limit) for d in back] == [(waiting_msg.task_id, 1, slot)]
        after = broker.stats(Q)
        assert (after.in_flight, after.throttled) == (2, 2)          # one slot at a time, still
        assert {(x.rate_key, x.concurrency_key): (x.waiting, x.running) for x in broker.lane_stats(Q)} == {
            (None, "one"): (1, 1), ("closed", None): (1, 0)}
    finally:
        broker.close()
        server.kill()
