"""Keyed publish on every broker: the "Keys" part of ``stem/brokers/base.py``.

An adapter module may give its brokers two more attributes, used here when present:

* ``contract_recipe``: ``(factory, args, kwargs)`` that builds the same broker in another
  process (the process race); absent for brokers one process cannot share;
* ``contract_break_publish(queue)``: makes the next publishes to ``queue`` fail *after*
  the key would be claimed (a type clash, a failing trigger), to show a failed publish
  leaves no key behind.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid

import pytest

from stem.brokers.base import Keyed, Message
from stem.errors import ConfigurationError, StemError

from ..support import wait_for

Q = "keyed"


def keyed(key: str = "k", *, queue: str = Q, task_id: str | None = None, ttl: float = 60.0,
          linger: float = 0.0, not_before=None, vt=None, frame: bytes = b"frame") -> Keyed:
    return Keyed(Message(task_id or uuid.uuid4().hex, queue, frame, 0, not_before, vt), key, ttl, linger)


def one(broker, queue=Q, timeout=5.0):
    got = broker.consume([queue], 1, timeout)
    assert len(got) == 1, f"expected one delivery within {timeout}s, got {got}"
    return got[0]


def ready(broker, queue=Q) -> int:
    s = broker.stats(queue)
    return s.ready + s.delayed + s.in_flight


def test_a_free_key_publishes_and_its_owner_is_the_task(broker):
    item = keyed("report:1")
    assert broker.publish_keyed([item]) == [None]
    assert broker.key_owner(Q, "report:1") == item.message.task_id
    d = one(broker)
    assert (d.task_id, d.key, bytes(d.frame)) == (item.message.task_id, "report:1", b"frame")


def test_a_held_key_refuses_the_second_publish_and_names_the_holder(broker):
    first, second = keyed(), keyed()
    assert broker.publish_keyed([first]) == [None]
    assert broker.publish_keyed([second]) == [first.message.task_id]
    assert ready(broker) == 1
    assert one(broker).task_id == first.message.task_id
    assert broker.consume([Q], 1, 0.2) == []


def test_a_batch_resolves_duplicates_inside_it_and_against_held_keys(broker):
    held = keyed("a")
    broker.publish_keyed([held])
    batch = [keyed("a"), keyed("b"), keyed("c"), keyed("b"), keyed("c"), keyed("d")]
    out = broker.publish_keyed(batch)
    ids = [k.message.task_id for k in batch]
    assert out == [held.message.task_id, None, None, ids[1], ids[2], None]
    assert ready(broker) == 4
    got = {d.task_id for d in broker.consume([Q], 10, 2.0)}
    assert got == {held.message.task_id, ids[1], ids[2], ids[5]}


def test_the_owner_republishing_gets_its_own_id_and_nothing_twice(broker):
    item = keyed()
    assert broker.publish_keyed([item]) == [None]
    assert broker.publish_keyed([item]) == [item.message.task_id]
    assert ready(broker) == 1


def test_keys_are_scoped_to_their_queue(broker):
    a, b = keyed("same", queue="keyed-a"), keyed("same", queue="keyed-b")
    assert broker.publish_keyed([a, b]) == [None, None]
    assert broker.key_owner("keyed-a", "same") == a.message.task_id
    assert broker.key_owner("keyed-b", "same") == b.message.task_id


def test_ack_releases_the_key_and_a_new_publish_takes_it(broker):
    broker.publish_keyed([keyed()])
    broker.ack([one(broker)])
    assert broker.key_owner(Q, "k") is None
    again = keyed()
    assert broker.publish_keyed([again]) == [None]
    assert one(broker).task_id == again.message.task_id


@pytest.mark.waits
def test_a_lingering_key_outlives_the_ack_by_linger_then_frees_itself(broker):
    item = keyed(linger=0.6)
    broker.publish_keyed([item])
    broker.ack([one(broker)])
    assert broker.key_owner(Q, "k") == item.message.task_id
    assert broker.publish_keyed([keyed()]) == [item.message.task_id]
    wait_for(lambda: broker.key_owner(Q, "k") is None, timeout=10.0, what="the lingering key expired")
    assert broker.publish_keyed([keyed()]) == [None]


@pytest.mark.waits
def test_retry_nack_requeue_and_lease_expiry_keep_the_key(broker):
    item = keyed(vt=0.5)
    tid = item.message.task_id
    broker.publish_keyed([item])
    d = one(broker)
    broker.retry(d, b"attempt-2", None)
    assert broker.key_owner(Q, "k") == tid
    d = one(broker)
    assert (d.key, bytes(d.frame)) == ("k", b"attempt-2")
    broker.nack(d, requeue=True)
    assert broker.key_owner(Q, "k") == tid
    d = one(broker)
    assert d.key == "k"
    redelivered = one(broker, timeout=10.0)       # its lease (0.5 s) ran out
    assert (redelivered.task_id, redelivered.key) == (tid, "k")
    assert redelivered.delivery_count == d.delivery_count + 1
    assert broker.key_owner(Q, "k") == tid
    broker.ack([redelivered])
    assert broker.key_owner(Q, "k") is None


@pytest.mark.waits
def test_a_delayed_keyed_message_holds_its_key_until_it_runs_and_ends(broker):
    broker.stats(Q)       # the adapter's first call sets it up (Postgres migrates its schema): not in the window
    item = keyed(not_before=time.time() + 2.0)   # still delayed after the next two calls, even on a loaded machine
    broker.publish_keyed([item])
    assert broker.stats(Q).delayed == 1
    assert broker.publish_keyed([keyed()]) == [item.message.task_id]
    d = one(broker, timeout=10.0)
    assert d.key == "k"
    broker.ack([d])
    assert broker.key_owner(Q, "k") is None


@pytest.mark.parametrize("how", ["dead_letter", "nack"])
def test_dead_lettering_releases_the_key_and_replay_claims_it_again(broker, how):
    item = keyed(ttl=120.0)
    tid = item.message.task_id
    broker.publish_keyed([item])
    d = one(broker)
    if how == "dead_letter":
        broker.dead_letter(d, "poison")
    else:
        broker.nack(d, requeue=False)
    assert broker.key_owner(Q, "k") is None
    [dl] = broker.dead_letters(Q)
    assert (dl.task_id, dl.key) == (tid, "k")
    assert broker.replay(Q) == 1
    assert broker.key_owner(Q, "k") == tid
    assert broker.publish_keyed([keyed()]) == [tid]
    d = one(broker)
    assert (d.task_id, d.key) == (tid, "k")
    broker.ack([d])
    assert broker.key_owner(Q, "k") is None


def test_replay_leaves_an_entry_in_the_dlq_while_another_task_holds_its_key(broker):
    item = keyed()
    broker.publish_keyed([item])
    broker.dead_letter(one(broker), "poison")
    newer = keyed()
    assert broker.publish_keyed([newer]) == [None]
    plain = Message(uuid.uuid4().hex, Q, b"plain", 0, None, None)
    broker.publish(plain)
    broker.dead_letter(_take(broker, plain.task_id), "x")
    assert broker.replay(Q) == 1                      # the plain one; the keyed one waits
    [left] = broker.dead_letters(Q)
    assert left.task_id == item.message.task_id
    assert broker.key_owner(Q, "k") == newer.message.task_id


def _take(broker, task_id):
    """Lease messages until the one of ``task_id`` comes; nack the others back."""
    others = []
    try:
        for _ in range(10):
            d = one(broker)
            if d.task_id == task_id:
                return d
            others.append(d)
        raise AssertionError(f"{task_id} was not delivered")
    finally:
        for d in others:
            broker.nack(d, requeue=True)


def test_purge_releases_the_keys_of_what_it_drops_and_delete_queue_drops_keys(broker):
    broker.publish_keyed([keyed("a"), keyed("b", not_before=time.time() + 60)])
    assert broker.purge(Q) == 2
    assert broker.key_owner(Q, "a") is None and broker.key_owner(Q, "b") is None
    broker.publish_keyed([keyed("c"), keyed("d")])
    one(broker)                                       # one in flight, one ready
    broker.delete_queue(Q)
    assert broker.key_owner(Q, "c") is None and broker.key_owner(Q, "d") is None
    assert broker.publish_keyed([keyed("c")]) == [None]


def test_release_key_is_owner_checked_and_a_late_ack_spares_the_next_owner(broker):
    first = keyed()
    broker.publish_keyed([first])
    d = one(broker)
    assert broker.release_key(Q, "k", "someone-else") is False
    assert broker.key_owner(Q, "k") == first.message.task_id
    assert broker.release_key(Q, "k", first.message.task_id) is True     # unique_until="started"
    assert broker.release_key(Q, "k", first.message.task_id) is False
    second = keyed()
    assert broker.publish_keyed([second]) == [None]
    broker.ack([d])                                   # the first ends: the key is the second's
    assert broker.key_owner(Q, "k") == second.message.task_id


@pytest.mark.waits
def test_a_key_expires_after_its_ttl_whatever_became_of_the_task(broker):
    first = keyed(ttl=0.5)
    broker.publish_keyed([first])
    wait_for(lambda: broker.key_owner(Q, "k") is None, timeout=10.0, what="the key's ttl ran out")
    second = keyed()
    assert broker.publish_keyed([second]) == [None]
    d1 = one(broker)
    broker.ack([d1])                                  # the first ends: owner check spares the second
    assert broker.key_owner(Q, "k") == second.message.task_id
    assert ready(broker) == 1


def test_a_publish_that_fails_after_the_claim_leaves_no_key(broker):
    brk = getattr(broker, "contract_break_publish", None)
    if brk is None:
        pytest.skip(f"{type(broker).__name__} names no way to break its publish step")
    brk("broken")
    with pytest.raises(StemError):
        broker.publish_keyed([keyed("lonely", queue="broken")])
    assert broker.key_owner("broken", "lonely") is None
    ok = keyed("lonely")
    assert broker.publish_keyed([ok]) == [None]


@pytest.mark.parametrize("item", [
    pytest.param(lambda: keyed(""), id="empty-key"),
    pytest.param(lambda: keyed("x" * 513), id="long-key"),
    pytest.param(lambda: keyed(ttl=0), id="zero-ttl"),
    pytest.param(lambda: keyed(ttl=float("nan")), id="nan-ttl"),
    pytest.param(lambda: keyed(linger=-1), id="negative-linger"),
    pytest.param(lambda: keyed(queue="bad queue"), id="bad-queue"),
    pytest.param(lambda: Message("t", Q, b"f", 0, None, None), id="not-keyed"),
    pytest.param(lambda: Keyed(Message("t", Q, b"f", 0, None, None), 7, 60.0), id="int-key"),
])
def test_publish_keyed_refuses_bad_items_before_publishing_any(broker, item):
    good = keyed("good")
    with pytest.raises(ConfigurationError):
        broker.publish_keyed([good, item()])
    assert broker.key_owner(Q, "good") is None
    assert ready(broker) == 0


def _race(args):
    factory, fargs, fkwargs, key, task_id, barrier_at = args
    broker = factory(*fargs, **fkwargs)
    try:
        while time.time() < barrier_at:
            time.sleep(0.001)
        return broker.publish_keyed([keyed(key, task_id=task_id)])[0]
    finally:
        broker.close()


@pytest.mark.pg_heavy
def test_64_producers_racing_on_one_key_publish_exactly_one_task(broker):
    """Threads share the broker; processes (where the adapter names a recipe) build
    their own.  Each publishes the same key under its own task id."""
    recipe = getattr(broker, "contract_recipe", None)
    n_proc = 16 if recipe is not None else 0
    n_thread = 64 - n_proc
    ids = [f"racer-{i}" for i in range(64)]
    results: dict[str, str | None] = {}
    start = threading.Barrier(n_thread)

    def thread(tid):
        start.wait()
        results[tid] = broker.publish_keyed([keyed("contended", task_id=tid)])[0]

    threads = [threading.Thread(target=thread, args=(t,)) for t in ids[:n_thread]]
    if n_proc:
        factory, fargs, fkwargs = recipe
        ctx = multiprocessing.get_context("fork")
        at = time.time() + 1.0
        with ctx.Pool(n_proc) as pool:
            pending = pool.map_async(_race, [(factory, fargs, fkwargs, "contended", t, at) for t in ids[n_thread:]])
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            results.update(zip(ids[n_thread:], pending.get(60)))
    else:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(results) == 64
    winners = [t for t, r in results.items() if r is None]
    assert len(winners) == 1, winners
    assert all(r == winners[0] for t, r in results.items() if t != winners[0])
    assert broker.key_owner(Q, "contended") == winners[0]
    assert ready(broker) == 1
    assert one(broker).task_id == winners[0]
