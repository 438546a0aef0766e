"""Every broker adapter runs these cases: the semantics in ``stem/brokers/base.py``."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from stem import ShutdownMode, Stem, TaskRegistry, TaskState, Worker, WorkerLifecycleConfig
from stem.backends.memory import InMemoryResultBackend
from stem.brokers.base import Message
from stem.errors import BrokerConnectionError, ConfigurationError

from ..support import wait_for, wait_until

Q = "contract"


def msg(frame: bytes = b"frame", *, queue: str = Q, priority: int = 0, not_before=None, vt=None,
        task_id: str | None = None) -> Message:
    return Message(task_id or uuid.uuid4().hex, queue, frame, priority, not_before, vt)


def consume_one(broker, queues=(Q,), timeout=5.0):
    got = broker.consume(list(queues), 1, timeout)
    assert len(got) == 1, f"expected one delivery within {timeout}s, got {got}"
    return got[0]


def test_published_message_is_delivered_once_with_its_frame_and_task_id(broker):
    m = msg(b"\x00hello\xff")
    broker.publish(m)
    d = consume_one(broker)
    assert bytes(d.frame) == b"\x00hello\xff"
    assert d.task_id == m.task_id
    assert d.queue == Q
    assert d.delivery_count == 1
    assert broker.consume([Q], 10, 0.2) == []


def test_acked_delivery_is_gone(broker):
    broker.publish(msg())
    d = consume_one(broker)
    assert broker.stats(Q).in_flight == 1
    broker.ack([d])
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.delayed) == (0, 0, 0)
    assert broker.consume([Q], 1, 0.2) == []


def test_unacked_delivery_is_redelivered_after_visibility_timeout(broker):
    broker.publish(msg(b"x", vt=0.5))
    first = consume_one(broker)
    assert first.delivery_count == 1
    t0 = time.monotonic()
    second = consume_one(broker, timeout=10.0)
    assert time.monotonic() - t0 >= 0.2
    assert second.task_id == first.task_id
    assert second.delivery_count == 2
    broker.ack([second])
    assert broker.stats(Q).in_flight == 0


@pytest.mark.waits
def test_broker_default_visibility_timeout_applies_when_message_has_none(make_broker):
    broker = make_broker(default_visibility_timeout=0.5)
    broker.publish(msg())
    consume_one(broker)
    again = consume_one(broker, timeout=10.0)
    assert again.delivery_count == 2


@pytest.mark.waits
def test_extended_lease_is_not_redelivered_and_leaves_one_copy(broker):
    broker.publish(msg(vt=1.0))
    d = consume_one(broker)
    broker.extend([d], 30.0)
    assert broker.consume([Q], 1, 2.0) == []
    s = broker.stats(Q)
    assert (s.ready, s.in_flight) == (0, 1)
    broker.ack([d])
    assert broker.stats(Q).in_flight == 0


def test_higher_priority_is_delivered_first_then_fifo(broker):
    broker.publish_many([msg(b"low-1", priority=0), msg(b"high", priority=5), msg(b"mid", priority=1),
                         msg(b"low-2", priority=0)])
    got = []
    while len(got) < 4:
        got += broker.consume([Q], 4 - len(got), 5.0)
    assert [bytes(d.frame) for d in got] == [b"high", b"mid", b"low-1", b"low-2"]


def test_fifo_order_within_one_priority(broker):
    frames = [f"m{i}".encode() for i in range(50)]
    broker.publish_many([msg(f) for f in frames])
    got = []
    while len(got) < 50:
        got += broker.consume([Q], 50 - len(got), 5.0)
    assert [bytes(d.frame) for d in got] == frames


def test_consume_returns_at_most_max_count(broker):
    broker.publish_many([msg() for _ in range(10)])
    got = broker.consume([Q], 3, 5.0)
    assert 1 <= len(got) <= 3
    assert broker.stats(Q).ready + broker.stats(Q).in_flight == 10


@pytest.mark.waits
def test_delayed_message_is_held_until_due(broker):
    broker.stats(Q)       # the adapter's first call sets it up (Postgres migrates its schema): not in the window
    due = time.time() + 1.0
    broker.publish(msg(b"later", not_before=due))
    assert broker.consume([Q], 1, 0.1) == []
    assert broker.stats(Q).delayed == 1
    d = consume_one(broker, timeout=10.0)
    assert time.time() >= due - 0.05
    assert bytes(d.frame) == b"later"


def test_message_with_past_not_before_is_deliverable_now(broker):
    broker.publish(msg(b"past", not_before=time.time() - 10))
    assert bytes(consume_one(broker, timeout=2.0).frame) == b"past"


def test_retry_replaces_delivery_with_new_frame_as_fresh_message(broker):
    broker.publish(msg(b"attempt-0"))
    d = consume_one(broker)
    broker.retry(d, b"attempt-1", None)
    again = consume_one(broker)
    assert bytes(again.frame) == b"attempt-1"
    assert again.task_id == d.task_id
    assert again.delivery_count == 1
    broker.ack([again])
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.delayed) == (0, 0, 0)


def test_retry_with_not_before_is_delayed(broker):
    broker.publish(msg())
    d = consume_one(broker)
    broker.retry(d, b"later", time.time() + 60)
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.delayed) == (0, 0, 1)


def test_dead_letter_keeps_frame_and_reason_and_replay_requeues(broker):
    m = msg(b"bad")
    broker.publish(m)
    d = consume_one(broker)
    broker.dead_letter(d, "signature-invalid")
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.dead) == (0, 0, 1)
    [dl] = broker.dead_letters(Q)
    assert dl.reason == "signature-invalid"
    assert bytes(dl.frame) == b"bad"
    assert dl.task_id == m.task_id
    assert dl.failed_at == pytest.approx(time.time(), abs=30)
    assert broker.replay(Q, [dl.id]) == 1
    assert broker.stats(Q).dead == 0
    again = consume_one(broker)
    assert bytes(again.frame) == b"bad" and again.delivery_count == 1


def test_replay_of_all_and_purge_of_dead_letters(broker):
    broker.publish_many([msg(b"a"), msg(b"b"), msg(b"c")])
    got = []
    while len(got) < 3:
        got += broker.consume([Q], 3, 5.0)
    for d in got:
        broker.dead_letter(d, "test")
    assert len(broker.dead_letters(Q, limit=2)) == 2
    assert broker.replay(Q) == 3
    assert broker.stats(Q).dead == 0
    got = []
    while len(got) < 3:
        got += broker.consume([Q], 3, 5.0)
    for d in got:
        broker.dead_letter(d, "again")
    assert broker.purge_dead_letters(Q) == 3
    assert broker.dead_letters(Q) == []


def test_nack_with_requeue_makes_it_deliverable_at_once_counting_the_delivery(broker):
    broker.publish(msg(vt=60))
    d = consume_one(broker)
    broker.nack(d, requeue=True)
    again = consume_one(broker, timeout=2.0)
    assert again.delivery_count == 2


def test_nack_without_requeue_dead_letters_as_rejected(broker):
    broker.publish(msg())
    broker.nack(consume_one(broker), requeue=False)
    [dl] = broker.dead_letters(Q)
    assert dl.reason == "rejected"


def test_a_message_past_max_deliveries_is_delivered_with_its_count_for_the_consumer_to_dead_letter(make_broker):
    broker = make_broker(max_deliveries=2)
    m = msg(b"poison", vt=60)
    broker.publish(m)
    broker.nack(consume_one(broker), requeue=True)
    broker.nack(consume_one(broker), requeue=True)
    third = consume_one(broker, timeout=2.0)
    assert (third.task_id, bytes(third.frame), third.delivery_count) == (m.task_id, b"poison", 3)
    assert broker.dead_letters(Q) == []          # the broker buries nothing by itself
    broker.dead_letter(third, "max-deliveries")
    [dl] = broker.dead_letters(Q)
    assert (dl.task_id, dl.reason, bytes(dl.frame)) == (m.task_id, "max-deliveries", b"poison")
    assert broker.stats(Q)[1:5] == (0, 0, 0, 1)


@pytest.mark.waits
def test_leases_that_keep_expiring_past_max_deliveries_are_still_delivered_never_buried(make_broker):
    """A consumer that dies before it dead-letters a delivery past the cap only gets it back."""
    broker = make_broker(max_deliveries=1, default_visibility_timeout=0.3)
    m = msg(b"expiring")
    broker.publish(m)
    counts = [consume_one(broker, timeout=10.0).delivery_count for _ in range(3)]   # never settled
    assert counts == [1, 2, 3]
    assert broker.dead_letters(Q) == []
    assert broker.stats(Q).dead == 0


def test_garbage_and_empty_frames_between_valid_ones_are_delivered_with_them(broker):
    frames = [b"valid-1", b"\x00garbage\xff", b"", b"valid-2", b"\xa7S\x01", b"valid-3"]
    sent = [msg(f) for f in frames]
    broker.publish_many(sent)
    got = broker.consume([Q], 10, 5.0)
    while len(got) < len(frames):
        more = broker.consume([Q], 10, 2.0)
        assert more, f"only {len(got)} of {len(frames)} delivered"
        got += more
    assert [(d.task_id, bytes(d.frame)) for d in got] == [(m.task_id, m.frame) for m in sent]
    assert broker.stats(Q)[1:5] == (0, len(frames), 0, 0)


def test_consume_from_several_queues(broker):
    broker.publish(msg(b"one", queue="q-one"))
    broker.publish(msg(b"two", queue="q-two"))
    got = []
    while len(got) < 2:
        got += broker.consume(["q-one", "q-two"], 2, 5.0)
    assert sorted((d.queue, bytes(d.frame)) for d in got) == [("q-one", b"one"), ("q-two", b"two")]
    assert {"q-one", "q-two"} <= set(broker.queues())


def test_purge_drops_ready_and_delayed_not_in_flight(broker):
    broker.publish_many([msg(), msg(), msg(not_before=time.time() + 60)])
    d = consume_one(broker)
    assert broker.purge(Q) == 2
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.delayed) == (0, 1, 0)
    broker.ack([d])


def test_bad_queue_name_is_rejected_before_publishing(broker):
    with pytest.raises(ConfigurationError):
        broker.publish(msg(queue="has space"))


def test_consume_on_an_empty_queue_returns_empty_after_the_timeout(broker):
    t0 = time.monotonic()
    assert broker.consume([Q], 5, 0.3) == []
    assert time.monotonic() - t0 < 5.0


def test_blocked_consumer_wakes_when_a_message_is_published(broker):
    broker.consume([Q], 1, 0)  # declare the queue
    got = []
    t = threading.Thread(target=lambda: got.extend(broker.consume([Q], 1, 20.0)))
    t.start()
    t0 = time.monotonic()
    time.sleep(0.2)  # let the consumer block first; correctness does not depend on it
    broker.publish(msg(b"wake"))
    t.join(20)
    assert [bytes(d.frame) for d in got] == [b"wake"]
    assert time.monotonic() - t0 < 10.0


def test_publish_many_is_all_visible(broker):
    broker.publish_many([msg(str(i).encode()) for i in range(200)])
    s = broker.stats(Q)
    assert s.ready == 200


def test_publish_frames_stores_one_ready_batch_with_its_routing(broker):
    ids = [uuid.uuid4().hex for _ in range(120)]
    frames = [b"f%d" % i for i in range(120)]
    broker.publish_frames(Q, ids, frames, priority=3, visibility_timeout=42.0)
    broker.publish_frames(Q, [], [])   # nothing to store is no error
    assert broker.stats(Q).ready == 120
    assert Q in broker.queues()
    got = []
    deadline = time.monotonic() + 10.0
    while len(got) < 120 and time.monotonic() < deadline:
        got += broker.consume([Q], 120 - len(got), 0.5)
    assert sorted((d.task_id, bytes(d.frame)) for d in got) == sorted(zip(ids, frames))
    assert {d.visibility_timeout for d in got} == {42.0}
    broker.publish(msg(b"low"))
    broker.publish_frames(Q, ["high"], [b"high"], priority=9)
    assert bytes(consume_one(broker).frame) == b"high"   # the batch's priority counts


def test_publish_frames_refuses_mismatched_lists(broker):
    with pytest.raises(ConfigurationError, match="2 task ids for 1 frames"):
        broker.publish_frames(Q, ["a", "b"], [b"x"])
    assert broker.stats(Q).ready == 0


# -- with a real worker: what the consumer side of the contract needs -------------------------
@pytest.fixture
def worker_env():
    """A registry, an in-memory result backend and a factory of in-process workers (all stopped at
    the end) on the broker under test."""
    workers = []

    class Env:
        registry = TaskRegistry()
        backend = InMemoryResultBackend()

        def worker(self, broker):
            w = Worker(broker, self.backend, self.registry, concurrency=2, isolation="inline",
                       lifecycle=WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5,
                                                       force_shutdown_after=5))
            workers.append(w)
            return w.run_in_background()

    yield Env()
    for w in workers:
        w.shutdown(ShutdownMode.HARD, timeout=15)


def dead_letter_of(broker, task_id, queue="default", timeout=10.0):
    """The DEAD status is stored before the dead-letter copy is made: wait for the copy."""
    found = []
    assert wait_until(lambda: found.extend(d for d in broker.dead_letters(queue) if d.task_id == task_id)
                      or found, timeout=timeout), f"{task_id} never reached the dead letters"
    return found[0]


def test_a_worker_dead_letters_garbage_frames_as_decode_error_and_runs_the_tasks_around_them(broker, worker_env):
    worker_env.registry.task("add")(lambda ctx, a, b: a + b)
    stem = Stem(broker, worker_env.backend, worker_env.registry)
    ids = [stem.enqueue("add", {"a": i, "b": 1}) for i in range(3)]
    broker.publish_many([Message("garbage", "default", b"\x00not a frame\xff"), Message("empty", "default", b"")])
    ids += [stem.enqueue("add", {"a": i, "b": 1}) for i in range(3, 6)]
    worker_env.worker(broker)
    assert [stem.wait_for_task(i, timeout=20).result for i in ids] == [i + 1 for i in range(6)]
    for bad in ("garbage", "empty"):
        status = stem.wait_for_task(bad, timeout=20)
        assert (status.state, status.reason) == (TaskState.DEAD, "decode-error")
        assert dead_letter_of(broker, bad).reason == "decode-error"


@pytest.mark.waits
def test_a_task_whose_leases_keep_expiring_ends_dead_with_reason_max_deliveries(make_broker, worker_env):
    """A consumer that never settles (a worker killed each time) holds the task past the cap; the
    next worker stores its DEAD status, then dead-letters it, and never runs it."""
    ran = []
    worker_env.registry.task("never.runs")(lambda ctx: ran.append(ctx.id))
    broker = make_broker(max_deliveries=2, default_visibility_timeout=0.3)
    stem = Stem(broker, worker_env.backend, worker_env.registry)
    task_id = stem.enqueue("never.runs")
    for n in (1, 2):
        assert consume_one(broker, ("default",), timeout=10.0).delivery_count == n   # lease left to expire
    worker_env.worker(broker)
    status = stem.wait_for_task(task_id, timeout=20)
    assert (status.state, status.reason, status.name) == (TaskState.DEAD, "max-deliveries", "never.runs")
    assert "max_deliveries=2" in status.error
    assert stem.get_status(task_id).state is TaskState.DEAD
    assert dead_letter_of(broker, task_id).reason == "max-deliveries"
    assert ran == []


@pytest.mark.waits
def test_a_worker_that_dies_between_the_dead_status_and_the_dead_letter_leaves_no_task_pending(make_broker,
                                                                                                worker_env):
    """The poison cap's crash window: the DEAD status goes in first; a delivery the worker could not
    dead-letter any more comes back after its lease, and the next worker dead-letters it."""
    worker_env.registry.task("never.runs")(lambda ctx: None)
    broker = make_broker(max_deliveries=1, default_visibility_timeout=0.5)
    stem = Stem(broker, worker_env.backend, worker_env.registry)
    task_id = stem.enqueue("never.runs")
    assert consume_one(broker, ("default",), timeout=10.0).delivery_count == 1   # lease left to expire

    def lost(delivery, reason):
        raise BrokerConnectionError("the worker dies before its dead letter is made")

    broker.dead_letter = lost
    first = worker_env.worker(broker)
    wait_for(lambda: stem.get_status(task_id).state is TaskState.DEAD, what="the DEAD status")
    assert first.shutdown(ShutdownMode.HARD, timeout=15)
    del broker.dead_letter
    assert broker.dead_letters("default") == []
    worker_env.worker(broker)
    assert dead_letter_of(broker, task_id).reason == "max-deliveries"
    status = stem.get_status(task_id)
    assert (status.state, status.reason) == (TaskState.DEAD, "max-deliveries")


def test_delete_queue_drops_every_message_its_dead_letters_and_its_name(broker):
    other = "contract-other"
    broker.publish(msg(b"ready"))
    broker.publish(msg(b"delayed", not_before=time.time() + 3600))
    broker.publish(msg(b"leased"))
    broker.publish(msg(b"dead"))
    broker.publish(msg(b"kept", queue=other))
    leased = broker.consume([Q], 2, 5.0)
    assert len(leased) == 2
    broker.dead_letter(leased[1], "boom")
    assert Q in broker.queues() and broker.dead_letters(Q)
    broker.delete_queue(Q)
    assert Q not in broker.queues() and other in broker.queues()
    assert broker.dead_letters(Q) == []
    assert broker.consume([Q], 10, 0.2) == []
    broker.ack([leased[0]])               # settling a delivery of a deleted queue is a no-op
    broker.nack(leased[0], requeue=True)
    s = broker.stats(Q)
    assert (s.ready, s.in_flight, s.delayed, s.dead) == (0, 0, 0, 0)
    assert bytes(consume_one(broker, queues=(other,)).frame) == b"kept"
    broker.delete_queue(Q)                # idempotent


def test_a_deleted_queue_starts_afresh_on_the_next_publish(broker):
    broker.publish(msg(b"old"))
    consume_one(broker)
    broker.delete_queue(Q)
    broker.publish(msg(b"new"))
    assert Q in broker.queues()
    d = consume_one(broker)
    assert bytes(d.frame) == b"new" and d.delivery_count == 1
    broker.ack([d])


def test_delete_queue_rejects_a_bad_queue_name(broker):
    with pytest.raises(ConfigurationError, match="bad queue name"):
        broker.delete_queue("no spaces allowed")


@pytest.mark.parametrize("kwargs", [
    dict(default_visibility_timeout=0), dict(default_visibility_timeout=True),
    dict(default_visibility_timeout=float("nan")), dict(default_visibility_timeout="30"),
    dict(max_deliveries=0), dict(max_deliveries=2.5), dict(max_deliveries=True)],
    ids=["vt-zero", "vt-bool", "vt-nan", "vt-str", "max-zero", "max-float", "max-bool"])
def test_a_broker_refuses_bad_settings_with_a_configuration_error(make_broker, kwargs):
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        make_broker(**kwargs)


@pytest.mark.parametrize("max_count", [0, -1, 2.0, True])
def test_consume_refuses_a_max_count_that_is_not_a_positive_integer(broker, max_count):
    with pytest.raises(ConfigurationError, match="max_count"):
        broker.consume([Q], max_count, 0)


def test_consume_refuses_an_empty_list_of_queues(broker):
    with pytest.raises(ConfigurationError, match="at least one queue"):
        broker.consume([], 1, 0)
