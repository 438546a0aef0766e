"""SQLite broker and backend beyond the contract suite: several processes on one file, crashes,
migrations, bad files, URLs, fork safety.

The multi-process helpers here take a broker URL, so ``tests/test_postgres_broker.py`` reuses them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
import uuid

import pytest

from stem.backends import from_url as backend_from_url
from stem.backends.sqlite import SqliteResultBackend
from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Message
from stem.brokers.sqlite import SqliteBroker
from stem.errors import BrokerConnectionError, BrokerError, ConfigurationError, StemError
from stem.results import TaskState, TaskStatus
from .support import wait_until

FORK = multiprocessing.get_context("fork")
Q = "mp"




# -- multi-process helpers (shared with the Postgres tests) ---------------------------------
def _consumer(url: str, kwargs: dict, stop, out, batch: int) -> None:
    broker = broker_from_url(url, **kwargs)
    got: list[tuple[str, int]] = []
    try:
        while not stop.is_set():
            ds = broker.consume([Q], batch, 0.2)
            if ds:
                got.extend((d.task_id, d.delivery_count) for d in ds)
                broker.ack(ds)
    finally:
        out.put((os.getpid(), got))
        broker.close()


def _hoarder(url: str, kwargs: dict, n: int, leased, out) -> None:
    """Leases ``n`` messages, reports them, then hangs until killed."""
    broker = broker_from_url(url, **kwargs)
    held = []
    while len(held) < n:
        held += broker.consume([Q], n - len(held), 1.0)
    out.put(("hoarder", [(d.task_id, d.delivery_count) for d in held]))
    leased.set()
    time.sleep(600)


def start_consumers(url: str, kwargs: dict, count: int, batch: int = 20):
    stop, out = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=_consumer, args=(url, kwargs, stop, out, batch), daemon=True)
             for _ in range(count)]
    for p in procs:
        p.start()
    return procs, stop, out


def drained(broker) -> bool:
    s = broker.stats(Q)
    return s.ready == 0 and s.in_flight == 0 and s.delayed == 0


def stop_consumers(procs, stop, out) -> dict[int, list[tuple[str, int]]]:
    stop.set()
    results = dict(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0, f"consumer {p.pid} exited with {p.exitcode}"
    return results


def check_each_delivered_once(url: str, kwargs: dict, broker, n: int = 5000, consumers: int = 4) -> None:
    ids = [uuid.uuid4().hex for _ in range(n)]
    procs, stop, out = start_consumers(url, kwargs, consumers)
    try:
        for i in range(0, n, 250):
            broker.publish_many([Message(t, Q, t.encode(), visibility_timeout=60) for t in ids[i:i + 250]])
        assert wait_until(lambda: drained(broker), timeout=45), broker.stats(Q)
    finally:
        results = stop_consumers(procs, stop, out)
    delivered = [t for got in results.values() for t, _ in got]
    assert len(delivered) == n, f"{len(delivered)} deliveries for {n} messages"
    assert set(delivered) == set(ids)
    assert sum(1 for got in results.values() if got) >= 2, "the work was not shared between processes"


def check_killed_consumers_leases_are_redelivered(url: str, kwargs: dict, broker, n: int = 600,
                                                  vt: float = 2.0) -> None:
    ids = [uuid.uuid4().hex for _ in range(n)]
    broker.publish_many([Message(t, Q, b"x", visibility_timeout=vt) for t in ids])
    leased, hoard_out = FORK.Event(), FORK.Queue()
    hoarder = FORK.Process(target=_hoarder, args=(url, kwargs, 50, leased, hoard_out), daemon=True)
    hoarder.start()
    # the hoarder leases first: survivors started with it could drain the queue before it
    # got its n, and it would wait for them forever
    assert leased.wait(20), "the hoarder never leased its messages"
    _, held = hoard_out.get(timeout=10)
    procs, stop, out = start_consumers(url, kwargs, 2)
    try:
        os.kill(hoarder.pid, signal.SIGKILL)       # the survivors are starting on the rest
        hoarder.join(10)
        assert wait_until(lambda: drained(broker), timeout=40), broker.stats(Q)
    finally:
        results = stop_consumers(procs, stop, out)
    seen: dict[str, int] = {}
    for got in results.values():
        for task_id, count in got:
            assert task_id not in seen, f"{task_id} delivered twice to the survivors"
            seen[task_id] = count
    assert set(seen) == set(ids), f"{len(set(ids) - set(seen))} messages lost"
    for task_id, _ in held:
        assert seen[task_id] == 2, "a leased message of the killed consumer came back with the wrong count"
    assert broker.stats(Q).dead == 0


# -- SQLite ---------------------------------------------------------------------------------
@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'stem.db'}"


def test_several_processes_share_one_file_and_each_message_is_delivered_once(db_url):
    with broker_from_url(db_url) as broker:
        check_each_delivered_once(db_url, {}, broker)


def test_leases_of_a_consumer_killed_with_sigkill_go_to_the_survivors_after_the_visibility_timeout(db_url):
    with broker_from_url(db_url) as broker:
        check_killed_consumers_leases_are_redelivered(db_url, {}, broker)


def _publish_from_child(url: str, frame: bytes) -> None:
    with broker_from_url(url) as b:
        b.publish(Message(uuid.uuid4().hex, Q, frame))


def test_a_blocked_consumer_sees_a_message_published_by_another_process_promptly(db_url):
    broker = broker_from_url(db_url)
    try:
        broker.consume([Q], 1, 0)
        got = []
        t = threading.Thread(target=lambda: got.extend(broker.consume([Q], 1, 20.0)))
        t.start()
        time.sleep(0.3)  # let it reach its idle backoff; the bound below is what matters
        p = FORK.Process(target=_publish_from_child, args=(db_url, b"hello"))
        t0 = time.monotonic()
        p.start()
        t.join(20)
        p.join(10)
        assert [bytes(d.frame) for d in got] == [b"hello"]
        assert time.monotonic() - t0 < 5.0      # far below the 20 s it would sleep unwoken
    finally:
        broker.close()


def test_migrating_twice_is_idempotent_and_keeps_data(tmp_path):
    path = str(tmp_path / "m.db")
    broker = SqliteBroker(path)
    try:
        assert broker.migrate() == broker.migrate()
        broker.publish(Message("t1", Q, b"keep"))
        backend = SqliteResultBackend(path)
        assert backend.migrate() == broker.migrate()
        backend.close()
        with sqlite3.connect(path) as raw:
            versions = raw.execute("SELECT version FROM stem_schema_version").fetchall()
        raw.close()
        from stem.stores.sqlite_schema import SCHEMA_VERSION
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        assert broker.stats(Q).ready == 1
    finally:
        broker.close()


def _migrate(url: str, out) -> None:
    try:
        with broker_from_url(url) as b:
            out.put(b.migrate())
    except BaseException as e:       # report, do not hang the parent
        out.put(repr(e))


def test_concurrent_migrations_from_several_processes_agree(db_url):
    out = FORK.Queue()
    procs = [FORK.Process(target=_migrate, args=(db_url, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    from stem.stores.sqlite_schema import SCHEMA_VERSION
    assert results == [SCHEMA_VERSION] * 4


def test_a_file_that_is_not_a_database_raises_a_stem_error(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    broker = SqliteBroker(str(path))
    try:
        with pytest.raises(BrokerError, match="garbage.db"):
            broker.publish(Message("t", Q, b"x"))
    finally:
        broker.close()
    backend = SqliteResultBackend(str(path))
    try:
        with pytest.raises(StemError):
            backend.get("t")
    finally:
        backend.close()


def test_a_file_locked_by_another_writer_raises_broker_connection_error_after_the_busy_timeout(tmp_path):
    path = str(tmp_path / "locked.db")
    broker = SqliteBroker(path, busy_timeout=0.2)
    broker.migrate()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        t0 = time.monotonic()
        with pytest.raises(BrokerConnectionError, match="locked"):
            broker.publish(Message("t", Q, b"x"))
        assert time.monotonic() - t0 < 5.0
        holder.execute("ROLLBACK")
        broker.publish(Message("t", Q, b"x"))        # usable again once the lock is gone
        assert broker.stats(Q).ready == 1
    finally:
        holder.close()
        broker.close()


def test_an_unwritable_path_raises_a_stem_error(tmp_path):
    broker = SqliteBroker(str(tmp_path / "no" / "such" / "dir" / "x.db"))
    try:
        with pytest.raises(BrokerConnectionError):
            broker.ping()
    finally:
        broker.close()


def test_url_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = broker_from_url("sqlite:///relative.db?busy_timeout=2.5")
    try:
        rel.ping()
        assert (tmp_path / "relative.db").exists()
        assert rel.store.busy_timeout == 2.5
    finally:
        rel.close()
    absolute = broker_from_url(f"sqlite:///{tmp_path / 'abs.db'}")
    absolute.ping()
    absolute.close()
    assert (tmp_path / "abs.db").exists()
    memory = broker_from_url("sqlite://")
    memory.publish(Message("m", Q, b"x"))
    assert memory.stats(Q).ready == 1
    memory.close()
    assert isinstance(backend_from_url("sqlite://"), SqliteResultBackend)
    with pytest.raises(ConfigurationError):
        broker_from_url("sqlite://host/x.db")
    with pytest.raises(ConfigurationError, match="unknown option"):
        broker_from_url("sqlite:///x.db?journal=off")


def _use_in_child(url: str, out) -> None:
    try:
        with broker_from_url(url) as b:
            b.publish(Message(uuid.uuid4().hex, Q, b"child"))
        out.put("ok")
    except BaseException as e:
        out.put(repr(e))


def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(db_url):
    broker = broker_from_url(db_url)
    try:
        broker.publish(Message("parent-1", Q, b"p"))     # the parent's connection is open
        out = FORK.Queue()

        def child(out=out):
            try:
                broker.publish(Message("child-1", Q, b"c"))   # inherited instance, used in the child
                broker.close()
                out.put("ok")
            except BaseException as e:
                out.put(repr(e))

        p = FORK.Process(target=child)
        p.start()
        assert out.get(timeout=20) == "ok"
        p.join(10)
        broker.publish(Message("parent-2", Q, b"p"))
        got = []
        while len(got) < 3:
            got += broker.consume([Q], 3, 5.0)
        assert sorted(d.task_id for d in got) == ["child-1", "parent-1", "parent-2"]
    finally:
        broker.close()


def test_an_in_memory_database_refuses_to_be_used_in_a_forked_child():
    broker = broker_from_url("sqlite://")
    try:
        broker.publish(Message("m", Q, b"x"))
        out = FORK.Queue()

        def child(out=out):
            try:
                broker.stats(Q)
                out.put("used")
            except ConfigurationError as e:
                out.put(str(e))

        p = FORK.Process(target=child)
        p.start()
        assert "one process" in out.get(timeout=20)
        p.join(10)
        assert broker.stats(Q).ready == 1
    finally:
        broker.close()


def test_broker_and_backend_share_one_file(db_url):
    broker, backend = broker_from_url(db_url), backend_from_url(db_url)
    try:
        broker.publish(Message("t", Q, b"x"))
        backend.store(TaskStatus(id="t", state=TaskState.SUCCEEDED, result=1))
        assert broker.stats(Q).ready == 1
        assert backend.get("t").result == 1
    finally:
        broker.close()
        backend.close()


def _store_later(url: str, task_id: str, delay: float) -> None:
    time.sleep(delay)
    with backend_from_url(url) as b:
        b.store(TaskStatus(id=task_id, state=TaskState.SUCCEEDED, result="from child"))


def test_wait_returns_a_status_stored_by_another_process(db_url):
    backend = backend_from_url(db_url)
    try:
        backend.store(TaskStatus(id="w", state=TaskState.RUNNING))
        p = FORK.Process(target=_store_later, args=(db_url, "w", 0.3))
        t0 = time.monotonic()
        p.start()
        got = backend.wait("w", 20.0)
        p.join(10)
        assert got.state is TaskState.SUCCEEDED and got.result == "from child"
        assert time.monotonic() - t0 < 5.0
    finally:
        backend.close()


def test_connections_of_finished_threads_are_closed(db_url):
    broker = broker_from_url(db_url)
    try:
        threads = [threading.Thread(target=broker.stats, args=(Q,)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wait_until(lambda: broker.store.connections() <= 1, timeout=5)
    finally:
        broker.close()


def test_a_message_without_its_own_visibility_timeout_gets_the_consuming_brokers_default(db_url):
    producer = broker_from_url(db_url)                                   # default 30 s
    consumer = broker_from_url(db_url, default_visibility_timeout=0.5)
    try:
        producer.publish(Message("a", Q, b"x"))
        producer.publish(Message("b", Q, b"y", visibility_timeout=60))
        first = consumer.consume([Q], 2, 5.0)
        assert {d.task_id: d.visibility_timeout for d in first} == {"a": 0.5, "b": 60}
        [again] = consumer.consume([Q], 2, 10.0)
        assert (again.task_id, again.delivery_count) == ("a", 2)
    finally:
        producer.close()
        consumer.close()


def fork_while_held(lock, child_fn) -> str:
    """Run ``child_fn`` in a forked child while another thread of the parent holds ``lock``."""
    held, release, out = threading.Event(), threading.Event(), FORK.Queue()

    def hold():
        with lock:
            held.set()
            release.wait(30)

    def child():
        try:
            child_fn()
            out.put("ok")
        except BaseException as e:
            out.put(repr(e))

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        p = FORK.Process(target=child)
        p.start()
        try:
            return out.get(timeout=20)
        finally:
            release.set()
            p.join(10)
            if p.is_alive():
                p.kill()
    finally:
        release.set()
        t.join()


def test_a_forked_child_does_not_inherit_a_lock_held_by_another_thread(db_url):
    broker = broker_from_url(db_url)
    try:
        broker.publish(Message("before", Q, b"x"))

        def child():
            broker.publish(Message("child", Q, b"y"))
            assert len(broker.consume([Q], 2, 5.0)) == 2

        assert fork_while_held(broker.store.wake.cond, child) == "ok"
    finally:
        broker.close()


def test_results_and_acks_settle_in_one_transaction_when_broker_and_backend_share_the_file(db_url, tmp_path):
    broker, backend = broker_from_url(db_url), backend_from_url(db_url)
    other = backend_from_url(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        broker.publish_many([Message(f"t{i}", Q, b"x") for i in range(3)])
        ds = broker.consume([Q], 3, 5.0)
        statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, result=i) for i, d in enumerate(ds)]
        assert other.store_many_and_ack(statuses, broker, ds) is False          # another file
        assert broker.stats(Q).in_flight == 3 and other.get("t0") is None
        assert backend.store_many_and_ack(statuses, broker, ds) is True
        assert [s.result for s in backend.get_many([d.task_id for d in ds])] == [0, 1, 2]
        assert broker.stats(Q)[1:4] == (0, 0, 0)
    finally:
        broker.close()
        backend.close()
        other.close()


# -- rows the worker cannot read -------------------------------------------------------------
def _insert_by_hand(path: str, queue: str, rows) -> None:
    """(task id, frame) rows as a hand-written INSERT (or another program) may leave them: SQLite
    keeps any type, and every column that has a default is left out."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.executemany("INSERT INTO stem_messages (queue, task_id, available_at, frame) VALUES (?, ?, 0, ?)",
                             [(queue, *row) for row in rows])
    finally:
        conn.close()


def test_rows_of_any_type_written_by_hand_are_delivered_as_text_ids_and_byte_frames(db_url, tmp_path):
    broker = broker_from_url(db_url)
    try:
        broker.publish(Message("first", Q, b"x"))
        _insert_by_hand(str(tmp_path / "stem.db"), Q, [("text-frame", "a text frame"), (b"\xff\xfe", b"blob id"),
                                                   (42, 4.5)])
        broker.publish(Message("last", Q, b"y"))
        got = broker.consume([Q], 10, 0)
        assert [(d.task_id, d.frame) for d in got] == [
            ("first", b"x"), ("text-frame", b"a text frame"), ("\ufffd\ufffd", b"blob id"), ("42", b"4.5"),
            ("last", b"y")]
        assert all(type(d.frame) is bytes and type(d.task_id) is str for d in got)
    finally:
        broker.close()


def test_a_worker_dead_letters_a_text_frame_written_by_hand_and_runs_the_tasks_around_it(db_url, tmp_path):
    """Before: the str frame raised TypeError in the worker, which lost the rest of the batch."""
    from stem import ShutdownMode, Stem, TaskRegistry, Worker, WorkerLifecycleConfig
    registry = TaskRegistry()
    registry.task("add")(lambda ctx, a, b: a + b)
    broker, backend = broker_from_url(db_url), backend_from_url(db_url)
    stem = Stem(broker, backend, registry)
    ids = [stem.enqueue("add", {"a": i, "b": 1}) for i in range(2)]
    _insert_by_hand(str(tmp_path / "stem.db"), "default", [("by-hand", "not a frame")])
    ids += [stem.enqueue("add", {"a": i, "b": 1}) for i in range(2, 4)]
    worker = Worker(broker, backend, registry, concurrency=2, isolation="inline",
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5,
                                                    force_shutdown_after=5)).run_in_background()
    try:
        assert [stem.wait_for_task(i, timeout=20).result for i in ids] == [1, 2, 3, 4]
        status = stem.wait_for_task("by-hand", timeout=20)
        assert (status.state, status.reason) == (TaskState.DEAD, "decode-error")
        assert wait_until(lambda: [d.reason for d in broker.dead_letters("default")] == ["decode-error"])
    finally:
        worker.shutdown(ShutdownMode.HARD, timeout=15)
        broker.close()
        backend.close()


def test_the_fused_store_and_ack_gives_each_status_its_own_expiry(db_url, tmp_path):
    broker, backend = broker_from_url(db_url), backend_from_url(db_url, result_expires=600)
    try:
        broker.publish_many([Message(f"t{i}", Q, b"x") for i in range(3)])
        ds = broker.consume([Q], 3, 5.0)
        ttls = [30.0, 7200.0, None]
        statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, ttl=t) for d, t in zip(ds, ttls)]
        now = time.time()
        assert backend.store_many_and_ack(statuses, broker, ds) is True
        conn = sqlite3.connect(str(tmp_path / "stem.db"))
        try:
            left = dict(conn.execute("SELECT task_id, expires_at - ? FROM stem_results", (now,)).fetchall())
        finally:
            conn.close()
        for d, ttl in zip(ds, (30.0, 7200.0, 600.0)):
            assert ttl - 5 < left[d.task_id] <= ttl + 1, (d.task_id, left)
        assert broker.stats(Q)[1:4] == (0, 0, 0)
    finally:
        broker.close()
        backend.close()
