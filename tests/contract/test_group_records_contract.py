"""Group records on every result backend: the "group records" part of ``stem/backends/base.py``
(``stem.backends.groups``)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from stem.backends.groups import GroupRecord
from stem.errors import ConfigurationError

from tests.support import wait_for


def gid() -> str:
    return "g-" + uuid.uuid4().hex[:12]


def make(backend, n: int, *, seal_by: float | None = None, ttl: float = 60.0, data: bytes = b"d",
         held: bool = False) -> str:
    g = gid()
    assert backend.group_create(g, n, data, seal_by=time.time() + 60 if seal_by is None else seal_by, ttl=ttl,
                                held=held)
    return g


def test_a_new_record_is_unsealed_with_nothing_finished(backend):
    g = make(backend, 3, data=b"\x00payload")
    r = backend.group_get(g)
    assert isinstance(r, GroupRecord)
    assert (r.id, r.expected, r.sealed, r.finished, r.succeeded, r.failed, r.interrupted, r.data, r.ttl, r.held) == (
        g, 3, False, 0, 0, 0, False, b"\x00payload", 60.0, False)
    assert not r.complete
    assert backend.group_get("g-absent") is None


def test_creating_an_existing_record_changes_nothing(backend):
    g = make(backend, 2)
    backend.group_record(g, f"{g}.0", 0, True, b"a")
    assert backend.group_create(g, 5, b"other", seal_by=time.time() + 60, ttl=60.0) is False
    r = backend.group_get(g)
    assert (r.expected, r.finished, r.data) == (2, 1, b"d")


def test_a_member_counts_once_however_often_it_is_recorded(backend):
    g = make(backend, 2)
    for _ in range(3):
        r = backend.group_record(g, f"{g}.0", 0, True, b"first")
    assert (r.finished, r.succeeded, r.failed) == (1, 1, 0)
    # a second run of the same member (redelivered after it was recorded) keeps the first outcome
    r = backend.group_record(g, f"{g}.0", 0, False, b"second")
    assert (r.finished, r.succeeded, r.failed) == (1, 1, 0)
    assert backend.group_outcomes(g, 0, 2) == [b"first", None]


def test_complete_needs_the_seal_and_every_member(backend):
    g = make(backend, 2)
    assert not backend.group_record(g, f"{g}.0", 0, True, b"a").complete
    assert not backend.group_record(g, f"{g}.1", 1, False, b"b").complete      # not sealed yet
    r = backend.group_seal(g)
    assert r.complete and (r.finished, r.succeeded, r.failed) == (2, 1, 1)
    assert backend.group_failed_members(g) == [f"{g}.1"]

    h = make(backend, 2)
    assert not backend.group_seal(h).complete
    backend.group_record(h, f"{h}.1", 1, True, b"y")
    assert backend.group_record(h, f"{h}.0", 0, True, b"x").complete
    assert backend.group_outcomes(h, 0, 2) == [b"x", b"y"]


def test_an_empty_group_is_complete_when_sealed(backend):
    g = make(backend, 0)
    assert backend.group_seal(g).complete


def test_outcomes_read_by_page_in_index_order(backend):
    n = 25
    g = make(backend, n)
    for i in reversed(range(n)):
        backend.group_record(g, f"{g}.{i}", i, True, str(i).encode())
    assert backend.group_outcomes(g, 0, 10) == [str(i).encode() for i in range(10)]
    assert backend.group_outcomes(g, 20, 30) == [b"20", b"21", b"22", b"23", b"24", None, None, None, None, None]
    assert backend.group_outcomes(g, 5, 5) == []


def test_an_unknown_group_records_nothing_and_is_not_created(backend):
    assert backend.group_record("g-nobody", "g-nobody.0", 0, True, b"x") is None
    assert backend.group_get("g-nobody") is None
    assert backend.group_seal("g-nobody") is None


def test_concurrent_last_members_see_completion_and_count_once(backend):
    n = 40
    g = make(backend, n)
    backend.group_seal(g)
    completions = []
    lock = threading.Lock()

    def member(i: int) -> None:
        for _ in range(2):           # every member twice: a redelivery racing the first run
            r = backend.group_record(g, f"{g}.{i}", i, True, b"r")
            if r.complete:
                with lock:
                    completions.append(r.finished)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = backend.group_get(g)
    assert (r.finished, r.succeeded) == (n, n)
    assert completions and all(c == n for c in completions)


def test_unsealed_groups_past_their_deadline_are_interrupted_once(backend):
    late = make(backend, 2, seal_by=time.time() - 1, ttl=60.0)
    sealed = make(backend, 2, seal_by=time.time() - 1)
    backend.group_seal(sealed)
    fresh = make(backend, 2)
    marked = backend.group_interrupt_unsealed()
    assert [r.id for r in marked if r.id in (late, sealed, fresh)] == [late]
    assert all(r.interrupted for r in marked)
    assert backend.group_get(late).interrupted
    assert not backend.group_get(fresh).interrupted
    assert late not in [r.id for r in backend.group_interrupt_unsealed()]


@pytest.mark.parametrize("call", [
    lambda b: b.group_create("", 1, b"", seal_by=time.time(), ttl=1.0),
    lambda b: b.group_create("g", -1, b"", seal_by=time.time(), ttl=1.0),
    lambda b: b.group_create("g", 1, "text", seal_by=time.time(), ttl=1.0),
    lambda b: b.group_create("g", 1, b"", seal_by=float("nan"), ttl=1.0),
    lambda b: b.group_create("g", 1, b"", seal_by=time.time(), ttl=0),
    lambda b: b.group_create("g", 1, b"", seal_by=time.time(), ttl=1.0, held="yes"),
    lambda b: b.group_record("g", "g.0", 0, True, b"", 0),
    lambda b: b.group_record("g", "g.0", 0, True, b"", float("inf")),
    lambda b: b.group_release("g", -1.0),
    lambda b: b.group_release("", 1.0),
    lambda b: b.group_record("g", "", 0, True, b""),
    lambda b: b.group_record("g", "g.0", -1, True, b""),
    lambda b: b.group_record("g", "g.0", 0, True, "text"),
    lambda b: b.group_get("x" * 500),
])
def test_bad_arguments_are_refused_before_anything_is_stored(backend, call):
    with pytest.raises(ConfigurationError):
        call(backend)


def test_store_and_record_stores_then_counts_and_may_answer_briefly(backend):
    from stem.results import TaskState, TaskStatus
    g = make(backend, 2)
    backend.group_seal(g)
    s0 = TaskStatus(id=f"{g}.0", state=TaskState.SUCCEEDED, result=1)
    out = backend.store_and_record([s0], [(g, f"{g}.0", 0, True, b"one", None)], brief=True)
    assert out[0] is True or (isinstance(out[0], GroupRecord) and out[0].finished == 1)
    assert backend.get(f"{g}.0").result == 1
    [done] = backend.store_and_record([], [(g, f"{g}.1", 1, True, b"two", 30.0)], brief=True)
    assert isinstance(done, GroupRecord) and done.complete        # completion is always answered in full
    h = make(backend, 2)
    [failed] = backend.store_and_record([], [(h, f"{h}.0", 0, False, b"x", None)], brief=True)
    assert isinstance(failed, GroupRecord) and failed.failed == 1  # so is a failure
    assert backend.store_and_record([], [("g-unknown", "g-unknown.0", 0, True, b"", None)], brief=True) == [None]


# -- lifetime: as long as the members' results, never in flight (stem.backends.groups) -----------
def test_the_first_member_replaces_the_creation_lifetime_and_later_ones_extend_it(make_backend):
    backend = make_backend(result_expires=50.0)
    g = make(backend, 4, ttl=3600.0)
    assert backend.group_record(g, f"{g}.0", 0, True, b"a", 5.0).ttl == 5.0      # not the creation's 3600
    assert backend.group_record(g, f"{g}.1", 1, True, b"b", 20.0).ttl == 20.0    # the longest result
    assert backend.group_record(g, f"{g}.2", 2, False, b"c", 1.0).ttl == 20.0
    assert backend.group_record(g, f"{g}.2", 2, False, b"c", 99.0).ttl == 20.0   # a repeat changes nothing
    assert backend.group_record(g, f"{g}.3", 3, True, b"d").ttl == 50.0           # None: result_expires


def test_a_completed_group_expires_with_its_members_short_results_and_never_in_flight(backend):
    g = make(backend, 2, ttl=3600.0)                  # the creation's lifetime would keep it an hour
    backend.group_record(g, f"{g}.0", 0, True, b"a", 0.3)
    time.sleep(0.6)                                   # past every lifetime, but not complete: kept
    assert backend.group_get(g).finished == 1
    assert backend.group_seal(g).finished == 1        # sealed, still one member to go: kept
    time.sleep(0.6)
    assert backend.group_outcomes(g, 0, 2) == [b"a", None]
    done = backend.group_record(g, f"{g}.1", 1, True, b"b", 0.3)
    assert done.complete and done.ttl == 0.3
    wait_for(lambda: backend.group_get(g) is None, timeout=5, what="the group to expire with its results")
    assert backend.group_outcomes(g, 0, 2) == [None, None]
    assert backend.group_record(g, f"{g}.1", 1, True, b"b", 0.3) is None      # a late redelivery creates nothing


def test_a_held_group_outlives_its_end_until_its_reader_releases_it(backend):
    g = make(backend, 1, held=True)
    backend.group_seal(g)
    r = backend.group_record(g, f"{g}.0", 0, True, b"a", 0.2)
    assert r.complete and r.held
    time.sleep(0.5)                                   # the callback waits in a backlog: still readable
    assert backend.group_outcomes(g, 0, 1) == [b"a"]
    r = backend.group_release(g, 0.4)                 # the reader is done: lives as long as its result
    assert (r.held, r.ttl) == (False, 0.4)
    assert backend.group_get(g) is not None
    wait_for(lambda: backend.group_get(g) is None, timeout=5, what="the released group to expire")
    assert backend.group_release(g, 1.0) is None


def test_a_release_before_the_end_lets_the_group_expire_when_it_ends(backend):
    g = make(backend, 1, held=True)
    r = backend.group_release(g, 0.2)                 # the chord failed: its callback never comes
    assert not r.held and r.ttl == 60.0               # at least the reader's, never shorter
    time.sleep(0.4)
    assert backend.group_get(g) is not None           # released, but in flight: kept
    backend.group_record(g, f"{g}.0", 0, False, b"x", 0.2)
    assert backend.group_seal(g).complete
    wait_for(lambda: backend.group_get(g) is None, timeout=5, what="the group to expire once ended")


def test_an_interrupted_group_expires_held_or_not_and_a_late_member_goes_with_it(backend):
    g = make(backend, 3, seal_by=time.time() - 1, ttl=0.5, held=True)
    [marked] = [r for r in backend.group_interrupt_unsealed() if r.id == g]
    assert marked.interrupted
    # a member published before its producer died ends after the interruption
    late = backend.group_record(g, f"{g}.1", 1, True, b"late", 0.5)
    assert late is not None and late.finished == 1
    wait_for(lambda: backend.group_get(g) is None, timeout=5, what="the interrupted group to expire")
    assert backend.group_outcomes(g, 0, 3) == [None, None, None]    # the late outcome went with it
    assert backend.group_failed_members(g) == []


def test_a_batch_of_successes_counts_each_once_and_answers_completion_once(backend):
    g = make(backend, 3)
    backend.group_seal(g)
    first = backend.store_and_record([], [(g, f"{g}.0", 0, True, b"a", None), (g, f"{g}.1", 1, True, b"b", None)],
                                     brief=True)
    assert all(r is True or (isinstance(r, GroupRecord) and not r.complete) for r in first)
    # a redelivered member beside the last one: counted once, the completion answered (to the last)
    out = backend.store_and_record([], [(g, f"{g}.1", 1, True, b"b", None), (g, f"{g}.2", 2, True, b"c", None)],
                                   brief=True)
    assert isinstance(out[-1], GroupRecord) and out[-1].complete and out[-1].finished == 3
    assert all(r is True or isinstance(r, GroupRecord) for r in out)
    assert backend.group_outcomes(g, 0, 3) == [b"a", b"b", b"c"]
    assert backend.store_and_record([], [("g-none", "g-none.0", 0, True, b"", None),
                                         ("g-none", "g-none.1", 1, True, b"", None)], brief=True) == [None, None]


# -- completions acked before they ran (store_record_and_ack, group_completions_due) ------------
def _sharing_broker(backend, request):
    """A broker of the same kind on the backend's own store, or None (the kind has no broker,
    or its factory makes one on another store)."""
    from tests.contract.conftest import _BROKERS
    kind = request.node.callspec.params["make_backend"]
    if kind not in _BROKERS:
        return None
    broker = _BROKERS[kind](request)
    request.addfinalizer(broker.close)
    return broker if backend.shares_store_with(broker) else None


def _leased(broker, ids: list[str], queue: str = "cq") -> dict:
    from stem.brokers import Message
    broker.publish_many([Message(t, queue, b"frame-" + t.encode()) for t in ids])
    out: dict = {}
    deadline = time.monotonic() + 10
    while len(out) < len(ids) and time.monotonic() < deadline:
        out.update((d.task_id, d) for d in broker.consume([queue], len(ids), 0.2))
    assert len(out) == len(ids)
    return out


def test_nothing_is_noted_completing_by_the_counts_that_run_before_the_ack(backend):
    g = make(backend, 2)
    backend.group_seal(g)
    backend.group_record(g, f"{g}.0", 0, True, b"a")
    from stem.results import TaskState, TaskStatus
    [done] = backend.store_and_record([TaskStatus(id=f"{g}.1", state=TaskState.SUCCEEDED, result=2)],
                                      [(g, f"{g}.1", 1, True, b"b", None)], brief=True)
    assert done.complete
    assert backend.group_completions_due(time.time() + 3600) == []
    backend.group_completed([g, "g-unknown"])          # unknown or not noted: no error
    for before, limit in ((float("nan"), 1), ("soon", 1), (None, 1), (time.time(), 0), (time.time(), True)):
        with pytest.raises(ConfigurationError):
            backend.group_completions_due(before, limit)
    with pytest.raises(ConfigurationError):
        backend.group_completed([""])


def test_a_completion_acked_with_its_last_member_stays_noted_until_marked_done(backend, request):
    """Where the adapter acks a member with its count (a single Redis), the group that count
    completes is noted, by the time of the call, until ``group_completed``; elsewhere the call
    answers None and does nothing (the caller completes before it acks)."""
    from stem.results import TaskState, TaskStatus
    broker = _sharing_broker(backend, request)
    g = make(backend, 2)
    backend.group_seal(g)
    ids = [f"{g}.0", f"{g}.1"]
    leased = _leased(broker, ids + [f"{g}.next"]) if broker is not None else {}
    s0 = TaskStatus(id=ids[0], state=TaskState.SUCCEEDED, result=0)
    first = backend.store_record_and_ack([s0], [(g, ids[0], 0, True, b"a", None)], broker,
                                         [leased[ids[0]]] if leased else [])
    if first is None:
        assert backend.group_get(g).finished == 0 and backend.get(ids[0]) is None     # nothing done
        return
    assert first == ([True], None) or (first[0][0].finished == 1 and not first[0][0].complete)
    assert backend.get(ids[0]).result == 0
    assert backend.group_completions_due(time.time() + 3600) == []     # not complete: nothing noted
    before = time.time()
    records, refill = backend.store_record_and_ack([], [(g, ids[1], 1, True, b"b", None)], broker,
                                                   [leased[ids[1]]], ["cq"], 5, "contract")
    assert isinstance(records[0], GroupRecord) and records[0].complete
    assert refill == []                     # the third message is leased already: nothing to refill
    assert broker.stats("cq").in_flight == 1            # both members acked in the same call
    assert backend.group_completions_due(before - 1) == []
    [due] = backend.group_completions_due(time.time() + 1)
    assert (due.id, due.complete, due.finished) == (g, True, 2)
    assert backend.group_outcomes(g, 0, 2) == [b"a", b"b"]
    # counted again (a resend, a redelivery): no second note, the first time stays
    again, _ = backend.store_record_and_ack([], [(g, ids[1], 1, True, b"b", None)], broker, [])
    assert again[0].complete and len(backend.group_completions_due(time.time() + 1)) == 1
    backend.group_completed([g])
    assert backend.group_completions_due(time.time() + 3600) == []
    backend.group_completed([g])                        # twice: no error


def test_a_consume_rides_after_the_acks(backend, request):
    from stem.results import TaskState, TaskStatus
    broker = _sharing_broker(backend, request)
    if broker is None:
        pytest.skip("no broker on this backend's store")
    g = make(backend, 3)
    backend.group_seal(g)
    leased = _leased(broker, [f"{g}.0"])
    from stem.brokers import Message
    broker.publish(Message("later", "cq", b"later"))
    done = backend.store_record_and_ack([TaskStatus(id=f"{g}.0", state=TaskState.SUCCEEDED)],
                                        [(g, f"{g}.0", 0, True, b"a", None)], broker, [leased[f"{g}.0"]], ["cq"],
                                        5, "contract")
    if done is None:
        return
    records, refill = done
    assert records == [True] or not records[0].complete
    assert [d.task_id for d in refill] == ["later"]
    assert broker.stats("cq").in_flight == 1
    assert backend.store_record_and_ack([], [("g-none", "g-none.0", 0, True, b"", None)], broker, []) == (
        [None], None)


@pytest.mark.waits
def test_a_note_whose_record_expired_is_dropped(backend, request):
    broker = _sharing_broker(backend, request)
    if broker is None:
        pytest.skip("no broker on this backend's store")
    g = make(backend, 1)
    backend.group_seal(g)
    done = backend.store_record_and_ack([], [(g, f"{g}.0", 0, True, b"a", 0.2)], broker, [])
    if done is None:
        return
    assert done[0][0].complete                       # not held: its lifetime (0.2 s) starts now
    wait_for(lambda: backend.group_get(g) is None, timeout=5, what="the group to expire")
    assert backend.group_completions_due(time.time() + 1) == []
