"""Creating a group cannot leave one waiting forever: its record and members in one transaction
where the store allows it (``ResultBackend.group_publish``: one SQLite file, one Postgres
database, one Redis server), else created unsealed, published, then sealed, with the workers'
sweep ending a group left unsealed FAILED ``creation-interrupted``.  Both under a kill -9 of
the producer (``tests/apps/dying_producer.py``)."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid

import pytest

from stem import TaskState
from stem.canvas import Signature, chord, group

from tests.support import wait_for

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once


def atomic_here(store) -> bool:
    """Whether ``group_publish`` creates in one transaction on this store (a Redis Cluster
    keeps the record and the queue in different slots; the memory adapters need none)."""
    if store.kind in ("sqlite", "postgres"):
        return True
    return store.kind == "redis" and not store.backend()._store.cluster


def test_a_group_is_created_sealed_with_its_members_in_one_step_or_not_at_all(store):
    broker, backend = store.broker(), store.backend()
    g = "g-" + uuid.uuid4().hex[:12]
    ids, frames = [f"{g}.0", f"{g}.1"], [b"frame-0", b"frame-1"]

    def publish():
        return backend.group_publish(g, 2, b"d", seal_by=time.time() + 60, ttl=60.0, held=True, broker=broker,
                                     queue="atomic", task_ids=ids, frames=frames)

    created = publish()
    if not atomic_here(store):
        assert created is None                           # nothing done: the caller takes the other way
        assert backend.group_get(g) is None and broker.stats("atomic").ready == 0
        return
    assert created is True
    record = backend.group_get(g)
    assert (record.sealed, record.expected, record.finished, record.held) == (True, 2, 0, True)
    assert not record.complete
    deliveries = broker.consume(["atomic"], 10, 5.0)
    assert sorted((d.task_id, bytes(d.frame)) for d in deliveries) == list(zip(ids, frames))
    assert publish() is False                            # it exists: nothing is published again
    assert broker.stats("atomic").ready == 0
    broker.ack(deliveries)


def test_a_redis_group_too_large_for_one_transaction_is_created_in_steps(store, monkeypatch):
    """An EXEC holds the whole server while it runs: past ``ATOMIC_MAX`` members, not one."""
    if store.kind != "redis" or not atomic_here(store):
        pytest.skip("a limit of the Redis transaction")
    import stem.backends.redis as redis_backend
    monkeypatch.setattr(redis_backend, "ATOMIC_MAX", 2)
    broker, backend = store.broker(), store.backend()
    g = "g-" + uuid.uuid4().hex[:12]
    assert backend.group_publish(g, 3, b"d", seal_by=time.time() + 60, ttl=60.0, held=False, broker=broker,
                                 queue="atomic", task_ids=[f"{g}.{i}" for i in range(3)],
                                 frames=[b"f"] * 3) is None
    assert backend.group_get(g) is None and broker.stats("atomic").ready == 0


def test_a_group_publish_across_two_stores_is_refused_without_a_trace(store, tmp_path):
    from stem.brokers import SqliteBroker
    other = SqliteBroker(str(tmp_path / "other.db"))
    try:
        g = "g-" + uuid.uuid4().hex[:12]
        assert store.backend().group_publish(g, 1, b"d", seal_by=time.time() + 60, ttl=60.0, held=False,
                                             broker=other, queue="atomic", task_ids=[f"{g}.0"], frames=[b"f"]) is None
        assert store.backend().group_get(g) is None and other.stats("atomic").ready == 0
    finally:
        other.close()


def test_a_chord_of_one_task_never_leaves_its_group_unsealed(store, fleet, ledger):
    stem = store.producer()
    seals = []
    real = stem.backend.group_seal
    stem.backend.group_seal = lambda group_id: seals.append(group_id) or real(group_id)
    h = stem.apply(chord(group(Signature("e2e.add", {"a": i, "b": 1}) for i in range(5)), Signature("e2e.collect")))
    record = stem.backend.group_get(h.id)
    assert record.sealed and record.expected == 5
    assert seals == ([] if atomic_here(store) else [h.id])
    if store.in_process_only:
        fleet.in_process(store, concurrency=2, isolation="inline")
    else:
        fleet.process(store)
    assert h.get(60) == [1, 2, 3, 4, 5]


def _dying_producer(fleet, store, ledger, canvas_id: str, where: str, members: int):
    config = {**store.config(), "canvas_id": canvas_id, "ledger": str(ledger), "members": members, "where": where,
              "creation_timeout": 1.0}
    proc = fleet.start([sys.executable, "-m", "tests.apps.dying_producer", json.dumps(config)], label="producer")
    proc.expect_exit = True                              # it kills itself: that is the test
    proc.popen.wait(60)
    assert proc.returncode == -9, proc.output()
    assert proc.lines("DYING") and not proc.lines("SURVIVED"), proc.output()
    return proc


@pytest.mark.timeout(120)
def test_a_producer_killed_inside_the_creating_transaction_leaves_nothing_and_the_same_id_starts_again(
        process_store, fleet, ledger):
    if not atomic_here(process_store):
        pytest.skip("no transaction holds a group and its members on a Redis Cluster: the sweep covers it "
                    "(the test below)")
    n = 50
    canvas_id = "c-" + uuid.uuid4().hex[:12]
    _dying_producer(fleet, process_store, ledger, canvas_id, "in_transaction", n)
    backend, broker = process_store.backend(), process_store.broker()
    assert backend.group_get(canvas_id) is None          # no record ...
    assert broker.stats("default").ready == 0            # ... and no member
    # nothing was created, so the same id starts the chord, once
    stem = process_store.producer()
    members = group(Signature("e2e.effect", {"n": i, "ledger": str(ledger)}) for i in range(n))
    h = stem.apply(chord(members, Signature("e2e.collect", {"ledger": str(ledger)})), canvas_id=canvas_id)
    again = stem.apply(chord(members, Signature("e2e.collect", {"ledger": str(ledger)})), canvas_id=canvas_id)
    assert again.id == h.id and broker.stats("default").ready == n
    fleet.process(process_store)
    assert h.get(90) == list(range(n))
    ran = ledger.ran()
    assert ran[canvas_id] == 1 and all(ran[f"{canvas_id}.{i}"] == 1 for i in range(n))


@pytest.mark.timeout(150)
def test_a_producer_killed_between_publishing_and_sealing_ends_the_chord_creation_interrupted(
        process_store, fleet, ledger):
    """The members are not one task, so the record is created unsealed and sealed after them
    on every store: the kill lands between the two, and a worker's sweep ends the chord."""
    fleet.process(process_store)                         # runs the members, sweeps once a heartbeat
    stem = process_store.producer()
    canvas_id = "c-" + uuid.uuid4().hex[:12]
    woken: list = []
    waiter = threading.Thread(target=lambda: woken.append(stem.wait_for_task(canvas_id, 100)), daemon=True)
    waiter.start()                                       # waiting before the chord even exists
    _dying_producer(fleet, process_store, ledger, canvas_id, "unsealed", 4)
    waiter.join(110)
    assert woken, "the waiter was not woken"
    status = woken[0]
    assert status.state is TaskState.FAILED and status.reason == "creation-interrupted", status
    backend = process_store.backend()
    record = backend.group_get(canvas_id)
    assert record is not None and record.interrupted and not record.sealed
    fleet.wait_for(lambda: backend.group_get(canvas_id).finished == 5, 60, "the published members to be counted")
    ran = ledger.ran()
    assert all(ran[f"{canvas_id}.{i}"] == 1 for i in range(4))
    assert canvas_id not in ran                          # the callback never fired
    assert stem.get_status(canvas_id).reason == "creation-interrupted"
