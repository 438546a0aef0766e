"""Every result backend runs these cases: the semantics in ``stem/backends/base.py``."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from stem.errors import ConfigurationError
from stem.results import TaskState, TaskStatus


def tid() -> str:
    return uuid.uuid4().hex


def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_stored_status_reads_back_with_every_field(backend):
    s = TaskStatus(id=tid(), state=TaskState.SUCCEEDED, name="email.send", queue="default", attempt=2,
                   result={"ok": [1, 2, "three"]}, meta={"trace": "x"}, reason=None,
                   started_at=1.5, finished_at=2.5, worker="w1")
    backend.store(s)
    got = backend.get(s.id)
    assert got == s


def full_status(i: str, state: TaskState, **fields) -> TaskStatus:
    """A status with every field set (more than 15: a msgpack map16), as a worker stores a
    failed canvas task that enqueued children."""
    values = dict(name="report.build", queue="reports", attempt=3, result={"partial": [1, 2]}, error="boom",
                  error_type="ValueError", reason="error", traceback="Traceback ...", meta={"trace": "x"},
                  progress=0.75, started_at=10.5, finished_at=12.25, updated_at=12.5, worker="host:1:w", ttl=3600.0,
                  enqueued_at=9.75, parent_id="parent-1", root_id="root-1", group_id="grp-1",
                  children=["child-1", "child-2"], args={"account": 7, "password": "***", "rows": [1, 2, 3]})
    values.update(fields)
    return TaskStatus(id=i, state=state, **values)


def test_where_a_task_came_from_and_its_shown_arguments_read_back(backend):
    one, many, running = tid(), tid(), tid()
    backend.store(full_status(one, TaskState.FAILED))
    backend.store_many([full_status(many, TaskState.SUCCEEDED, error=None, error_type=None, reason=None,
                                    traceback=None)])
    backend.store_if_not_terminal([full_status(running, TaskState.RUNNING, result=None, error=None)])
    for i, state in ((one, TaskState.FAILED), (many, TaskState.SUCCEEDED), (running, TaskState.RUNNING)):
        got = backend.get(i)
        assert got.state is state
        assert (got.enqueued_at, got.parent_id, got.root_id, got.group_id, got.children, got.args) == (
            9.75, "parent-1", "root-1", "grp-1", ["child-1", "child-2"],
            {"account": 7, "password": "***", "rows": [1, 2, 3]})
    assert backend.get(one) == full_status(one, TaskState.FAILED)
    assert backend.get_many([many])[0] == backend.get(many)


def test_store_if_not_terminal_never_replaces_a_terminal_status_with_every_field_set(backend):
    ids = {state: tid() for state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.REVOKED, TaskState.DEAD)}
    backend.store_many([full_status(i, state) for state, i in ids.items()])
    backend.store_if_not_terminal([full_status(i, TaskState.RUNNING) for i in ids.values()])
    assert {state: backend.get(i).state for state, i in ids.items()} == {s: s for s in ids}
    queued = tid()
    backend.store(full_status(queued, TaskState.QUEUED))
    backend.store_if_not_terminal([full_status(queued, TaskState.RUNNING, progress=0.9)])
    assert (backend.get(queued).state, backend.get(queued).progress) == (TaskState.RUNNING, 0.9)


def test_failed_status_keeps_error_and_reason(backend):
    s = TaskStatus(id=tid(), state=TaskState.FAILED, error="boom", error_type="ValueError",
                   reason="hard-time-limit", traceback="Traceback ...")
    backend.store(s)
    got = backend.get(s.id)
    assert (got.error, got.error_type, got.reason, got.traceback) == ("boom", "ValueError", "hard-time-limit",
                                                                       "Traceback ...")


def test_unknown_task_reads_as_none(backend):
    assert backend.get(tid()) is None


def test_store_is_an_upsert(backend):
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.RUNNING))
    backend.store(TaskStatus(id=i, state=TaskState.SUCCEEDED, result=3))
    assert backend.get(i).state is TaskState.SUCCEEDED


def test_store_many_and_get_many(backend):
    ids = [tid() for _ in range(20)]
    backend.store_many([TaskStatus(id=i, state=TaskState.SUCCEEDED, result=n) for n, i in enumerate(ids)])
    got = backend.get_many(ids + [tid()])
    assert [g.result for g in got[:-1]] == list(range(20))
    assert got[-1] is None


def test_wait_returns_when_another_thread_stores_a_terminal_status(backend):
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.RUNNING))

    def finish():
        time.sleep(0.2)
        backend.store(TaskStatus(id=i, state=TaskState.SUCCEEDED, result="done"))

    t = threading.Thread(target=finish)
    t.start()
    t0 = time.monotonic()
    got = backend.wait(i, 20.0)
    t.join()
    assert got is not None and got.state is TaskState.SUCCEEDED and got.result == "done"
    assert time.monotonic() - t0 < 10.0


def test_wait_returns_at_once_for_an_already_finished_task(backend):
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.FAILED, error="x"))
    assert backend.wait(i, 5.0).state is TaskState.FAILED


@pytest.mark.waits
def test_wait_times_out_with_the_latest_non_terminal_status(backend):
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.RUNNING))
    t0 = time.monotonic()
    got = backend.wait(i, 0.3)
    assert got is not None and got.state is TaskState.RUNNING
    assert 0.2 <= time.monotonic() - t0 < 5.0
    assert backend.wait(tid(), 0.1) is None


def test_forget_drops_the_status(backend):
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.SUCCEEDED))
    backend.forget(i)
    assert backend.get(i) is None


@pytest.mark.waits
def test_statuses_expire_after_result_expires(make_backend):
    backend = make_backend(result_expires=1)
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.SUCCEEDED))
    assert backend.get(i) is not None
    assert wait_until(lambda: backend.get(i) is None, timeout=10.0)


def test_heartbeats_are_listed_and_removed(backend):
    backend.put_heartbeat("w-1", {"pid": 1, "queues": ["default"]}, ttl=30)
    backend.put_heartbeat("w-2", {"pid": 2, "queues": ["q"]}, ttl=30)
    beats = {b["worker_id"]: b for b in backend.heartbeats()}
    assert {"w-1", "w-2"} <= set(beats)
    assert beats["w-1"]["pid"] == 1 and beats["w-1"]["queues"] == ["default"]
    assert beats["w-1"]["seen_at"] > 0
    backend.remove_heartbeat("w-1")
    assert "w-1" not in {b["worker_id"] for b in backend.heartbeats()}


@pytest.mark.waits
def test_heartbeat_disappears_after_its_ttl(backend):
    backend.put_heartbeat("w-ttl", {"pid": 3}, ttl=1)
    assert any(b["worker_id"] == "w-ttl" for b in backend.heartbeats())
    assert wait_until(lambda: all(b["worker_id"] != "w-ttl" for b in backend.heartbeats()), timeout=10.0)


def test_revocations_are_remembered(backend):
    a, b, c = tid(), tid(), tid()
    backend.revoke([a, b])
    assert backend.revoked([a, c]) == {a}
    assert {a, b} <= backend.revoked()


@pytest.mark.waits
def test_revocations_expire(backend):
    a = tid()
    backend.revoke([a], expires=1)
    assert backend.revoked([a]) == {a}
    assert wait_until(lambda: backend.revoked([a]) == set(), timeout=10.0)


def test_store_if_not_terminal_stores_a_running_status_when_none_is_there(backend):
    i = tid()
    backend.store_if_not_terminal([TaskStatus(id=i, state=TaskState.RUNNING, progress=0.5)])
    got = backend.get(i)
    assert got.state is TaskState.RUNNING and got.progress == 0.5


def test_store_if_not_terminal_replaces_a_non_terminal_status(backend):
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.QUEUED))
    backend.store_if_not_terminal([TaskStatus(id=i, state=TaskState.RUNNING, progress=0.25)])
    assert backend.get(i).progress == 0.25


def test_store_if_not_terminal_never_replaces_a_terminal_status(backend):
    ids = {state: tid() for state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.REVOKED, TaskState.DEAD)}
    backend.store_many([TaskStatus(id=i, state=state, result=b"\x00bytes" if state is TaskState.SUCCEEDED else None)
                        for state, i in ids.items()])
    fresh = tid()
    backend.store_if_not_terminal([TaskStatus(id=i, state=TaskState.RUNNING) for i in ids.values()]
                                  + [TaskStatus(id=fresh, state=TaskState.RUNNING)])
    assert {state: backend.get(i).state for state, i in ids.items()} == {s: s for s in ids}
    assert backend.get(ids[TaskState.SUCCEEDED]).result == b"\x00bytes"
    assert backend.get(fresh).state is TaskState.RUNNING


def test_store_if_not_terminal_reads_the_state_behind_long_task_ids(backend):
    ids = [tid()[:20], tid() + "x" * 40, tid() + "y" * 300]      # msgpack fixstr, str8 and str16 ids
    backend.store_many([TaskStatus(id=i, state=TaskState.SUCCEEDED) for i in ids])
    backend.store_if_not_terminal([TaskStatus(id=i, state=TaskState.RUNNING) for i in ids])
    assert [backend.get(i).state for i in ids] == [TaskState.SUCCEEDED] * 3
    backend.store_many([TaskStatus(id=i, state=TaskState.QUEUED) for i in ids])
    backend.store_if_not_terminal([TaskStatus(id=i, state=TaskState.RUNNING) for i in ids])
    assert [backend.get(i).state for i in ids] == [TaskState.RUNNING] * 3


def test_store_if_not_terminal_refuses_terminal_statuses(backend):
    import pytest
    from stem.errors import ConfigurationError
    i = tid()
    with pytest.raises(ConfigurationError, match="use store|with store"):
        backend.store_if_not_terminal([TaskStatus(id=i, state=TaskState.SUCCEEDED)])
    assert backend.get(i) is None


@pytest.mark.waits
def test_store_if_not_terminal_does_not_wake_a_waiter(backend):
    i = tid()
    backend.store_if_not_terminal([TaskStatus(id=i, state=TaskState.RUNNING)])
    t0 = time.monotonic()
    got = backend.wait(i, 0.3)
    assert got.state is TaskState.RUNNING and time.monotonic() - t0 >= 0.2


def test_racing_conditional_running_stores_never_hide_the_result(backend):
    i = tid()
    backend.store(TaskStatus(id=i, state=TaskState.RUNNING))
    stop = threading.Event()

    def spam():
        while not stop.is_set():
            backend.store_if_not_terminal([TaskStatus(id=i, state=TaskState.RUNNING, progress=0.1)])

    t = threading.Thread(target=spam)
    t.start()
    try:
        time.sleep(0.05)
        backend.store(TaskStatus(id=i, state=TaskState.SUCCEEDED, result=1))
        time.sleep(0.1)
    finally:
        stop.set()
        t.join()
    assert backend.get(i).state is TaskState.SUCCEEDED


def test_revocations_keep_their_proofs_and_a_revoke_without_one_drops_it(backend):
    a, b, c = tid(), tid(), tid()
    backend.revoke([a, b, c], proofs=[b"proof-a", None, b"proof-c"])
    assert backend.revoked([a, b, c]) == {a, b, c}
    assert backend.revocation_proofs([a, b, c, tid()]) == {a: b"proof-a", c: b"proof-c"}
    backend.revoke([c])
    assert backend.revocation_proofs([a, c]) == {a: b"proof-a"}
    backend.revoke([a], proofs=[b"newer"])
    assert backend.revocation_proofs([a]) == {a: b"newer"}


@pytest.mark.waits
def test_revocation_proofs_expire_with_their_revocation(backend):
    a = tid()
    backend.revoke([a], expires=1, proofs=[b"p"])
    assert backend.revocation_proofs([a]) == {a: b"p"}
    assert wait_until(lambda: backend.revocation_proofs([a]) == {} and backend.revoked([a]) == set(), timeout=10.0)


def test_revoke_needs_one_proof_per_id(backend):
    import pytest
    from stem.errors import ConfigurationError
    a = tid()
    with pytest.raises(ConfigurationError, match="one per id"):
        backend.revoke([a, tid()], proofs=[b"only one"])
    with pytest.raises(ConfigurationError, match="bytes"):
        backend.revoke([a], proofs=["text"])
    assert backend.revoked([a]) == set()


@pytest.mark.parametrize("result_expires", [0, -1.0, True, float("inf"), "60"])
def test_a_backend_refuses_a_bad_result_expires_with_a_configuration_error(make_backend, result_expires):
    with pytest.raises(ConfigurationError, match="result_expires"):
        make_backend(result_expires=result_expires)


@pytest.mark.parametrize("ttl", [0, -5, float("nan"), True, "30"])
def test_put_heartbeat_refuses_a_ttl_that_is_not_positive_seconds(backend, ttl):
    with pytest.raises(ConfigurationError, match="ttl"):
        backend.put_heartbeat("w-bad", {"pid": 1}, ttl=ttl)
    assert backend.heartbeats() == []


@pytest.mark.parametrize("expires", [0, -1.0, float("inf"), False, "60"])
def test_revoke_refuses_an_expiry_that_is_not_positive_seconds(backend, expires):
    with pytest.raises(ConfigurationError, match="expires"):
        backend.revoke([tid()], expires=expires)
    assert backend.revoked() == set()


# -- lifetimes per status (TaskStatus.ttl, base.status_ttl) -------------------------------------
@pytest.mark.waits
def test_a_status_with_a_short_ttl_expires_while_one_without_lives_the_backend_default(backend):
    short, default = tid(), tid()
    backend.store_many([TaskStatus(id=short, state=TaskState.SUCCEEDED, result=1, ttl=0.3),
                        TaskStatus(id=default, state=TaskState.SUCCEEDED, result=2)])
    assert backend.get(short).ttl == 0.3                     # the lifetime is part of the record
    assert wait_until(lambda: backend.get(short) is None, timeout=10.0)
    assert backend.get(default).result == 2                  # result_expires: a day


@pytest.mark.waits
def test_a_status_with_a_long_ttl_outlives_the_backend_default(make_backend):
    backend = make_backend(result_expires=0.5)
    long, default = tid(), tid()
    backend.store(TaskStatus(id=long, state=TaskState.FAILED, error="boom", ttl=3600))
    backend.store(TaskStatus(id=default, state=TaskState.SUCCEEDED))
    assert wait_until(lambda: backend.get(default) is None, timeout=10.0)
    assert backend.get(long).error == "boom"
    assert backend.get_many([long, default])[0].state is TaskState.FAILED


@pytest.mark.waits
def test_failures_live_failure_ttl_and_successes_result_ttl(backend):
    from stem.envelope import Envelope
    env = Envelope(tid(), "t", result_ttl=3600.0, failure_ttl=0.3)
    failed = TaskStatus.of(env, TaskState.FAILED, error="boom")
    dead = TaskStatus.of(Envelope(tid(), "t", result_ttl=3600.0, failure_ttl=0.3), TaskState.DEAD)
    ok = TaskStatus.of(Envelope(tid(), "t", result_ttl=3600.0, failure_ttl=0.3), TaskState.SUCCEEDED, result=1)
    assert (failed.ttl, dead.ttl, ok.ttl) == (0.3, 0.3, 3600.0)
    backend.store_many([failed, dead, ok])
    assert wait_until(lambda: backend.get_many([failed.id, dead.id]) == [None, None], timeout=10.0)
    assert backend.get(ok.id).result == 1


@pytest.mark.waits
def test_a_failure_without_failure_ttl_lives_result_ttl(backend):
    from stem.envelope import Envelope
    failed = TaskStatus.of(Envelope(tid(), "t", result_ttl=0.3), TaskState.REVOKED, reason="revoked")
    assert failed.ttl == 0.3
    backend.store(failed)
    assert wait_until(lambda: backend.get(failed.id) is None, timeout=10.0)


@pytest.mark.waits
@pytest.mark.parametrize("how", ["store", "store_if_not_terminal"])
def test_a_status_a_task_passes_through_lives_at_least_result_expires_whatever_its_ttl(backend, how):
    running, clock = tid(), tid()
    status = TaskStatus(id=running, state=TaskState.RUNNING, progress=0.5, ttl=0.3)
    if how == "store":
        backend.store(status)
    else:
        backend.store_if_not_terminal([status])
    backend.store(TaskStatus(id=clock, state=TaskState.SUCCEEDED, ttl=0.3))   # the same ttl, terminal
    assert wait_until(lambda: backend.get(clock) is None, timeout=10.0)
    assert backend.get(running).progress == 0.5                               # result_expires: a day


@pytest.mark.waits
def test_a_terminal_status_replaces_a_running_one_with_its_own_lifetime(backend):
    i = tid()
    backend.store_if_not_terminal([TaskStatus(id=i, state=TaskState.RUNNING, ttl=3600)])
    backend.store(TaskStatus(id=i, state=TaskState.SUCCEEDED, ttl=0.3))
    assert wait_until(lambda: backend.get(i) is None, timeout=10.0)


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan"), float("inf"), True, "60"])
@pytest.mark.parametrize("how", ["store_many", "store_if_not_terminal"])
def test_a_bad_status_ttl_is_refused_and_nothing_of_the_call_is_stored(backend, ttl, how):
    good, bad = tid(), tid()
    state = TaskState.SUCCEEDED if how == "store_many" else TaskState.RUNNING
    with pytest.raises(ConfigurationError, match="ttl"):
        getattr(backend, how)([TaskStatus(id=good, state=state), TaskStatus(id=bad, state=state, ttl=ttl)])
    assert backend.get_many([good, bad]) == [None, None]
