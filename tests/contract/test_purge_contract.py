"""Purge with statuses on every broker adapter (``stem.brokers.base``, "Purge with statuses";
``stem.purging``): the holding area, and what a purge records: every purged task REVOKED
``purged``, its waiters woken, its group or chord counting it, garbage dropped without a
status, and an interrupted purge finished by the next one."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from stem import ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker, WorkerLifecycleConfig
from stem.backends.memory import InMemoryResultBackend
from stem.brokers.base import Held, Keyed, Limit, Message
from stem.canvas import MemberFailure, Signature, chain, chord, group
from stem.errors import ConfigurationError, StemError
from stem.purging import purge_queue

Q = "purged"
CB = "callbacks"


def msg(frame: bytes = b"frame", *, queue: str = Q, not_before=None, task_id: str | None = None,
        limit: Limit | None = None) -> Message:
    return Message(task_id or uuid.uuid4().hex, queue, frame, 0, not_before, None, limit)


# -- the holding area ---------------------------------------------------------------------
def test_purge_hold_moves_ready_delayed_lane_and_keyed_messages_in_order_and_leaves_in_flight(broker):
    broker.publish_many([msg(b"f1", task_id="t1"), msg(b"f2", task_id="t2")])
    leased = broker.consume([Q], 1, 5.0)
    assert [d.task_id for d in leased] == ["t1"]
    broker.publish_many([msg(b"f3", task_id="t3", not_before=time.time() + 60),
                         msg(b"f4", task_id="t4", limit=Limit(rate_key="r", rate=0.001, burst=1))])
    assert broker.publish_keyed([Keyed(msg(b"f5", task_id="t5"), "k", 60.0)]) == [None]
    assert broker.purge_hold(Q) == 4
    s = broker.stats(Q)
    assert (s.ready, s.delayed, s.throttled, s.in_flight) == (0, 0, 0, 1)
    assert broker.consume([Q], 10, 0) == []
    assert broker.key_owner(Q, "k") is None                   # released as purge releases it
    held = broker.purge_held(Q, 100)
    assert all(isinstance(h, Held) for h in held)
    assert sorted((h.task_id, h.frame) for h in held) == [("t2", b"f2"), ("t3", b"f3"), ("t4", b"f4"),
                                                          ("t5", b"f5")]
    assert len({h.id for h in held}) == 4
    broker.ack(leased)
    assert broker.purge_hold(Q) == 0                          # nothing waits: the held stay held
    assert len(broker.purge_held(Q)) == 4


def test_purge_held_pages_oldest_first_and_purge_drop_deletes_by_id(broker):
    broker.publish_many([msg(f"f{i}".encode(), task_id=f"t{i}") for i in range(7)])
    assert broker.purge_hold(Q) == 7
    first = broker.purge_held(Q, 3)
    assert [h.task_id for h in first] == ["t0", "t1", "t2"]
    assert broker.purge_held(Q, 3) == first                    # reading is not taking
    assert broker.purge_drop(Q, [h.id for h in first]) == 3
    assert broker.purge_drop(Q, [h.id for h in first]) == 0    # again: nothing left of them
    assert [h.task_id for h in broker.purge_held(Q, 3)] == ["t3", "t4", "t5"]
    rest = broker.purge_held(Q, 100)
    assert broker.purge_drop(Q, [h.id for h in rest] + ["999999-0", "no-such-id"]) == 4
    assert broker.purge_held(Q) == []


def test_messages_published_after_a_hold_wait_for_the_next_hold(broker):
    broker.publish_many([msg(task_id="before")])
    assert broker.purge_hold(Q) == 1
    broker.publish_many([msg(task_id="after")])
    assert [d.task_id for d in broker.consume([Q], 5, 5.0)] == ["after"]
    assert [h.task_id for h in broker.purge_held(Q)] == ["before"]


def test_delete_queue_drops_the_holding_area(broker):
    broker.publish_many([msg(), msg()])
    assert broker.purge_hold(Q) == 2
    broker.delete_queue(Q)
    assert broker.purge_held(Q) == []


def test_the_holding_area_refuses_a_bad_queue_name_or_limit(broker):
    with pytest.raises(ConfigurationError):
        broker.purge_hold("bad queue name\n")
    with pytest.raises(ConfigurationError):
        broker.purge_held("bad queue name\n")
    with pytest.raises(ConfigurationError):
        broker.purge_held(Q, 0)
    with pytest.raises(ConfigurationError):
        broker.purge_drop("bad queue name\n", ["1"])


# -- what a purge records -----------------------------------------------------------------
@pytest.fixture
def env():
    """A registry, an in-memory backend and in-process workers on the broker under test,
    consuming the callbacks' queue only (the purged queue has no worker)."""
    workers = []

    class Env:
        registry = TaskRegistry()
        backend = InMemoryResultBackend()

        def stem(self, broker) -> Stem:
            return Stem(broker, self.backend, self.registry)

        def worker(self, broker):
            w = Worker(broker, self.backend, self.registry, queues=[CB], concurrency=2, isolation="inline",
                       lifecycle=WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5,
                                                       force_shutdown_after=5))
            workers.append(w)
            return w.run_in_background()

    e = Env()
    e.registry.task("add")(lambda ctx, a, b: a + b)
    e.registry.task("collect")(lambda ctx: list(ctx.previous))
    yield e
    for w in workers:
        w.shutdown(ShutdownMode.HARD, timeout=15)


def on(queue: str) -> TaskOptions:
    return TaskOptions(queue=queue)


def test_purge_ends_every_purged_task_revoked_and_wakes_its_waiter(broker, env):
    stem = env.stem(broker)
    ids = [stem.enqueue("add", {"a": i, "b": 1}, options=on(Q)) for i in range(5)]
    delayed = stem.enqueue("add", {"a": 1, "b": 1}, options=on(Q), countdown=3600)
    woken = []
    waiter = threading.Thread(target=lambda: woken.append(stem.wait_for_task(ids[0], timeout=30)))
    waiter.start()
    report = stem.purge(Q, batch=2)
    waiter.join(30)
    assert woken and (woken[0].state, woken[0].reason) == (TaskState.REVOKED, "purged")
    assert (report.purged, report.revoked, report.kept, report.unreadable) == (6, 6, 0, 0)
    for task_id in [*ids, delayed]:
        status = stem.get_status(task_id)
        assert (status.state, status.reason, status.name, status.queue) == (TaskState.REVOKED, "purged", "add", Q)
    assert stem.get_status(ids[2]).args == {"a": 2, "b": 1}
    assert broker.purge_held(Q) == []
    assert stem.purge(Q) == (Q, 0, 0, 0, 0)


def test_garbage_frames_are_purged_without_a_status_and_without_error(broker, env):
    stem = env.stem(broker)
    good = stem.enqueue("add", {"a": 1, "b": 1}, options=on(Q))
    broker.publish_many([Message("garbage", Q, b"\x00not a frame\xff"), Message("empty", Q, b"")])
    report = purge_queue(stem, Q)
    assert (report.purged, report.revoked, report.unreadable) == (3, 1, 2)
    assert stem.get_status(good).state is TaskState.REVOKED
    assert env.backend.get("garbage") is None and env.backend.get("empty") is None
    assert broker.purge_held(Q) == []


def test_a_task_whose_status_is_terminal_already_keeps_it(broker, env):
    """A copy that ran (at-least-once), or the status an interrupted purge stored."""
    stem = env.stem(broker)
    task_id = stem.enqueue("add", {"a": 1, "b": 1}, options=on(Q))
    from stem.results import TaskStatus
    env.backend.store(TaskStatus(id=task_id, state=TaskState.SUCCEEDED, result=2, finished_at=time.time()))
    report = stem.purge(Q)
    assert (report.purged, report.revoked, report.kept) == (1, 0, 1)
    assert stem.get_status(task_id).state is TaskState.SUCCEEDED


def test_purging_chord_members_ends_the_chord_failed_and_wakes_its_waiter(broker, env):
    stem = env.stem(broker)
    h = stem.apply(chord(group(Signature("add", {"a": i, "b": 1}, on(Q)) for i in range(4)),
                         Signature("collect", options=on(CB))))
    woken = []
    waiter = threading.Thread(target=lambda: woken.append(h.wait(30)))
    waiter.start()
    assert stem.purge(Q, batch=3).revoked == 4
    waiter.join(30)
    assert woken, "the chord's waiter was not woken"
    status = woken[0]
    assert (status.state, status.reason) == (TaskState.FAILED, "dependency-failed")
    # ended at the first failure (the first page of 3), naming the members failed by then; each
    # later failure names itself too (the waiter may read either), so the last names all four
    members = [f"{h.id}.{i}" for i in range(4)]
    assert sorted(status.result["failed"]) in (members[:3], members)
    assert sorted(stem.get_status(h.id).result["failed"]) == members
    assert h.progress() == (4, 4)                                 # and every member counted
    assert stem.purge(CB).purged == 0                             # the callback was never published


def test_with_on_failure_continue_the_callback_runs_with_member_failures_for_the_purged(broker, env):
    stem = env.stem(broker)
    env.worker(broker)
    members = [Signature("add", {"a": 0, "b": 1}, on(Q)), Signature("add", {"a": 1, "b": 1}, on(CB)),
               Signature("add", {"a": 2, "b": 1}, on(Q))]
    h = stem.apply(chord(group(members), Signature("collect", options=on(CB)), on_failure="continue"))
    assert stem.wait_for_task(f"{h.id}.1", timeout=30).result == 2
    stem.purge(Q)
    status = h.wait(30)
    assert status.state is TaskState.SUCCEEDED, status
    first, second, third = status.result
    assert second == 2
    for index, failure in ((0, first), (2, third)):
        assert MemberFailure(*failure) == MemberFailure(f"{h.id}.{index}", "REVOKED", "purged",
                                                        f"purged from queue {Q!r}")


def test_with_on_failure_fail_fast_a_purged_member_revokes_the_others(broker, env):
    stem = env.stem(broker)
    h = stem.apply(chord(group(Signature("add", {"a": i, "b": 1}, on(Q)) for i in range(3)),
                         Signature("collect", options=on(CB)), on_failure="fail_fast"))
    stem.purge(Q)
    status = h.wait(30)
    assert (status.state, status.reason) == (TaskState.FAILED, "dependency-failed")


def test_a_purged_chain_step_ends_the_chain_failed(broker, env):
    stem = env.stem(broker)
    h = stem.apply(chain(Signature("add", {"a": 1, "b": 1}, on(Q)), Signature("collect", options=on(CB))))
    stem.purge(Q)
    status = h.wait(30)
    assert (status.state, status.reason) == (TaskState.FAILED, "chain-step-failed")


def test_a_purge_interrupted_after_its_first_page_is_finished_by_the_next(broker, env):
    """In process (the kill -9 of a purging process is tests/e2e/test_purge.py): the first run
    stores a page's statuses, then its broker fails before that page is dropped."""
    stem = env.stem(broker)
    h = stem.apply(chord(group(Signature("add", {"a": i, "b": 1}, on(Q)) for i in range(7)),
                         Signature("collect", options=on(CB))))
    real_drop = broker.purge_drop
    calls = []

    def dies(queue, ids):
        calls.append(list(ids))
        from stem.errors import BrokerConnectionError
        raise BrokerConnectionError("the purging process dies here")

    broker.purge_drop = dies
    with pytest.raises(StemError):
        purge_queue(stem, Q, batch=3)
    assert len(calls) == 1 and len(calls[0]) == 3
    revoked = [i for i in range(7) if stem.get_status(f"{h.id}.{i}").state is TaskState.REVOKED]
    assert revoked == [0, 1, 2]
    assert broker.consume([Q], 10, 0) == []                      # held: no worker gets them
    broker.purge_drop = real_drop
    report = purge_queue(stem, Q, batch=3)
    assert (report.purged, report.revoked, report.kept) == (7, 4, 3)
    assert all(stem.get_status(f"{h.id}.{i}").state is TaskState.REVOKED for i in range(7))
    assert h.wait(30).state is TaskState.FAILED
    assert h.progress() == (7, 7)                                # each counted once
    assert broker.purge_held(Q) == []


def test_purge_needs_a_backend_and_refuses_bad_arguments(broker, env):
    with pytest.raises(ConfigurationError):
        Stem(broker).purge(Q)
    stem = env.stem(broker)
    with pytest.raises(ConfigurationError):
        stem.purge("bad queue name\n")
    with pytest.raises(ConfigurationError):
        stem.purge(Q, batch=0)


def test_members_signed_with_another_key_are_purged_and_an_unreadable_group_stops_nothing(broker, env):
    """A purging producer whose key verifies neither the members nor their group's description:
    each member still ends REVOKED under its task id, the page is not stuck on the group."""
    from stem import PayloadSigner
    theirs = Stem(broker, env.backend, env.registry, PayloadSigner({"k1": b"a" * 32}))
    h = theirs.apply(chord(group(Signature("add", {"a": i, "b": 1}, on(Q)) for i in range(3)),
                           Signature("collect", options=on(CB))))
    plain = theirs.enqueue("add", {"a": 1, "b": 1}, options=on(Q))
    ours = Stem(broker, env.backend, env.registry, PayloadSigner({"k2": b"b" * 32}))
    report = ours.purge(Q)
    assert (report.purged, report.revoked, report.unreadable) == (4, 4, 0)
    for task_id in [plain, *(f"{h.id}.{i}" for i in range(3))]:
        status = ours.get_status(task_id)
        assert (status.state, status.reason) == (TaskState.REVOKED, "purged")
        assert "signature" in status.error
    assert broker.purge_held(Q) == []
