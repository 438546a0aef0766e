"""Producers and workers on one store, across processes: every task runs exactly once while
nothing crashes, a killed worker's tasks are completed by another, and a lease is renewed for
as long as its task runs.  "Ran" is read from the ledger the tasks write (``tests.apps.e2e``),
outcomes from the backend, queue counts from ``broker.stats``."""

from __future__ import annotations

import pytest

from stem import TaskState
from tests.support import all_succeeded

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once

IDLE = (0, 0, 0, 0)     # QueueStats without the name: ready, in flight, delayed, dead


def effects(ledger, n: int, **kw) -> list[tuple[str, dict]]:
    return [("e2e.effect", {"n": i, "ledger": str(ledger), **kw}) for i in range(n)]


def test_wait_for_task_in_the_producer_returns_the_result_of_a_worker_process(process_store, fleet):
    fleet.process(process_store)
    stem = process_store.producer()
    task_id = stem.enqueue("e2e.add", args={"a": 2, "b": 3})
    status = stem.wait_for_task(task_id, timeout=30)
    assert status.state is TaskState.SUCCEEDED and status.result == 5


def two_workers_run_each_task_once(store, fleet, ledger, n: int) -> None:
    fleet.process(store, label="a")
    fleet.process(store, label="b")
    stem = store.producer()
    ids: list[str] = []
    for i in range(0, n, 500):                      # the workers are already taking them
        ids += stem.enqueue_many(effects(ledger, min(500, n - i)))
    fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 120, f"{n} tasks SUCCEEDED")
    assert set(ledger.ran()) == set(ids)
    assert ledger.twice() == [], "tasks ran twice with nothing crashing"
    by_worker = ledger.by_worker()
    assert set(by_worker) == {"a", "b"} and min(by_worker.values()) > 0, by_worker
    # a status is stored before its ack (result, then ack): the queue empties a moment after
    fleet.wait_for(lambda: stem.broker.stats("default")[1:5] == IDLE, 10, "the last ack")


@pytest.mark.timeout(150)
def test_two_worker_processes_and_a_producer_on_one_store_run_each_of_5000_tasks_exactly_once(
        process_store, fleet, ledger):
    two_workers_run_each_task_once(process_store, fleet, ledger, 5000)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_worker_processes_and_a_producer_on_one_store_run_each_of_50000_tasks_exactly_once(
        process_store, fleet, ledger):
    two_workers_run_each_task_once(process_store, fleet, ledger, 50_000)


@pytest.mark.timeout(150)
def test_a_killed_workers_tasks_are_completed_by_another_worker_after_the_visibility_timeout(
        process_store, fleet, ledger):
    """kill -9 once a fifth of 600 tasks ran; a second worker completes every one."""
    n, concurrency, vt = 600, 2, 1.0
    stem = process_store.producer()
    ids = stem.enqueue_many(effects(ledger, n, sleep=0.004))
    victim = fleet.process(process_store, concurrency=concurrency, visibility_timeout=vt, label="victim")
    fleet.wait_for(lambda: ledger.total() >= n // 5, 60, "a fifth of the tasks to run")
    victim.kill()
    assert ledger.total() < n, "the victim ran everything before it was killed"
    assert stem.broker.stats("default").in_flight > 0, "nothing was left leased to the dead worker"
    fleet.process(process_store, concurrency=concurrency, visibility_timeout=vt, label="rescuer")
    fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 90, "every task SUCCEEDED")
    assert set(ledger.ran()) == set(ids)
    # Only a task the victim ran but had not settled when it died can run again: at most its
    # concurrency x the default prefetch_multiplier (4).  Settled outcomes never run twice.
    held = concurrency * 4
    twice = ledger.twice()
    assert len(twice) <= held, f"{len(twice)} tasks ran twice; only the victim's unsettled ones (<= {held}) may"
    # a status is stored before its ack (result, then ack): the queue empties a moment after
    fleet.wait_for(lambda: stem.broker.stats("default")[1:5] == IDLE, 10, "the last ack")


@pytest.mark.timeout(60)
def test_a_long_task_runs_exactly_once_while_its_lease_is_renewed(store, fleet, ledger):
    """The task runs for twice its visibility timeout while a second worker keeps asking for work."""
    for _ in range(2):
        fleet.in_process(store, visibility_timeout=1.0)
    stem = store.producer()
    task_id = stem.enqueue("e2e.effect", args={"n": 7, "ledger": str(ledger), "sleep": 2.0})
    status = stem.wait_for_task(task_id, timeout=30)
    assert status.state is TaskState.SUCCEEDED and status.result == 7
    assert ledger.ran() == {task_id: 1}
    # a status is stored before its ack (result, then ack): the queue empties a moment after
    fleet.wait_for(lambda: stem.broker.stats("default")[1:5] == IDLE, 10, "the last ack")
