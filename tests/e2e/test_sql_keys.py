"""Keyed publish on the SQL brokers with real worker processes and a real server restart.

The key lives in the same database as its message, so whatever happens to the worker (kill -9)
or the server (an immediate shutdown, a crash for Postgres), the key is held exactly while the
task has a message, and released by the settle that ends it."""

from __future__ import annotations

import threading
import uuid

import pytest

from stem import Stem
from stem.backends.memory import InMemoryResultBackend
from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Keyed, Message
from stem.brokers.memory import InMemoryBroker
from tests.apps.e2e import registry
from tests.support import wait_for

from .conftest import _store

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once

SQL_KINDS = [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=SQL_KINDS)
def sql_store(request, fleet):
    yield from _store(request, fleet)


def framed(name: str, args: dict) -> tuple[str, bytes]:
    """(task id, frame) of a task as the producer frames it, unsigned (the fleet's workers
    run without a signer)."""
    with InMemoryBroker() as scratch:
        task_id = Stem(scratch, InMemoryResultBackend(), registry).enqueue(name, args)
        [d] = scratch.consume(["default"], 1, 1.0)
        return task_id, bytes(d.frame)


def duplicate(key: str) -> Keyed:
    _, frame = framed("e2e.add", {"a": 1, "b": 2})
    return Keyed(Message(uuid.uuid4().hex, "default", frame), key, 600.0)


@pytest.mark.timeout(120)
def test_a_key_held_by_a_task_whose_worker_was_killed_stays_held_through_redelivery_until_it_ends(
        sql_store, fleet, ledger, tmp_path):
    hold = str(tmp_path / "release")
    tid, frame = framed("e2e.effect", {"n": 1, "ledger": str(ledger), "hold": hold})
    broker = sql_store.broker()
    assert broker.publish_keyed([Keyed(Message(tid, "default", frame), "report:1", 600.0)]) == [None]

    victim = fleet.process(sql_store, concurrency=1, visibility_timeout=1.0, label="victim")
    fleet.wait_for(lambda: ledger.ran()[tid] == 1, 30, "the keyed task to start")
    victim.kill()
    assert broker.publish_keyed([duplicate("report:1")]) == [tid]

    fleet.process(sql_store, concurrency=1, visibility_timeout=1.0, label="rescuer")
    fleet.wait_for(lambda: ledger.ran()[tid] == 2, 30, "the keyed task to be redelivered and run again")
    assert broker.stats("default").in_flight == 1
    assert broker.publish_keyed([duplicate("report:1")]) == [tid]      # redelivered: still held
    assert broker.key_owner("default", "report:1") == tid

    open(hold, "w").close()
    fleet.wait_for(lambda: broker.key_owner("default", "report:1") is None, 30, "the ended task's key released")
    status = sql_store.backend().get(tid)
    assert status is not None and status.succeeded
    after = duplicate("report:1")
    assert broker.publish_keyed([after]) == [None]
    assert broker.key_owner("default", "report:1") == after.message.task_id
    assert set(ledger.ran()) == {tid}


def _orphans(url: str) -> tuple[list, list]:
    """(keys without a live message of their owner, keyed messages whose key another holds or none)."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        keys = conn.execute(
            "SELECT k.key FROM stem_keys k WHERE k.expires_at > extract(epoch FROM now()) AND NOT EXISTS "
            "(SELECT 1 FROM stem_jobs j WHERE j.queue = k.queue AND j.key = k.key AND j.task_id = k.owner)"
        ).fetchall()
        jobs = conn.execute(
            "SELECT j.key FROM stem_jobs j WHERE j.key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM stem_keys k "
            "WHERE k.queue = j.queue AND k.key = j.key AND k.owner = j.task_id)").fetchall()
    return keys, jobs


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_keys_and_messages_stay_consistent_across_a_postgres_restart(private_postgres):
    """Keys claimed, released by acks and dead letters, and claimed again while the server stops
    (immediate: a crash, so unflushed fast commits are lost) and starts: afterwards every live key
    has its message and every keyed message its key, and a duplicate of each is refused."""
    url = private_postgres.url
    broker = broker_from_url(url, reconnect_timeout=30)
    q = "keys-restart"
    try:
        first = [Keyed(Message(f"a{i}", q, b"x", visibility_timeout=2.0), f"k{i}", 600.0) for i in range(300)]
        assert broker.publish_keyed(first) == [None] * 300
        leased = broker.consume([q], 200, 5.0)
        assert len(leased) == 200
        broker.ack(leased[:100])
        for d in leased[100:110]:
            broker.dead_letter(d, "poison")

        answers: dict[str, str | None] = {}
        stop = threading.Event()

        def publisher():      # through the restart: publish_keyed reconnects by itself
            n = 0
            while not stop.is_set():
                batch = [Keyed(Message(f"b{n + j}", q, b"y", visibility_timeout=2.0), f"k{(n + j) % 400}", 600.0)
                         for j in range(20)]
                for item, answer in zip(batch, broker.publish_keyed(batch)):
                    answers[item.message.task_id] = answer
                n += 20

        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            wait_for(lambda: len(answers) >= 100, 30, "the publisher to run")
            private_postgres.stop("immediate")
            private_postgres.start()
            before = len(answers)
            wait_for(lambda: len(answers) >= before + 200, 60, "the publisher to go on after the restart")
        finally:
            stop.set()
            thread.join(60)
        assert not thread.is_alive()
        assert _orphans(url) == ([], [])

        # every key now held refuses a newcomer and names a holder that has its message
        probe = [Keyed(Message(uuid.uuid4().hex, q, b"z"), f"k{i}", 600.0) for i in range(400)]
        holders = [broker.key_owner(q, f"k{i}") for i in range(400)]
        got = broker.publish_keyed(probe)
        for i, (holder, answer) in enumerate(zip(holders, got)):
            assert answer == holder or (holder is None and answer is None), (i, holder, answer)
        assert _orphans(url) == ([], [])

        # drain: every ack releases its key, nothing is left behind
        while True:
            batch = broker.consume([q], 100, 3.0)
            if not batch:
                break
            broker.ack(batch)
        assert broker.stats(q)[1:4] == (0, 0, 0)
        assert all(broker.key_owner(q, f"k{i}") is None for i in range(400))
        assert broker.replay(q) == 10                  # the dead letters' keys are free: all ten move
        broker.ack(broker.consume([q], 20, 3.0))
        assert all(broker.key_owner(q, f"k{i}") is None for i in range(400))
        assert _orphans(url) == ([], [])
    finally:
        broker.close()

