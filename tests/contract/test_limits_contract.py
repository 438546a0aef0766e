"""Rate and concurrency limits on every broker: the "Limits" part of ``stem/brokers/base.py``.

Deterministic by construction: a "closed" lane uses a rate so small (one token per 100 s) that
its next token never comes during the test, so "not leased" is a plain assertion; tests that
need time to pass wait on a blocking ``consume`` or on ``wait_for`` with a deadline, and
measure bounds that a broker must keep whatever the machine's load (an upper bound from the
contract's formula, a lower bound loose enough to only catch a broker that never wakes).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from stem.brokers.base import Keyed, LaneStats, Limit, Message, lane_of
from stem.errors import ConfigurationError

from ..support import wait_for

Q = "limited"
CLOSED = 0.01        # leases per second: after the first token, the next is 100 s away


def rate(key: str = "r", per_second: float = CLOSED, burst: int = 1) -> Limit:
    return Limit(rate_key=key, rate=per_second, burst=burst)


def slots(key: str = "c", n: int = 1) -> Limit:
    return Limit(concurrency_key=key, concurrency=n)


def msg(limit: Limit | None = None, *, queue: str = Q, task_id: str | None = None, frame: bytes = b"frame",
        priority: int = 0, not_before: float | None = None, vt: float | None = None) -> Message:
    return Message(task_id or uuid.uuid4().hex, queue, frame, priority, not_before, vt, limit)


def take(broker, n: int = 100, timeout: float = 0.0, queue: str = Q):
    return broker.consume([queue], n, timeout)


def one(broker, timeout: float = 5.0, queue: str = Q):
    got = take(broker, 1, timeout, queue)
    assert len(got) == 1, f"expected one delivery within {timeout}s, got {got}"
    return got[0]


def lanes(broker, queue: str = Q) -> dict[tuple[str | None, str | None], tuple[int, int]]:
    return {(s.rate_key, s.concurrency_key): (s.waiting, s.running) for s in broker.lane_stats(queue)}


# -- lanes and throttling -------------------------------------------------------------------------
@pytest.mark.waits
def test_a_throttled_message_is_never_leased_and_its_delivery_count_is_unchanged(broker):
    limit = rate("api", per_second=0.5)            # one token now, the next 2 s later
    first, second = msg(limit), msg(limit)
    broker.publish_many([first, second])
    got = take(broker)
    assert [d.task_id for d in got] == [first.task_id]
    assert got[0].limit == limit and got[0].delivery_count == 1
    for _ in range(5):                              # asked again and again while throttled
        assert take(broker) == []
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.delayed, s.throttled) == (0, 1, 0, 1)
    later = one(broker, timeout=10.0)               # the next token
    assert later.task_id == second.task_id
    assert later.delivery_count == 1                # throttling never counted as a delivery
    assert later.limit == limit


def test_a_limited_message_waits_in_its_lane_and_ready_excludes_it(broker):
    broker.publish_many([msg(rate()), msg(rate()), msg(rate()), msg(), msg()])
    s = broker.stats(Q)
    assert s.throttled == 3 and s.ready == 2
    got = take(broker)
    assert len(got) == 3                            # two unlimited + the lane's one token
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.throttled) == (0, 3, 2)


def test_within_a_lane_higher_priority_first_then_first_published(broker):
    limit = slots("one", 1)
    low, high, high2 = msg(limit, priority=0), msg(limit, priority=5), msg(limit, priority=5)
    broker.publish_many([low, high, high2])
    order = []
    for _ in range(3):
        d = one(broker)
        order.append(d.task_id)
        broker.ack([d])
    assert order == [high.task_id, high2.task_id, low.task_id]


@pytest.mark.waits
def test_a_delayed_limited_message_enters_its_lane_when_due(broker):
    broker.publish(msg(rate(), not_before=time.time() + 2.0))   # due after publish and stats, even on a loaded machine
    s = broker.stats(Q)
    assert (s.delayed, s.throttled, s.ready) == (1, 0, 0)
    d = one(broker, timeout=10.0)
    assert d.limit == rate()
    assert broker.stats(Q).delayed == 0


# -- rate: GCRA ------------------------------------------------------------------------------------
@pytest.mark.waits
def test_a_rate_key_leases_at_most_burst_plus_rate_times_the_window(broker):
    per_second, burst = 5.0, 3
    limit = rate("gcra", per_second, burst)
    broker.publish_many([msg(limit) for _ in range(40)])
    start = time.monotonic()
    first = take(broker)
    assert len(first) == burst                      # an idle bucket gives burst at once, no more
    count = len(first)
    while time.monotonic() - start < 2.0:
        count += len(take(broker, 100, 0.5))
    elapsed = time.monotonic() - start
    assert count <= burst + per_second * elapsed
    assert count >= burst + per_second * elapsed * 0.5, "the bucket refilled far below its rate"


@pytest.mark.waits
def test_a_blocking_consumer_keeps_up_with_the_rate(broker):
    """One consumer that blocks between tokens gets them at the rate, not later: 40 leases at
    20/s (burst 1) take 1.95 s, and a broker that wakes late for each token falls behind."""
    per_second, n = 20.0, 40
    limit = rate("pace", per_second)
    broker.publish_many([msg(limit) for _ in range(n)])
    leased = 0
    start = time.monotonic()
    while leased < n and time.monotonic() - start < 30.0:
        got = take(broker, 1, 5.0)
        leased += len(got)
        broker.ack(got)
    elapsed = time.monotonic() - start
    expected = (n - 1) / per_second
    assert leased == n
    assert elapsed >= expected * 0.9, f"{n} leases in {elapsed:.2f}s: faster than {per_second}/s"
    # a broker that wakes late for each token (a 100 ms tick) would take 40 x 0.1 s longer; the
    # second of slack is a loaded machine's scheduling delay, not a broker's
    assert elapsed <= expected * 1.15 + 1.0, f"{n} leases at {per_second}/s took {elapsed:.2f}s, not {expected:.2f}s"


def test_messages_of_one_rate_key_share_its_bucket_across_lanes(broker):
    # same rate key, two concurrency keys: two lanes, one bucket
    a = Limit(rate_key="shared", rate=CLOSED, burst=1, concurrency_key="a", concurrency=5)
    b = Limit(rate_key="shared", rate=CLOSED, burst=1, concurrency_key="b", concurrency=5)
    broker.publish_many([msg(a), msg(b)])
    assert len(take(broker)) == 1
    assert broker.stats(Q).throttled == 1


def test_rate_keys_are_scoped_to_their_queue(broker):
    broker.publish_many([msg(rate("same"), queue="limited-a"), msg(rate("same"), queue="limited-b")])
    assert len(take(broker, queue="limited-a")) == 1
    assert len(take(broker, queue="limited-b")) == 1


def test_a_blocking_consume_returns_at_the_next_token_not_at_its_timeout(broker):
    limit = rate("tick", per_second=1.0)
    broker.publish_many([msg(limit), msg(limit)])
    assert len(take(broker)) == 1
    start = time.monotonic()
    got = take(broker, 10, 20.0)
    elapsed = time.monotonic() - start
    assert len(got) == 1
    assert 0.5 <= elapsed < 5.0, f"woke after {elapsed:.2f}s: the next token was 1 s away"


def test_a_blocking_consume_returns_when_a_slot_lease_runs_out(broker):
    limit = slots("lease", 1)
    broker.publish_many([msg(limit, vt=1.0), msg(limit, vt=1.0)])
    held = one(broker, timeout=0)
    start = time.monotonic()
    got = take(broker, 10, 20.0)
    elapsed = time.monotonic() - start
    assert len(got) == 1, got
    assert elapsed < 8.0, f"woke after {elapsed:.2f}s: the slot's lease ended after 1 s"
    assert got[0].limit == limit


def test_a_blocked_consume_wakes_for_a_limited_message_published_meanwhile(broker):
    out: list = []
    t = threading.Thread(target=lambda: out.extend(take(broker, 1, 20.0)))
    start = time.monotonic()
    t.start()
    time.sleep(0.2)       # let it block (either order passes; this only makes the wake-up path likely)
    broker.publish(msg(rate()))
    t.join(20.0)
    assert len(out) == 1 and time.monotonic() - start < 10.0


# -- concurrency slots -----------------------------------------------------------------------------
def test_concurrency_n_leases_at_most_n_at_once(broker):
    limit = slots("db", 2)
    broker.publish_many([msg(limit) for _ in range(5)])
    got = take(broker)
    assert len(got) == 2 and all(d.limit == limit for d in got)
    assert take(broker) == []
    assert lanes(broker) == {(None, "db"): (3, 2)}
    broker.ack(got[:1])
    assert len(take(broker)) == 1
    assert take(broker) == []


@pytest.mark.parametrize("how", ["ack", "dead_letter", "nack", "nack-requeue", "retry"])
def test_every_settle_frees_the_slot(broker, how):
    limit = slots("one", 1)
    first, second = msg(limit), msg(limit)
    broker.publish_many([first, second])
    d = one(broker, timeout=0)
    assert d.task_id == first.task_id
    assert take(broker) == []
    if how == "ack":
        broker.ack([d])
    elif how == "dead_letter":
        broker.dead_letter(d, "boom")
    elif how == "nack":
        broker.nack(d, requeue=False)
    elif how == "nack-requeue":
        broker.nack(d, requeue=True)
    else:
        broker.retry(d, b"attempt-2", time.time() + 60)
    nxt = one(broker, timeout=0)                    # the slot is free again at once
    assert nxt.limit == limit
    if how != "nack-requeue":
        assert nxt.task_id == second.task_id
    assert take(broker) == []                       # and taken again


@pytest.mark.waits
def test_extend_moves_the_slots_deadline(broker):
    limit = slots("long", 1)
    broker.publish_many([msg(limit, vt=0.5), msg(limit, vt=0.5)])
    d = one(broker, timeout=0)
    broker.extend([d], 30.0)
    assert take(broker, 10, 2.0) == []              # the old deadline passed: still held
    s = broker.stats(Q)
    assert (s.in_flight, s.throttled) == (1, 1)
    broker.ack([d])
    assert len(take(broker)) == 1


@pytest.mark.waits
def test_an_expired_lease_frees_its_slot_and_its_message_goes_back_to_its_lane(broker):
    limit = slots("crash", 1)
    a, b = msg(limit, vt=0.5), msg(limit, vt=0.5)
    broker.publish_many([a, b])
    held = one(broker, timeout=0)                   # its worker is killed: never settled
    assert held.task_id == a.task_id
    seen = {}
    deadline = time.monotonic() + 20.0
    while len(seen) < 2 and time.monotonic() < deadline:
        for d in take(broker, 10, 1.0):
            assert broker.stats(Q).in_flight == 1, "more than one slot lived at once"
            seen.setdefault(d.task_id, d.delivery_count)
            assert d.limit == limit            # not leaked as unlimited: it came back from its lane
            broker.ack([d])
    assert set(seen) == {a.task_id, b.task_id}
    assert seen[a.task_id] == 2                     # the expiry counted as a delivery, as usual


@pytest.mark.waits
def test_an_expired_lease_goes_back_to_its_lane_not_to_the_ready_messages(broker):
    limit = rate("closed")                          # its one token is spent by the first lease
    m = msg(limit, vt=0.5)
    broker.publish(m)
    d = one(broker, timeout=0)
    assert d.task_id == m.task_id

    def back_in_lane():
        assert take(broker) == [], "a throttled message was leased again after its lease expired"
        return broker.stats(Q).throttled == 1

    wait_for(back_in_lane, timeout=15.0, what="the expired delivery back in its lane", interval=0.1)
    s = broker.stats(Q)
    assert (s.ready, s.in_flight) == (0, 0)
    assert lanes(broker) == {("closed", None): (1, 0)}


# -- fairness and the unlimited path ---------------------------------------------------------------
def test_lanes_are_served_round_robin_so_a_busy_key_cannot_starve_a_quiet_one(broker):
    busy = [msg(Limit(rate_key="busy", rate=1000.0, burst=1000)) for _ in range(20)]
    quiet = [msg(Limit(rate_key="quiet", rate=1000.0, burst=1000)) for _ in range(2)]
    broker.publish_many(busy)
    broker.publish_many(quiet)
    got = take(broker, 2)                           # one turn: one message of each lane
    assert {d.limit.rate_key for d in got} == {"busy", "quiet"}
    singles = [one(broker, timeout=0).limit.rate_key for _ in range(4)]
    assert "quiet" in singles[:2], f"the quiet key waited behind the busy one: {singles}"


def test_a_consume_serves_the_lanes_of_all_its_queues_and_their_unlimited_messages(broker):
    broker.publish_many([msg(rate("x"), queue="lim-a"), msg(rate("x"), queue="lim-b"),
                         msg(queue="lim-a"), msg(queue="lim-b")])
    got = broker.consume(["lim-a", "lim-b"], 10, 0)
    assert sorted((d.queue, d.limit is not None) for d in got) == [
        ("lim-a", False), ("lim-a", True), ("lim-b", False), ("lim-b", True)]


def test_a_big_throttled_backlog_does_not_delay_unlimited_messages(broker):
    limit = rate("backlog")
    broker.publish_many([msg(limit) for _ in range(2000)])
    free = [msg() for _ in range(3)]
    broker.publish_many(free)
    start = time.monotonic()
    got = take(broker, 10)
    elapsed = time.monotonic() - start
    ids = {d.task_id for d in got}
    assert {m.task_id for m in free} <= ids and len(got) == 4     # plus the lane's one token
    assert elapsed < 2.0, f"a consume took {elapsed:.2f}s behind 2000 throttled messages"
    assert broker.stats(Q).throttled == 1999
    broker.publish(msg())
    start = time.monotonic()
    assert len(take(broker, 10, 5.0)) == 1
    assert time.monotonic() - start < 2.0


# -- settles, admin, keyed publish ----------------------------------------------------------------
def test_retry_publishes_the_successor_into_the_same_lane(broker):
    limit = rate("retry")
    broker.publish(msg(limit))
    d = one(broker, timeout=0)
    broker.retry(d, b"attempt-2", None)
    assert take(broker) == []                       # the successor waits for the next token
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.throttled) == (0, 0, 1)
    assert lanes(broker) == {("retry", None): (1, 0)}


@pytest.mark.waits
def test_a_delayed_retry_enters_the_lane_when_due(broker):
    limit = slots("retry-later", 1)
    broker.publish(msg(limit))
    d = one(broker, timeout=0)
    broker.retry(d, b"attempt-2", time.time() + 0.5)
    assert broker.stats(Q).delayed == 1
    again = one(broker, timeout=10.0)
    assert (bytes(again.frame), again.limit, again.delivery_count) == (b"attempt-2", limit, 1)


def test_nack_requeue_puts_the_message_back_into_its_lane(broker):
    limit = rate("nack")
    broker.publish(msg(limit))
    d = one(broker, timeout=0)
    broker.nack(d, requeue=True)
    assert take(broker) == []
    assert broker.stats(Q).throttled == 1
    assert lanes(broker) == {("nack", None): (1, 0)}


def test_replay_of_a_limited_dead_letter_puts_it_back_into_its_lane(broker):
    limit = rate("replay")
    broker.publish(msg(limit))
    d = one(broker, timeout=0)
    broker.dead_letter(d, "boom")
    assert broker.replay(Q) == 1
    assert take(broker) == []                       # its bucket has no token: it waits in its lane
    s = broker.stats(Q)
    assert (s.ready, s.throttled, s.dead) == (0, 1, 0)


def test_replay_of_a_slot_limited_dead_letter_is_leased_with_its_limit(broker):
    limit = slots("replayed", 1)
    broker.publish(msg(limit))
    broker.dead_letter(one(broker, timeout=0), "boom")
    broker.replay(Q)
    d = one(broker, timeout=0)
    assert d.limit == limit and d.delivery_count == 1


def test_a_limited_dead_letter_left_in_the_dlq_by_a_held_key_keeps_its_limit_for_a_later_replay(broker):
    limit = rate("kept")
    broker.publish_keyed([Keyed(msg(limit), "k", 60.0)])
    broker.dead_letter(one(broker, timeout=0), "boom")       # spends the key's one token
    newer = Keyed(msg(), "k", 60.0)
    assert broker.publish_keyed([newer]) == [None]
    assert broker.replay(Q) == 0                             # the key is held: it stays dead
    d = one(broker, timeout=0)
    assert d.task_id == newer.message.task_id
    broker.ack([d])
    assert broker.replay(Q) == 1
    assert take(broker) == []                                # back in its lane, still throttled
    assert broker.stats(Q).throttled == 1


def test_purge_drops_lane_messages_and_counts_them(broker):
    broker.publish_many([msg(rate()), msg(rate()), msg(slots()), msg(), msg(rate(), not_before=time.time() + 60)])
    assert broker.purge(Q) == 5
    s = broker.stats(Q)
    assert (s.ready, s.delayed, s.throttled, s.in_flight) == (0, 0, 0, 0)
    assert broker.lane_stats(Q) == []
    assert take(broker) == []


def test_delete_queue_drops_lanes_buckets_and_slots(broker):
    limit = Limit(rate_key="gone", rate=CLOSED, burst=1, concurrency_key="gone", concurrency=1)
    broker.publish_many([msg(limit), msg(limit)])
    held = one(broker, timeout=0)
    broker.delete_queue(Q)
    broker.ack([held])                              # a settle of the deleted queue: a no-op
    broker.publish_many([msg(limit)])
    assert broker.stats(Q).throttled == 1
    assert len(take(broker)) == 1                   # a fresh bucket and free slots


def test_publish_keyed_keeps_the_limit(broker):
    limit = rate("keyed")
    items = [Keyed(msg(limit), "k1", 60.0), Keyed(msg(limit), "k2", 60.0), Keyed(msg(limit), "k1", 60.0)]
    out = broker.publish_keyed(items)
    assert out == [None, None, items[0].message.task_id]
    d = one(broker, timeout=0)
    assert (d.key, d.limit) == ("k1", limit)
    assert take(broker) == []
    assert broker.stats(Q).throttled == 1
    broker.ack([d])
    assert broker.key_owner(Q, "k1") is None
    assert broker.key_owner(Q, "k2") == items[1].message.task_id


def test_publish_keyed_of_a_limited_message_frees_its_slot_on_ack(broker):
    limit = slots("keyed-slot", 1)
    broker.publish_keyed([Keyed(msg(limit), "a", 60.0), Keyed(msg(limit), "b", 60.0)])
    d = one(broker, timeout=0)
    assert take(broker) == []
    broker.ack([d])
    assert one(broker, timeout=0).key in {"a", "b"}


# -- route_limited and lane_stats ------------------------------------------------------------------
def test_route_limited_moves_a_leased_delivery_into_its_lane_keeping_frame_and_count(broker):
    limit = slots("routed", 1)
    m = msg(frame=b"payload")
    broker.publish(m)
    d = one(broker, timeout=0)
    assert d.limit is None
    broker.route_limited(d, limit)
    s = broker.stats(Q)
    assert (s.in_flight, s.ready, s.throttled) == (0, 0, 1)
    again = one(broker, timeout=0)
    assert (again.task_id, bytes(again.frame), again.limit) == (m.task_id, b"payload", limit)
    assert again.delivery_count == d.delivery_count    # routing is not a delivery
    assert take(broker) == []


def test_route_limited_leaves_the_message_under_its_limit(broker):
    limit = rate("routed-closed")
    broker.publish_many([msg(limit), msg()])
    got = take(broker)
    assert len(got) == 2
    plain = next(d for d in got if d.limit is None)
    broker.route_limited(plain, limit)
    assert take(broker) == []                       # the key's token is spent
    assert lanes(broker) == {("routed-closed", None): (1, 0)}


def test_route_limited_of_a_settled_delivery_is_left_alone(broker):
    broker.publish(msg())
    d = one(broker, timeout=0)
    broker.ack([d])
    broker.route_limited(d, slots())
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.throttled) == (0, 0, 0)
    assert take(broker) == []


def test_lane_stats_lists_waiting_and_running_most_waiting_first(broker):
    a, b = rate("A"), slots("B", 1)
    broker.publish_many([msg(a), msg(a), msg(a), msg(b), msg(b)])
    got = take(broker)
    assert len(got) == 2 and {d.limit for d in got} == {a, b}      # one turn: one of each lane
    stats = broker.lane_stats(Q)
    assert stats == [LaneStats(Q, "A", None, 2, 0), LaneStats(Q, None, "B", 1, 1)]
    assert broker.lane_stats(Q, limit=1) == stats[:1]
    b_delivery = next(d for d in got if d.limit == b)
    broker.ack([b_delivery])
    broker.ack([one(broker, timeout=0)])
    assert broker.lane_stats(Q) == [LaneStats(Q, "A", None, 2, 0)]
    assert broker.lane_stats("no-such-queue") == []


def test_lane_of_is_unambiguous():
    assert lane_of(Limit(rate_key="a|b", rate=1.0)) != lane_of(Limit(rate_key="a", rate=1.0, concurrency_key="b",
                                                                     concurrency=1))
    assert lane_of(Limit(concurrency_key="x", concurrency=1)) != lane_of(Limit(rate_key="x", rate=1.0))


# -- bad limits ----------------------------------------------------------------------------------------
BAD = [
    Limit(),
    Limit(rate_key="k", rate=0.0),
    Limit(rate_key="k", rate=-1.0),
    Limit(rate_key="k", rate=float("inf")),
    Limit(rate_key="k", rate=float("nan")),
    Limit(rate_key="k", rate=True),
    Limit(rate_key="k", rate=1.0, burst=0),
    Limit(rate_key="k", rate=1.0, burst=1.5),
    Limit(rate_key="", rate=1.0),
    Limit(rate_key="x" * 513, rate=1.0),
    Limit(rate_key=7, rate=1.0),
    Limit(concurrency_key="c", concurrency=0),
    Limit(concurrency_key="c", concurrency="2"),
    ("k", 1.0, 1, None, 0),                         # a tuple, not a Limit
]


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_a_bad_limit_is_refused_before_anything_is_stored(broker, bad):
    good = msg(rate())
    with pytest.raises(ConfigurationError):
        broker.publish(msg(bad))
    with pytest.raises(ConfigurationError):
        broker.publish_many([good, msg(bad)])
    with pytest.raises(ConfigurationError):
        broker.publish_keyed([Keyed(good, "good", 60.0), Keyed(msg(bad), "bad", 60.0)])
    assert broker.key_owner(Q, "good") is None and broker.key_owner(Q, "bad") is None
    s = broker.stats(Q)
    assert (s.ready, s.delayed, s.throttled, s.in_flight) == (0, 0, 0, 0)
    broker.publish(msg())
    d = one(broker, timeout=0)
    with pytest.raises(ConfigurationError):
        broker.route_limited(d, bad)
    assert broker.stats(Q).in_flight == 1           # still leased, untouched
    broker.ack([d])
    assert broker.lane_stats(Q) == []
