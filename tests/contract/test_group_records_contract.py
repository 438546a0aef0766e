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


def make(backend, n: int, *, seal_by: float | None = None, ttl: float = 60.0, data: bytes = b"d") -> str:
    g = gid()
    assert backend.group_create(g, n, data, seal_by=time.time() + 60 if seal_by is None else seal_by, ttl=ttl)
    return g


def test_a_new_record_is_unsealed_with_nothing_finished(backend):
    g = make(backend, 3, data=b"\x00payload")
    r = backend.group_get(g)
    assert isinstance(r, GroupRecord)
    assert (r.id, r.expected, r.sealed, r.finished, r.succeeded, r.failed, r.interrupted, r.data) == (
        g, 3, False, 0, 0, 0, False, b"\x00payload")
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


@pytest.mark.waits
def test_a_group_never_expires_in_flight_and_expires_after_completion(backend):
    g = make(backend, 2, ttl=0.3)
    backend.group_record(g, f"{g}.0", 0, True, b"a")
    time.sleep(0.5)                      # longer than its ttl, but the group is not complete
    assert backend.group_get(g).finished == 1
    backend.group_seal(g)
    assert backend.group_record(g, f"{g}.1", 1, True, b"b").complete
    wait_for(lambda: backend.group_get(g) is None, timeout=5, what="the completed group to expire")
    assert backend.group_record(g, f"{g}.1", 1, True, b"b") is None     # a late redelivery creates nothing


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
    out = backend.store_and_record([s0], [(g, f"{g}.0", 0, True, b"one")], brief=True)
    assert out[0] is True or (isinstance(out[0], GroupRecord) and out[0].finished == 1)
    assert backend.get(f"{g}.0").result == 1
    [done] = backend.store_and_record([], [(g, f"{g}.1", 1, True, b"two")], brief=True)
    assert isinstance(done, GroupRecord) and done.complete        # completion is always answered in full
    h = make(backend, 2)
    [failed] = backend.store_and_record([], [(h, f"{h}.0", 0, False, b"x")], brief=True)
    assert isinstance(failed, GroupRecord) and failed.failed == 1  # so is a failure
    assert backend.store_and_record([], [("g-unknown", "g-unknown.0", 0, True, b"")], brief=True) == [None]
