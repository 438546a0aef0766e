"""Every result backend waits the same way: ``wait``, ``wait_many`` and ``watch`` (``stem/backends/base.py``).

Stores that race a wait are made from another thread at a moment the test does not
control: whichever side of the waiter's registration a store lands on, the wait must see
it (a status stored before is read, one stored after is announced), so no assertion
depends on that timing.  Latency bounds are loose (a notification, or one SQLite poll).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from stem.errors import ConfigurationError
from stem.results import TaskState, TaskStatus

# store -> waiter returns: a notification, or one poll (PostgreSQL's fallback polls each 1.0 s) plus
# the scheduling delay of a loaded 2-CPU machine running four test processes; never a timeout (20 s)
WAKE_BOUND_S = 1.5


def tid() -> str:
    return uuid.uuid4().hex


def ok(i: str, **kw) -> TaskStatus:
    return TaskStatus(id=i, state=TaskState.SUCCEEDED, **kw)


def failed(i: str) -> TaskStatus:
    return TaskStatus(id=i, state=TaskState.FAILED, error="boom")


_TIMERS: list[threading.Timer] = []


@pytest.fixture(autouse=True)
def _join_stores(backend):
    """Every ``store_later`` ends before the backend is closed (and its schema dropped): a
    store still running then fails in its thread."""
    yield
    while _TIMERS:
        _TIMERS.pop().join(30)


def store_later(backend, statuses, delay: float = 0.2) -> dict:
    """Store ``statuses`` from a timer thread; ``at["t"]`` is when the store began."""
    at: dict = {}

    def go():
        at["t"] = time.monotonic()
        backend.store_many(statuses)

    timer = threading.Timer(delay, go)
    _TIMERS.append(timer)
    timer.start()
    at["timer"] = timer
    return at


def test_a_status_stored_before_the_wait_is_returned_by_every_form(backend):
    a, b = tid(), tid()
    backend.store_many([ok(a, result=1), failed(b)])
    assert backend.wait(a, 5.0).result == 1
    assert set(backend.wait_many([a, b], 5.0)) == {a, b}
    assert [s.id for s in backend.watch([a, b], 5.0)] == [a, b]        # already terminal: input order


def test_a_wait_with_timeout_zero_is_a_read(backend):
    a, b = tid(), tid()
    backend.store(ok(a))
    assert set(backend.wait_many([a, b], 0)) == {a}
    assert backend.wait(b, 0) is None


def test_a_status_stored_while_waiting_wakes_the_waiter_without_a_polling_delay(backend):
    a = tid()
    at = store_later(backend, [ok(a, result=7)])
    got = backend.wait_many([a], 20.0)
    woke = time.monotonic()
    assert got[a].result == 7
    assert woke - at["t"] < WAKE_BOUND_S


@pytest.mark.waits
def test_wait_returns_the_latest_non_terminal_status_at_its_timeout(backend):
    a = tid()
    backend.store(TaskStatus(id=a, state=TaskState.RUNNING))
    t0 = time.monotonic()
    assert backend.wait(a, 0.3).state is TaskState.RUNNING
    assert time.monotonic() - t0 >= 0.25


@pytest.mark.waits
def test_all_waits_for_every_id(backend):
    a, b, c = tid(), tid(), tid()
    backend.store(ok(a))
    at = store_later(backend, [ok(b)], 0.1)
    t0 = time.monotonic()
    got = backend.wait_many([a, b, c], 0.8)                 # c never finishes: ALL times out
    assert set(got) == {a, b}
    assert time.monotonic() - t0 >= 0.75
    at["timer"].join()
    at2 = store_later(backend, [failed(c)], 0.1)
    got = backend.wait_many([a, b, c], 20.0)
    assert set(got) == {a, b, c} and got[c].state is TaskState.FAILED
    assert time.monotonic() - at2["t"] < WAKE_BOUND_S


def test_first_completed_returns_once_one_is_terminal(backend):
    a, b = tid(), tid()
    at = store_later(backend, [ok(b)])
    got = backend.wait_many([a, b], 20.0, return_when="FIRST_COMPLETED")
    assert list(got) == [b]
    assert time.monotonic() - at["t"] < WAKE_BOUND_S


@pytest.mark.waits
def test_first_exception_returns_on_the_first_failure_or_when_all_are_done(backend):
    a, b, c = tid(), tid(), tid()
    backend.store(ok(a))
    for state in (TaskState.FAILED, TaskState.DEAD, TaskState.REVOKED):
        i = tid()
        at = store_later(backend, [TaskStatus(id=i, state=state)])
        got = backend.wait_many([a, b, i], 20.0, return_when="FIRST_EXCEPTION")   # b never finishes
        assert set(got) == {a, i} and got[i].state is state
        assert time.monotonic() - at["t"] < WAKE_BOUND_S
    store_later(backend, [ok(b), ok(c)])
    got = backend.wait_many([a, b, c], 20.0, return_when="FIRST_EXCEPTION")           # no failure: all
    assert set(got) == {a, b, c}


def test_watch_yields_each_id_once_in_completion_order(backend):
    ids = [tid() for _ in range(4)]
    order = [ids[2], ids[0], ids[3], ids[1]]
    backend.store(ok(order[0]))
    seen = []
    for status in backend.watch(ids + [ids[0]], 20.0):            # a duplicate id counts once
        seen.append(status.id)
        backend.store(ok(status.id, result="again"))              # a second store of it: not yielded again
        if len(seen) < len(order):
            backend.store(ok(order[len(seen)]))                   # the next one finishes only now
    assert seen == order


@pytest.mark.waits
def test_watch_stops_at_its_timeout_with_what_came(backend):
    a, b = tid(), tid()
    backend.store(ok(a))
    t0 = time.monotonic()
    assert [s.id for s in backend.watch([a, b], 0.5)] == [a]
    assert 0.45 <= time.monotonic() - t0 < 5.0


def test_an_abandoned_watch_leaves_other_waits_working(backend):
    a, b = tid(), tid()
    backend.store(ok(a))
    it = backend.watch([a, b], 20.0)
    assert next(it).id == a
    it.close()                                                    # b is still waited on by nobody
    at = store_later(backend, [ok(b)])
    assert set(backend.wait_many([b], 20.0)) == {b}
    assert time.monotonic() - at["t"] < WAKE_BOUND_S


def test_nothing_to_wait_on_returns_at_once(backend):
    assert backend.wait_many([], 20.0) == {}
    assert list(backend.watch([], 20.0)) == []


def test_thousands_of_ids_in_one_wait(backend):
    ids = [tid() for _ in range(5000)]
    backend.store_many([ok(i) for i in ids[:2500]])
    store_later(backend, [ok(i) for i in ids[2500:]])
    got = backend.wait_many(ids, 30.0)
    assert set(got) == set(ids)


def test_many_concurrent_waits_on_overlapping_ids_each_get_theirs(backend):
    ids = [tid() for _ in range(100)]
    results: dict = {}

    def one(n):
        results[n] = backend.wait(ids[n % len(ids)], 30.0)

    def many():
        results["many"] = backend.wait_many(ids, 30.0)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(200)] + [threading.Thread(target=many)]
    for t in threads:
        t.start()
    for n, i in enumerate(ids):                 # lands before, during and after registrations
        backend.store(ok(i, result=n))
    for t in threads:
        t.join(40)
    assert all(results[n].result == n % len(ids) for n in range(200))
    assert set(results["many"]) == set(ids)


def test_a_waiter_that_left_does_not_disturb_another_on_the_same_id(backend):
    a, b = tid(), tid()
    backend.store(ok(a))
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(backend.wait_many([a, b], 30.0)))
    t.start()
    assert set(backend.wait_many([a, b], 30.0, return_when="FIRST_COMPLETED")) == {a}   # leaves b
    backend.store(ok(b))
    t.join(30)
    assert set(out) == {a, b}


@pytest.mark.parametrize("args", [
    ("one-id-as-a-string", 1.0), ([1, 2], 1.0), ([""], 1.0), (["x" * 201], 1.0), ([None], 1.0),
    (["a"], -1.0), (["a"], float("nan")), (["a"], "1"), (["a"], 1.0, "ANY"), (["a"], 1.0, None)])
def test_bad_arguments_raise_a_configuration_error_before_waiting(backend, args):
    with pytest.raises(ConfigurationError):
        backend.wait_many(*args)
    if len(args) == 2:
        with pytest.raises(ConfigurationError):
            backend.watch(*args)             # at the call, not at the first next()


def test_a_watch_dropped_before_its_first_next_unregisters_its_ids(backend):
    a = tid()
    it = backend.watch([a], 20.0)
    assert a in backend._waits.waited_ids()
    del it
    assert backend._waits.waited_ids() == []
