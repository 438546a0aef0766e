"""Purge across processes, on every store a worker process can share: a purging process
(``tests/apps/purger.py``, running ``Stem.purge`` as ``stem purge`` does) ends every purged
task REVOKED ``purged``; the waiters in this process wake, a chord with purged members ends
(FAILED, or its callback runs in a worker process with ``MemberFailure`` entries), and a
purge killed with SIGKILL after its first page, run again, leaves every task REVOKED, none
lost and none run (the ledger says what ran)."""

from __future__ import annotations

import json
import sys
import threading

import pytest

from stem import Stem, TaskOptions, TaskState
from stem.brokers.base import Message
from stem.canvas import MemberFailure, Signature, chord, group

PARKED = "parked"          # the purged queue: no worker consumes it


def purger(fleet, store, *, batch: int, stall: str | None = None, label: str = "purger"):
    config = {**store.config(), "queue": PARKED, "batch": batch, "stall": stall}
    return fleet.start([sys.executable, "-m", "tests.apps.purger", json.dumps(config)], label=label,
                       ready="PURGE-STALLED" if stall else None)


def finished(fleet, proc, timeout: float = 120.0) -> dict:
    """The report of a purger run to its end."""
    proc.expect_exit = True
    fleet.wait_for(lambda: proc.returncode is not None, timeout, f"{proc.label} to finish")
    assert proc.returncode == 0, proc.output()
    return json.loads(proc.lines("PURGE-DONE")[0].split(" ", 1)[1])


def parked(ledger, n: int, offset: int = 0) -> list[Signature]:
    return [Signature("e2e.effect", {"n": offset + i, "ledger": str(ledger)}, TaskOptions(queue=PARKED))
            for i in range(n)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stall", ["after_store", "after_drop"])
def test_a_purge_killed_after_its_first_page_then_run_again_revokes_every_task_and_runs_none(
        process_store, fleet, ledger, stall):
    stem = process_store.producer()
    plain = [stem.enqueue("e2e.effect", {"n": i, "ledger": str(ledger)}, options=TaskOptions(queue=PARKED))
             for i in range(200)]
    h = stem.apply(chord(group(parked(ledger, 30)), Signature("e2e.collect", {"ledger": str(ledger)})))
    stem.broker.publish_many([Message(f"garbage-{i}", PARKED, b"\x00not a frame\xff") for i in range(3)])
    total = len(plain) + 30 + 3
    ledger_before = ledger.total()
    chord_waiter, woken = threading.Thread(target=lambda: woken.append(h.wait(180))), []
    victim = purger(fleet, process_store, batch=50, stall=stall, label="victim")
    victim.kill()                                                   # kill -9 after the first page
    # from now on a worker consumes the purged queue: it would run whatever left the holding area
    fleet.process(process_store, queues=[PARKED, "default"], label="worker")
    chord_waiter.start()
    backend = stem.backend
    revoked = [i for i in plain if (s := backend.get(i)) is not None and s.state is TaskState.REVOKED]
    assert len(revoked) == 50                                       # the first page, in publish order
    assert stem.broker.stats(PARKED).ready == 0                     # the rest held: no worker gets them
    held = len(stem.broker.purge_held(PARKED, 10_000))
    assert held == (total if stall == "after_store" else total - 50)
    report = finished(fleet, purger(fleet, process_store, batch=50, label="again"))
    assert report["purged"] == held and report["unreadable"] == 3
    assert report["kept"] == (50 if stall == "after_store" else 0)  # the page stored before the kill
    for task_id in [*plain, *(f"{h.id}.{i}" for i in range(30))]:
        status = stem.get_status(task_id)
        assert (status.state, status.reason) == (TaskState.REVOKED, "purged"), task_id
    chord_waiter.join(180)
    assert woken and (woken[0].state, woken[0].reason) == (TaskState.FAILED, "dependency-failed")
    assert h.progress() == (30, 30)
    assert stem.broker.purge_held(PARKED) == []
    assert ledger.total() == ledger_before == 0, "a purged task ran"


@pytest.mark.timeout(180)
def test_purge_wakes_plain_waiters_and_a_continue_chord_runs_its_callback_with_member_failures(
        process_store, fleet, ledger):
    fleet.process(process_store, label="worker")          # the default queue: the callback, one member
    stem = process_store.producer()
    plain = stem.enqueue("e2e.add", {"a": 1, "b": 2}, options=TaskOptions(queue=PARKED))
    members = [*parked(ledger, 2), Signature("e2e.add", {"a": 20, "b": 1}), *parked(ledger, 2, offset=2)]
    h = stem.apply(chord(group(members), Signature("e2e.collect"), on_failure="continue"))
    assert stem.wait_for_task(f"{h.id}.2", timeout=60).result == 21
    waiters = Stem(process_store.broker(), process_store.backend())
    woken: dict = {}
    threads = [threading.Thread(target=lambda i=i: woken.__setitem__(i, waiters.wait_for_task(i, timeout=120)))
               for i in (plain, h.id)]
    for t in threads:
        t.start()
    report = finished(fleet, purger(fleet, process_store, batch=2))
    assert (report["purged"], report["revoked"]) == (5, 5)
    for t in threads:
        t.join(120)
    assert (woken[plain].state, woken[plain].reason) == (TaskState.REVOKED, "purged")
    status = woken[h.id]
    assert status.state is TaskState.SUCCEEDED, status
    results = status.result
    assert results[2] == 21
    for index in (0, 1, 3, 4):
        failure = MemberFailure(*results[index])
        assert (failure.id, failure.state, failure.reason) == (f"{h.id}.{index}", "REVOKED", "purged")
    assert ledger.total() == 0
