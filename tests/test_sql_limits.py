"""Limits on the SQL brokers beyond the contract: the schema upgrade that brings them (version 4
-> 5, in place), concurrent consumers on Postgres that must never over-grant a slot or a token,
the unlimited claim's plan, the backend's fused result+ack freeing slots, and the lanes'
bookkeeping (an emptied lane and an idle bucket do not stay)."""

from __future__ import annotations

import math

import threading
import time
import uuid

import pytest

from stem.backends import from_url as backend_from_url
from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Limit, Message
from stem.results import TaskState, TaskStatus
from tests.support import current_version, old_broker_rows, schema_versions, sql_rows, store_at_version, wait_for

Q = "limited"


def lim_msg(limit: Limit | None, **kw) -> Message:
    return Message(uuid.uuid4().hex, Q, b"x", limit=limit, **kw)


def check_upgraded(broker) -> None:
    """The rows written under version 4 are delivered, dead-lettered and replayed as before, and
    the upgraded tables take limited messages (a dead letter of one replays into its lane)."""
    [d] = broker.consume([Q], 5, 5.0)
    assert (d.task_id, bytes(d.frame), d.limit) == ("old-ready", b"old", None)
    broker.ack([d])
    assert broker.replay(Q) == 1
    [d] = broker.consume([Q], 5, 5.0)
    assert (d.task_id, d.limit) == ("old-dead", None)
    broker.ack([d])

    limit = Limit(concurrency_key="acct", concurrency=1)
    a, b = lim_msg(limit), lim_msg(limit)
    broker.publish_many([a, b])
    assert broker.stats(Q).throttled == 2
    [d] = broker.consume([Q], 5, 5.0)
    assert (d.task_id, d.limit) == (a.task_id, limit)
    assert broker.consume([Q], 5, 0.2) == []
    broker.dead_letter(d, "poison")
    [d] = broker.consume([Q], 5, 5.0)
    assert d.task_id == b.task_id
    assert broker.replay(Q) == 1
    assert broker.stats(Q).throttled == 1          # back in its lane, behind b's slot
    broker.ack([d])
    [d] = broker.consume([Q], 5, 5.0)
    assert (d.task_id, d.limit) == (a.task_id, limit)
    broker.ack([d])
    assert broker.stats(Q)[1:] == (0, 0, 0, 0, 0)


def test_a_version_4_store_upgrades_in_place_keeps_its_rows_and_then_takes_limits(sql_url):
    with store_at_version(sql_url, 4, *old_broker_rows(sql_url, Q)) as url:
        broker = broker_from_url(url)
        try:
            assert broker.migrate() == current_version(url) >= 5
            assert schema_versions(url) == list(range(1, current_version(url) + 1))
            check_upgraded(broker)
            assert broker.migrate() == current_version(url)        # idempotent
        finally:
            broker.close()


def test_the_fused_result_and_ack_frees_slots_as_the_brokers_ack_does(sql_url):
    broker, backend = broker_from_url(sql_url), backend_from_url(sql_url)
    try:
        limit = Limit(concurrency_key="acct", concurrency=2)
        msgs = [lim_msg(limit) for _ in range(4)] + [lim_msg(None)]
        broker.publish_many(msgs)
        ds = broker.consume([Q], 10, 5.0)
        assert sorted(d.limit is None for d in ds) == [False, False, True]       # two slots, one plain
        assert broker.consume([Q], 10, 0.2) == []
        statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, result=1) for d in ds]
        assert backend.store_many_and_ack(statuses, broker, ds) is True
        assert all(s is not None and s.succeeded for s in backend.get_many([d.task_id for d in ds]))
        more = broker.consume([Q], 10, 5.0)               # both slots are free again
        assert sorted(d.task_id for d in more) == sorted(m.task_id for m in msgs[2:4])
        broker.ack(more)
        s = broker.stats(Q)
        assert (s.in_flight, s.throttled, s.ready) == (0, 0, 0)
    finally:
        broker.close()
        backend.close()


def test_an_emptied_lane_and_an_idle_bucket_do_not_stay(sql_url):
    broker = broker_from_url(sql_url)
    try:
        # no bucket sweep until the test asks for one: under load the 40 ms the bucket's TAT stays
        # ahead could pass before the first consume's sweep, which would drop it before it is counted
        broker._next_bucket_sweep = math.inf
        broker.publish_many([lim_msg(Limit(rate_key="tenant", rate=50.0, burst=2)) for _ in range(2)])
        broker.ack(broker.consume([Q], 10, 5.0))
        assert sql_rows(sql_url, "SELECT count(*) FROM stem_buckets") == [(1,)]
        # a consume that finds the lane due and empty drops it (SQLite: the ack already did)
        broker.consume([Q], 10, 0.1)
        assert sql_rows(sql_url, "SELECT count(*) FROM stem_lanes") == [(0,)]
        wait_for(lambda: sql_rows(sql_url, "SELECT count(*) FROM stem_buckets WHERE tat >= "
                               + ("strftime('%s', 'now')" if sql_url.startswith("sqlite")
                                  else "extract(epoch FROM now())")) == [(0,)], 5.0, what="the TAT to pass")
        broker._next_bucket_sweep = 0.0           # the minute since the last sweep is up
        broker.publish(lim_msg(Limit(rate_key="other", rate=1.0, burst=1)))   # its TAT a second ahead: live at the sweep
        assert len(broker.consume([Q], 10, 5.0)) == 1
        assert [r[0] for r in sql_rows(sql_url, "SELECT rate_key FROM stem_buckets")] == ["other"]
    finally:
        broker.close()


def test_route_limited_moves_a_keyed_plain_delivery_into_its_lane_with_its_key(sql_url):
    from stem.brokers.base import Keyed
    broker = broker_from_url(sql_url)
    try:
        m = lim_msg(None)
        assert broker.publish_keyed([Keyed(m, "k", 600.0)]) == [None]
        [d] = broker.consume([Q], 5, 5.0)
        limit = Limit(rate_key="tenant", rate=100.0, burst=1)
        broker.route_limited(d, limit)
        assert broker.stats(Q).throttled == 1 and broker.stats(Q).in_flight == 0
        [again] = broker.consume([Q], 5, 5.0)
        assert (again.task_id, again.key, again.limit, again.delivery_count) == (m.task_id, "k", limit, 1)
        broker.ack([again])
        assert broker.key_owner(Q, "k") is None            # the terminal settle released the key
        broker.route_limited(again, limit)                 # settled already: left alone
        assert broker.stats(Q)[1:] == (0, 0, 0, 0, 0)
    finally:
        broker.close()


# -- Postgres under concurrent consumers ------------------------------------------------------

def _consumers(url: str, n: int, work, stop: threading.Event) -> list[threading.Thread]:
    """``n`` threads, each with its own broker (its own connections), running ``work(broker)``
    until ``stop``; errors are collected on the thread objects."""
    threads = []
    for _ in range(n):
        def run():
            broker = broker_from_url(url)
            try:
                while not stop.is_set():
                    work(broker)
            except BaseException as e:       # noqa: BLE001 - reported by the test
                threading.current_thread().error = e
                stop.set()
            finally:
                broker.close()
        t = threading.Thread(target=run, daemon=True)
        t.error = None
        threads.append(t)
        t.start()
    return threads


@pytest.mark.pg_heavy
@pytest.mark.postgres
def test_concurrent_postgres_consumers_never_hold_more_slots_than_the_limit(postgres_url, namespace):
    url = f"{postgres_url}?schema={namespace}"
    broker = broker_from_url(url)
    try:
        limit = Limit(concurrency_key="acct", concurrency=3)
        total = 120
        # three lanes share the key (different rate keys), so lanes alone would not serialise them
        broker.publish_many([lim_msg(Limit("r%d" % (i % 3), 1000.0, 100, "acct", 3)) for i in range(total)])
        running, most, done = 0, 0, []
        lock = threading.Lock()
        stop = threading.Event()

        def work(b):
            nonlocal running, most
            ds = b.consume([Q], 4, 0.5)
            with lock:
                running += len(ds)
                most = max(most, running)
            time.sleep(0.002 * len(ds))               # "runs" the tasks while their slots are held
            with lock:
                running -= len(ds)
                done.extend(d.task_id for d in ds)
            b.ack(ds)
            if len(done) >= total:
                stop.set()

        threads = _consumers(url, 6, work, stop)
        for t in threads:
            t.join(60.0)
        assert not any(t.is_alive() for t in threads)
        assert [t.error for t in threads if t.error] == []
        assert len(done) == len(set(done)) == total
        assert most <= limit.concurrency, f"{most} slots of 3 were held at once"
        assert most == limit.concurrency         # the limit is reached, not only respected
    finally:
        broker.close()
        import psycopg
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


@pytest.mark.pg_heavy
@pytest.mark.postgres
def test_concurrent_postgres_consumers_never_lease_more_than_burst_plus_rate_times_the_window(postgres_url,
                                                                                              namespace):
    url = f"{postgres_url}?schema={namespace}"
    broker = broker_from_url(url)
    try:
        rate, burst, total = 25.0, 3, 40
        # two lanes share the rate key (different concurrency keys)
        broker.publish_many([lim_msg(Limit("tenant", rate, burst, "c%d" % (i % 2), 100)) for i in range(total)])
        leased: list[float] = []
        lock = threading.Lock()
        stop = threading.Event()

        def work(b):
            ds = b.consume([Q], 5, 0.5)
            b.ack(ds)
            with lock:
                leased.extend(d.leased_at for d in ds)     # the database's clock at the lease
                if len(leased) >= total:
                    stop.set()

        threads = _consumers(url, 5, work, stop)
        for t in threads:
            t.join(60.0)
        assert [t.error for t in threads if t.error] == []
        assert len(leased) == total
        leased.sort()
        for i in range(total):
            for j in range(i, total):
                window = leased[j] - leased[i]
                assert j - i + 1 <= burst + rate * window + 1e-6, (
                    f"{j - i + 1} leases in {window:.3f}s > {burst} + {rate}/s")
        # and the limit is used: the whole took about (total - burst) / rate
        assert leased[-1] - leased[0] < (total - burst) / rate + 1.0
    finally:
        broker.close()
        import psycopg
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


@pytest.mark.postgres
def test_the_postgres_unlimited_claim_keeps_its_plan_with_lanes_in_the_schema(postgres_url, namespace):
    """The claim's plan: the ready and due-again index scans it always had, behind one probe of
    ``stem_lanes_due``; it never reads the lane jobs, however many wait."""
    url = f"{postgres_url}?schema={namespace}"
    broker = broker_from_url(url)
    try:
        broker.publish_many([lim_msg(Limit("tenant", 0.001, 1)) for _ in range(2000)]
                            + [lim_msg(None) for _ in range(50)])
        assert len(broker.consume([Q], 1, 5.0)) == 1          # the lane's one token
        assert broker.consume([Q], 1, 5.0)[0].limit is None    # then the lane is not due: plain
        params = {"queues": [Q], "n": 10, "vt": 30.0}

        def plan(sql: str) -> str:
            return "\n".join(r[0] for r in broker._fast.run(
                lambda conn: conn.execute("EXPLAIN " + sql, params).fetchall()))

        full, plain = plan(broker._sql["claim"]), plan(broker._sql["claim_plain"])
        for p in (full, plain):
            assert "stem_jobs_ready" in p and "stem_jobs_waiting" in p
            assert "Seq Scan" not in p and "stem_lane_jobs" not in p
        assert "stem_lanes_due" in full
        # the plain part of the plan is the same as before limits
        scans = [line.strip().split(" on ")[0] for line in plain.splitlines() if " on " in line]
        assert all(any(s in line for line in full.splitlines()) for s in scans)
    finally:
        broker.close()
        import psycopg
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


@pytest.mark.postgres
def test_a_lane_whose_key_another_consume_holds_delays_neither_it_nor_the_unlimited_messages(postgres_url,
                                                                                             namespace):
    """The lane is due, so the claim leases nothing; its key is held (as by a consume of another
    process in its transaction): the consume still leases the unlimited messages, and the lane's
    message as soon as the key is free."""
    import psycopg
    url = f"{postgres_url}?schema={namespace}"
    broker = broker_from_url(url)
    try:
        limited = lim_msg(Limit("tenant", 10.0, 1))
        plain = [lim_msg(None) for _ in range(3)]
        broker.publish_many([limited, *plain])
        key = f"stem-rate:{namespace}:{len(Q)}:{Q}:tenant"
        with psycopg.connect(postgres_url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
            got = broker.consume([Q], 10, 5.0)
            assert sorted(d.task_id for d in got) == sorted(m.task_id for m in plain)
            assert broker.stats(Q).throttled == 1
            t0 = time.monotonic()
            assert broker.consume([Q], 10, 0.3) == []          # looked again, still held: nothing
            assert time.monotonic() - t0 >= 0.25
        [d] = broker.consume([Q], 10, 5.0)                     # the session ended: the key is free
        assert (d.task_id, d.limit) == (limited.task_id, limited.limit)
    finally:
        broker.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


@pytest.mark.postgres
def test_a_settle_that_frees_a_slot_wakes_a_consumer_of_another_broker_at_once(postgres_url, namespace):
    """A consumer blocked on a full concurrency key sleeps until the slot's lease deadline (60 s
    here), unless a settle frees the slot: its notification wakes it at once."""
    import psycopg
    url = f"{postgres_url}?schema={namespace}"
    holder, waiter = broker_from_url(url), broker_from_url(url)
    try:
        limit = Limit(concurrency_key="acct", concurrency=1)
        first, second = lim_msg(limit, visibility_timeout=60.0), lim_msg(limit, visibility_timeout=60.0)
        holder.publish_many([first, second])
        [d] = holder.consume([Q], 10, 5.0)
        got: list = []
        t = threading.Thread(target=lambda: got.extend(waiter.consume([Q], 10, 30.0)), daemon=True)
        t.start()
        # asleep on its condition (nothing is due for 60 s), listening
        wait_for(lambda: waiter._listener.listening and len(waiter._cond._waiters) == 1, 10.0,
                 what="the waiter to sleep")
        assert got == []
        t0 = time.monotonic()
        holder.ack([d])
        t.join(10.0)
        assert [x.task_id for x in got] == [second.task_id]
        assert time.monotonic() - t0 < 5.0
    finally:
        holder.close()
        waiter.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
