"""Postgres broker and backend beyond the contract suite: several processes, crashes, concurrent
migrations, LISTEN/NOTIFY wake-ups, lost connections, fork safety, table size and claim speed.

Each test works in its own schema, dropped afterwards.  (Restarting a server: test_postgres_restart.py.)
"""

from __future__ import annotations

import multiprocessing
import socket
import sys
import threading
import time
import uuid

import pytest

from stem.backends import from_url as backend_from_url
from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Message
from stem.errors import BackendConnectionError, BrokerConnectionError, BrokerError, ConfigurationError
from stem.results import TaskState, TaskStatus
from tests.test_sqlite_broker import (Q, check_each_delivered_once, check_killed_consumers_leases_are_redelivered,
                                      fork_while_held, wait_until)

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.postgres
FORK = multiprocessing.get_context("fork")


def drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_url(postgres_url, namespace):
    yield f"{postgres_url}?schema={namespace}"
    drop_schema(postgres_url, namespace)


@pytest.fixture
def broker(pg_url):
    b = broker_from_url(pg_url)
    yield b
    b.close()


@pytest.fixture
def backend(pg_url):
    b = backend_from_url(pg_url)
    yield b
    b.close()


def backend_pids(sessions) -> set[int]:
    return {c.info.backend_pid for c in sessions.connections() if not c.closed}


def terminate(url: str, pids) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


# -- several processes ----------------------------------------------------------------------
@pytest.mark.pg_heavy
def test_several_processes_claim_each_message_once(pg_url, broker):
    check_each_delivered_once(pg_url, {}, broker)


def test_leases_of_a_consumer_killed_with_sigkill_go_to_the_survivors_after_the_visibility_timeout(pg_url, broker):
    check_killed_consumers_leases_are_redelivered(pg_url, {}, broker)


def _migrate(url: str, start, out) -> None:
    try:
        with broker_from_url(url) as b:
            start.wait(10)
            out.put(b.migrate())
    except BaseException as e:        # report, do not hang the parent
        out.put(repr(e))


def test_concurrent_migrations_from_several_processes_apply_each_version_once(postgres_url, pg_url, namespace):
    start, out = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=_migrate, args=(pg_url, start, out)) for _ in range(6)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    from stem.stores.postgres_schema import SCHEMA_VERSION
    assert results == [SCHEMA_VERSION] * 6
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute(f'SELECT version FROM "{namespace}".stem_schema_version').fetchall()
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


# -- wake-ups -------------------------------------------------------------------------------
def _publish(url: str, frame: bytes) -> None:
    with broker_from_url(url) as b:
        b.publish(Message(uuid.uuid4().hex, Q, frame))


def test_notify_wakes_a_blocked_consumer_promptly_and_an_idle_consumer_does_not_poll(pg_url, broker):
    claims = []
    real_claim = broker._claim
    broker._claim = lambda *a: (claims.append(time.monotonic()), real_claim(*a))[1]
    broker.consume([Q], 1, 0.5)          # declares the queue, starts the listener
    got = []
    t = threading.Thread(target=lambda: got.extend(broker.consume([Q], 1, 30.0)))
    claims.clear()
    t.start()
    time.sleep(1.5)                      # idle: the consumer must be asleep, not polling
    idle_claims = len(claims)
    p = FORK.Process(target=_publish, args=(pg_url, b"wake"))
    t0 = time.monotonic()
    p.start()
    t.join(30)
    p.join(10)
    assert [bytes(d.frame) for d in got] == [b"wake"]
    assert time.monotonic() - t0 < 5.0          # far below the 30 s it would sleep unwoken
    assert idle_claims <= 2, f"{idle_claims} claims while idle for 1.5 s"


def test_a_sleeping_consumer_wakes_when_a_delayed_message_falls_due(broker):
    due = time.time() + 0.5
    broker.publish(Message("later", Q, b"x", not_before=due))
    [d] = broker.consume([Q], 1, 10.0)
    assert d.task_id == "later" and due - 0.05 <= time.time() < due + 3.0


def _store_later(url: str, task_id: str, delay: float) -> None:
    time.sleep(delay)
    with backend_from_url(url) as b:
        b.store(TaskStatus(id=task_id, state=TaskState.SUCCEEDED, result="from another process"))


def test_wait_returns_a_status_stored_by_another_process_without_polling(pg_url, backend):
    backend.store(TaskStatus(id="w", state=TaskState.RUNNING))
    reads = []
    real_get = backend.get
    backend.get = lambda task_id: (reads.append(1), real_get(task_id))[1]
    p = FORK.Process(target=_store_later, args=(pg_url, "w", 1.0))
    p.start()
    t0 = time.monotonic()
    got = backend.wait("w", 20.0)
    elapsed = time.monotonic() - t0
    p.join(10)
    assert got.state is TaskState.SUCCEEDED and got.result == "from another process"
    assert 0.5 < elapsed < 8.0                  # the store comes 1 s in; the wait allows 20
    assert len(reads) <= 4, f"{len(reads)} reads while waiting: polling"


def test_wait_never_misses_a_status_stored_while_it_starts_listening(pg_url, backend):
    other = backend_from_url(pg_url)
    try:
        for _ in range(30):
            task_id = uuid.uuid4().hex
            t = threading.Thread(target=other.store, args=(TaskStatus(id=task_id, state=TaskState.SUCCEEDED),))
            t.start()
            t0 = time.monotonic()
            got = backend.wait(task_id, 10.0)
            t.join()
            assert got is not None and got.state is TaskState.SUCCEEDED
            assert time.monotonic() - t0 < 5.0  # a missed notification would sleep the full 10 s
    finally:
        other.close()


# -- connections ----------------------------------------------------------------------------
def test_a_lost_connection_is_reestablished_by_the_next_call(postgres_url, broker):
    broker.publish(Message("a", Q, b"x"))
    [d] = broker.consume([Q], 1, 5.0)
    terminate(postgres_url, backend_pids(broker.store.durable) | backend_pids(broker.store.fast))
    broker.ack([d])                                   # reconnects by itself
    broker.publish(Message("b", Q, b"y"))
    assert [x.task_id for x in broker.consume([Q], 1, 5.0)] == ["b"]


def test_a_blocked_consumer_still_wakes_after_its_listener_connection_is_killed(postgres_url, pg_url, broker):
    broker.consume([Q], 1, 0.2)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
                     (f'LISTEN "{broker.channel}"',))
    got = []
    t = threading.Thread(target=lambda: got.extend(broker.consume([Q], 1, 20.0)))
    t.start()
    assert wait_until(lambda: broker._listener.listening, timeout=10)
    _publish(pg_url, b"after")
    t.join(20)
    assert [bytes(d.frame) for d in got] == [b"after"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_raises_connection_errors_after_bounded_retries():
    url = f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres"
    broker = broker_from_url(url, reconnect_timeout=0.5)
    backend = backend_from_url(url, reconnect_timeout=0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(BrokerConnectionError, match="gave up"):
            broker.publish(Message("t", Q, b"x"))
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(BackendConnectionError):
            backend.get("t")
    finally:
        broker.close()
        backend.close()


def test_driver_errors_are_translated(postgres_url, namespace, broker):
    broker.publish(Message("t", Q, b"x"))
    drop_schema(postgres_url, namespace)
    with pytest.raises(BrokerError, match="does not exist") as info:
        broker.stats(Q)
    assert not isinstance(info.value, psycopg.Error)


def test_a_clear_error_when_psycopg_is_missing(monkeypatch):
    from stem.brokers.postgres import PostgresBroker
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigurationError, match=r"PostgresBroker needs psycopg: pip install 'stem-queue\[postgres\]'"):
        PostgresBroker("postgresql://postgres@127.0.0.1/postgres")


def test_schema_comes_from_the_url_or_the_argument(postgres_url):
    assert broker_from_url(f"{postgres_url}?schema=abc").schema == "abc"
    b = broker_from_url(f"{postgres_url}?schema=abc&connect_timeout=3", schema="xyz")
    assert b.schema == "xyz" and "schema" not in b.store.conninfo and "connect_timeout=3" in b.store.conninfo
    assert broker_from_url(postgres_url).schema == "public"
    with pytest.raises(ConfigurationError, match="schema"):
        broker_from_url(f"{postgres_url}?schema=bad-name;drop")
    with pytest.raises(ConfigurationError, match="schema"):
        broker_from_url(postgres_url, schema="trailing_newline\n")


def test_a_forked_child_never_touches_the_parents_session(pg_url, broker):
    broker.publish(Message("parent-1", Q, b"p"))
    pids_before = backend_pids(broker.store.durable)
    out = FORK.Queue()

    def child(out=out):
        try:
            broker.publish(Message("child-1", Q, b"c"))     # the inherited instance, in the child
            broker.close()
            out.put("ok")
        except BaseException as e:
            out.put(repr(e))

    p = FORK.Process(target=child)
    p.start()
    assert out.get(timeout=20) == "ok"
    p.join(10)
    broker.publish(Message("parent-2", Q, b"p"))
    assert backend_pids(broker.store.durable) == pids_before, "the parent had to reconnect: the child broke its session"
    got = []
    while len(got) < 3:
        got += broker.consume([Q], 3, 5.0)
    assert sorted(d.task_id for d in got) == ["child-1", "parent-1", "parent-2"]


def test_a_forked_child_does_not_inherit_a_lock_held_by_another_thread(broker, backend):
    assert broker.consume([Q], 1, 0.3) == []     # an idle consume starts the broker's listener thread
    assert backend.wait("nothing", 0.3) is None  # and an idle wait the backend's

    def child():
        broker.publish(Message(uuid.uuid4().hex, Q, b"y"))
        got = broker.consume([Q], 1, 5.0)
        broker.ack(got)
        backend.store(TaskStatus(id="c", state=TaskState.SUCCEEDED))
        assert len(got) == 1 and backend.wait("c", 5.0).state is TaskState.SUCCEEDED

    assert fork_while_held(broker._cond, child) == "ok"
    assert fork_while_held(backend._waits.lock, child) == "ok"


# -- table size and claim speed -------------------------------------------------------------
def claim_ms(broker, rounds: int = 50) -> float:
    t0 = time.perf_counter()
    for _ in range(rounds):
        ds = broker.consume([Q], 20, 0)
        assert len(ds) == 20
        broker.ack(ds)
    return (time.perf_counter() - t0) / rounds * 1000


def _claim_stays_fast_next_to(postgres_url, namespace, broker, parked: int) -> None:
    # finished work leaves nothing behind: acked rows are deleted
    for i in range(0, 20000, 1000):
        broker.publish_many([Message(uuid.uuid4().hex, Q, b"x" * 100) for _ in range(1000)])
    while ds := broker.consume([Q], 500, 0):
        broker.ack(ds)
    broker.publish_many([Message(uuid.uuid4().hex, Q, b"x") for _ in range(1000)])
    baseline = claim_ms(broker)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute(f'SELECT count(*) FROM "{namespace}".stem_jobs').fetchone()[0] == 0
        # rows a claim must not wade through: far-future delayed rows (a worst case that, unlike
        # finished rows, really stays in the table), then the work to claim behind them
        conn.execute(f"""
            INSERT INTO "{namespace}".stem_jobs (queue, task_id, priority, state, available_at,
                                                 visibility_timeout, frame)
            SELECT %s, md5(g::text), 9, 1, extract(epoch FROM now()) + 86400, 30, '\\x00'
            FROM generate_series(1, %s) g""", (Q, parked))
        conn.execute(f'ANALYZE "{namespace}".stem_jobs')
    broker.publish_many([Message(uuid.uuid4().hex, Q, b"x") for _ in range(2000)])
    ms = claim_ms(broker)
    assert ms < 3 * baseline + 5, (f"claim + ack of 20 took {ms:.1f} ms next to {parked} parked rows, "
                                   f"{baseline:.1f} ms without")
    with psycopg.connect(postgres_url, autocommit=True, options="-c enable_bitmapscan=off -c enable_seqscan=off") \
            as conn:
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + broker._sql["claim"], {"queues": [Q], "n": 20, "max": 5, "vt": 30.0}).fetchall())
    assert "Index Scan using stem_jobs_ready" in plan, plan


def test_finished_rows_are_deleted_and_claims_stay_fast_next_to_many_parked_rows(postgres_url, namespace, broker):
    _claim_stays_fast_next_to(postgres_url, namespace, broker, 200_000)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_claims_stay_fast_next_to_a_million_parked_rows(postgres_url, namespace, broker):
    _claim_stays_fast_next_to(postgres_url, namespace, broker, 1_000_000)


def test_a_message_without_its_own_visibility_timeout_gets_the_consuming_brokers_default(pg_url, broker):
    consumer = broker_from_url(pg_url, default_visibility_timeout=0.5)
    try:
        broker.publish(Message("a", Q, b"x"))
        broker.publish(Message("b", Q, b"y", visibility_timeout=60))
        first = consumer.consume([Q], 2, 5.0)
        assert {d.task_id: d.visibility_timeout for d in first} == {"a": 0.5, "b": 60}
        [again] = consumer.consume([Q], 2, 10.0)
        assert (again.task_id, again.delivery_count) == ("a", 2)
    finally:
        consumer.close()


def test_results_and_acks_settle_in_one_transaction_when_broker_and_backend_share_the_database(
        pg_url, broker, backend, tmp_path):
    broker.publish_many([Message(f"t{i}", Q, b"x") for i in range(3)])
    ds = broker.consume([Q], 3, 5.0)
    statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, result=i) for i, d in enumerate(ds)]
    waiter = backend_from_url(pg_url)
    try:
        got = []
        t = threading.Thread(target=lambda: got.append(waiter.wait(ds[0].task_id, 20.0)))
        t.start()
        assert backend.store_many_and_ack(statuses, broker, ds) is True
        t.join(20)
        assert got and got[0].state is TaskState.SUCCEEDED          # notified like store_many
    finally:
        waiter.close()
    assert [s.result for s in backend.get_many([d.task_id for d in ds])] == [0, 1, 2]
    assert broker.stats(Q)[1:4] == (0, 0, 0)
    other = broker_from_url(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert backend.store_many_and_ack(statuses, other, []) is False       # not this database
    finally:
        other.close()


def test_rows_written_by_hand_with_garbage_or_empty_frames_are_delivered_with_their_neighbours(pg_url, namespace,
                                                                                             broker):
    broker.publish(Message("first", Q, b"x"))
    with psycopg.connect(pg_url.split("?")[0], autocommit=True) as conn:   # every column it can leave out, left out
        conn.execute(f'INSERT INTO "{namespace}".stem_jobs (queue, task_id, available_at, frame) '
                     "VALUES (%s, 'garbage', 0, %s), (%s, 'empty', 0, '')", (Q, b"\x00\xa7S\xff", Q))
    broker.publish(Message("last", Q, b"y"))
    got = broker.consume([Q], 10, 0)
    assert [(d.task_id, bytes(d.frame), d.delivery_count) for d in got] == [
        ("first", b"x", 1), ("garbage", b"\x00\xa7S\xff", 1), ("empty", b"", 1), ("last", b"y", 1)]
    assert {d.visibility_timeout for d in got} == {broker.default_visibility_timeout}
    for d in got[1:3]:
        broker.dead_letter(d, "decode-error")
    assert [(dl.task_id, dl.reason) for dl in broker.dead_letters(Q)] == [("garbage", "decode-error"),
                                                                           ("empty", "decode-error")]


def test_the_fused_store_and_ack_gives_each_status_its_own_expiry(pg_url, broker, namespace):
    import psycopg
    backend = backend_from_url(pg_url, result_expires=600)
    try:
        broker.publish_many([Message(f"t{i}", Q, b"x") for i in range(3)])
        ds = broker.consume([Q], 3, 5.0)
        statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, ttl=t) for d, t in zip(ds, (30, 7200, None))]
        assert backend.store_many_and_ack(statuses, broker, ds) is True
        backend.store_if_not_terminal([TaskStatus(id="running", state=TaskState.RUNNING, ttl=30)])
        with psycopg.connect(pg_url.split("?")[0], autocommit=True) as conn:
            left = dict(conn.execute(f'SELECT task_id, expires_at - extract(epoch FROM now()) '
                                     f'FROM "{namespace}".stem_results').fetchall())
        for task_id, ttl in zip([d.task_id for d in ds] + ["running"], (30, 7200, 600, 600)):
            assert ttl - 5 < left[task_id] <= ttl + 1, (task_id, left)
        assert broker.stats(Q)[1:4] == (0, 0, 0)
    finally:
        backend.close()


def test_closing_adapters_that_never_listened_leaves_no_descriptor_open(pg_url):
    """A broker and a backend made and closed without a blocking consume or a wait (their
    listener never started) leave none of their descriptors behind (the listener's wake-up
    pipe leaked two a time)."""
    import os
    from stem.brokers import from_url as broker_from_url
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        broker = broker_from_url(pg_url)
        broker.stats("q")
        broker.close()
        broker.close()                      # twice: closes nothing numbered anew since
        backend = backend_from_url(pg_url)
        backend.get("some-id")
        backend.close()
    assert len(os.listdir("/proc/self/fd")) - before <= 2     # the driver may keep one socket to reuse


def test_a_single_publish_writes_the_row_publish_many_writes(broker, pg_url, postgres_url, namespace, monkeypatch):
    """``publish`` of one unlimited message to a registered queue is ``publish_one`` (scalar
    parameters); its rows match ``publish_many``'s, ready and delayed alike."""
    broker.publish_many([Message("seed", Q, b"s")])          # registers the queue
    sent = []
    real = broker._pg.run
    monkeypatch.setattr(broker._pg, "run", lambda fn: (sent.append(fn), real(fn))[1])
    now = time.time()
    for tag, nb, vt, prio in (("ready", None, None, 3), ("later", now + 60, 12.5, 0)):
        broker.publish(Message(f"one-{tag}", Q, b"frame-" + tag.encode(), prio, nb, vt))
        broker.publish_many([Message(f"many-{tag}", Q, b"frame-" + tag.encode(), prio, nb, vt)])
    assert len(sent) == 4
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            f'SELECT task_id, queue, priority, state, round(available_at)::bigint, '
            f'visibility_timeout, frame FROM "{namespace}".stem_jobs WHERE task_id LIKE %s', ("%-%",))}
    for tag in ("ready", "later"):
        assert rows[f"one-{tag}"] == rows[f"many-{tag}"]
    assert rows["one-later"][2] == 1 and rows["one-ready"][2] == 0     # delayed / ready

