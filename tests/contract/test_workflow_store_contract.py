"""Every workflow store against the contract in ``stem/workflows/store.py``.

``wf_store`` is a fresh, empty store of each kind the ``adapters_*.py`` modules name in
``WORKFLOW_STORES``.  A store shared across processes carries ``contract_recipe``:
``(factory, args, kwargs)`` that opens the same store in another process; the races run
in processes there, and in threads on a store that lives in one process (memory).
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import threading
import uuid

import pytest

from stem.errors import ConfigurationError
from stem.workflows.store import (CANCELLED, FAILED, NEEDS_ATTENTION, PARKED, PENDING, RUN_ID_MAX, RUNNING,
                                  SUCCEEDED, Event, JournalEntry, RunRecord)

T0 = 1_700_000_000.125      # the engine's clock: a fraction, as time.time() gives
LEASE = 30.0


def rid(prefix: str = "run") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def build(recipe):
    factory, args, kwargs = recipe
    return factory(*args, **kwargs)


def started(store, run_id: str | None = None, *, parent: str | None = None, now: float = T0) -> str:
    run_id = run_id or rid()
    created, _ = store.create(run_id, "order.fulfil", "1", b"input", now=now, parent=parent)
    assert created
    return run_id


def claimed(store, run_id: str | None = None, *, now: float = T0, lease: float = LEASE, **kw) -> RunRecord:
    run_id = run_id or started(store, now=now, **kw)
    rec = store.claim(run_id, "worker-a", now=now, lease=lease)
    assert rec is not None
    return rec


def parked(store, rec: RunRecord, *, wake_at: float | None = None, waits_for: str | None = None,
           waits_kind: str = "task", now: float = T0) -> None:
    assert store.park(rec.id, rec.epoch, wake_at=wake_at, waiting=b"w", waits_for=waits_for,
                      waits_kind=None if waits_for is None else waits_kind,
                      inbox_seen=store.get(rec.id).inbox_count, now=now) == "parked"


def reasons(store, *, now: float, limit: int = 500) -> list[tuple[str, str]]:
    """``due`` as (run id, reason) pairs: the cases below that are about which runs are due and why."""
    return [(due.run_id, due.reason) for due in store.due(now=now, limit=limit)]


def snapshot(store, *run_ids: str):
    """Everything a caller can read about the store: what a refused call must leave as it was."""
    return (store.runs(limit=1000), [store.journal(r) for r in run_ids], [store.events(r) for r in run_ids],
            store.due(now=T0 + 1e6, limit=1000), store.parked_on(limit=1000))


# -- create, get, runs ------------------------------------------------------------------------

def test_create_stores_a_pending_run_due_now_at_epoch_zero(wf_store):
    created, rec = wf_store.create("order-42", "order.fulfil", "1", b"\x00in\xff", now=T0)
    assert created is True
    assert isinstance(rec, RunRecord)
    assert rec == RunRecord("order-42", "order.fulfil", "1", b"\x00in\xff", PENDING, 0, None, None, T0, None,
                            None, 0, 0, None, None, None, None, 0, T0, T0)
    assert wf_store.get("order-42") == rec
    assert not rec.terminal
    assert reasons(wf_store, now=T0) == [("order-42", "start")]


def test_a_second_create_is_a_no_op_that_returns_the_first_run_whatever_its_input(wf_store):
    _, first = wf_store.create("r1", "order.fulfil", "1", b"first", now=T0)
    created, rec = wf_store.create("r1", "other.name", "2", b"second", now=T0 + 5, parent="p")
    assert created is False
    assert rec == first
    assert wf_store.get("r1") == first


def test_create_of_a_run_that_moved_on_returns_it_as_it_is_now(wf_store):
    rec = claimed(wf_store)
    created, again = wf_store.create(rec.id, "order.fulfil", "1", b"input", now=T0 + 1)
    assert created is False
    assert again == wf_store.get(rec.id) == rec
    assert again.status == RUNNING and again.epoch == 1


def test_create_keeps_the_parent(wf_store):
    parent = started(wf_store)
    child = started(wf_store, parent=parent)
    assert wf_store.get(child).parent == parent
    assert wf_store.get(parent).parent is None


def test_payloads_keep_every_byte_and_bytes_like_inputs_are_stored_as_bytes(wf_store):
    data = bytes(range(256)) * 40
    wf_store.create("r-bytes", "n", "1", data, now=T0)
    assert wf_store.get("r-bytes").input == data
    wf_store.create("r-ba", "n", "1", bytearray(b"ba"), now=T0)
    wf_store.create("r-mv", "n", "1", memoryview(b"mv"), now=T0)
    wf_store.create("r-empty", "n", "1", b"", now=T0)
    got = {r: wf_store.get(r).input for r in ("r-ba", "r-mv", "r-empty")}
    assert got == {"r-ba": b"ba", "r-mv": b"mv", "r-empty": b""}
    assert all(type(v) is bytes for v in got.values())


def test_get_of_an_absent_run_is_none_and_its_journal_and_events_are_empty(wf_store):
    assert wf_store.get("absent") is None
    assert wf_store.journal("absent") == []
    assert wf_store.events("absent") == []
    assert wf_store.runs() == []


def test_run_ids_of_the_longest_length_and_any_alphabet_are_kept(wf_store):
    long_id = "x" * RUN_ID_MAX
    odd = "Az09_.:-/ {é}✓"
    for r in (long_id, odd):
        started(wf_store, r)
        rec = claimed(wf_store, r)
        assert wf_store.append(r, rec.epoch, 0, "step", "a", output=b"o", now=T0)
        assert wf_store.send(r, "t", "e", b"p", now=T0)[0]
        assert wf_store.get(r).id == r
        assert len(wf_store.journal(r)) == 1 and len(wf_store.events(r)) == 1


def test_runs_are_listed_by_id_filtered_by_status_and_name_and_paged(wf_store):
    ids = [f"r{n:02d}" for n in range(12)]
    for n, r in enumerate(reversed(ids)):
        wf_store.create(r, "a" if n % 2 else "b", "1", b"", now=T0)
    claimed(wf_store, "r03")
    claimed(wf_store, "r07")
    assert [r.id for r in wf_store.runs()] == ids
    assert [r.id for r in wf_store.runs(status=RUNNING)] == ["r03", "r07"]
    assert [r.id for r in wf_store.runs(status=PENDING, limit=3)] == ["r00", "r01", "r02"]
    assert [r.id for r in wf_store.runs(status=SUCCEEDED)] == []
    names = {r.id: r.name for r in wf_store.runs()}
    assert [r.id for r in wf_store.runs(name="a")] == [r for r in ids if names[r] == "a"]
    assert [r.id for r in wf_store.runs(name="a", status=RUNNING)] == [r for r in ("r03", "r07") if names[r] == "a"]
    assert [r.id for r in wf_store.runs(name="nope")] == []
    pages, after = [], None
    while True:
        page = wf_store.runs(limit=5, after=after)
        if not page:
            break
        pages.append([r.id for r in page])
        after = page[-1].id
    assert pages == [ids[:5], ids[5:10], ids[10:]]
    assert [r.id for r in wf_store.runs(after="r05x")] == ids[6:]
    assert wf_store.runs(after="r11") == []


def test_run_ids_sort_as_python_sorts_strings_not_as_numbers_nor_by_a_locale(wf_store):
    ids = ["10", "9", "100", "1", "a-b", "ab", "a_b", "B", "b", "é", "z", "Z-1", "ä"]
    for r in ids:
        started(wf_store, r)
    assert [r.id for r in wf_store.runs()] == sorted(ids)
    assert [r.id for r in wf_store.runs(after="a-b", limit=3)] == sorted(ids)[sorted(ids).index("a-b") + 1:][:3]


# -- claim ------------------------------------------------------------------------------------

def test_claim_of_a_pending_run_makes_it_running_with_a_lease_and_epoch_plus_one(wf_store):
    r = started(wf_store)
    rec = wf_store.claim(r, "worker-a", now=T0 + 1, lease=LEASE)
    assert (rec.status, rec.epoch, rec.owner, rec.lease_until) == (RUNNING, 1, "worker-a", T0 + 1 + LEASE)
    assert (rec.wake_at, rec.waiting, rec.waits_for) == (None, None, None)
    assert rec.updated_at == T0 + 1 and rec.created_at == T0
    assert wf_store.get(r) == rec


def test_claim_of_a_parked_run_clears_its_due_marker_and_what_it_waited_for(wf_store):
    rec = claimed(wf_store)
    assert wf_store.park(rec.id, rec.epoch, wake_at=T0 + 50, waiting=b"timer", waits_for="task-1", waits_kind="task",
                         inbox_seen=0, now=T0) == "parked"
    again = wf_store.claim(rec.id, "worker-b", now=T0 + 60, lease=LEASE)
    assert (again.status, again.epoch, again.owner, again.lease_until) == (RUNNING, 2, "worker-b", T0 + 60 + LEASE)
    assert (again.wake_at, again.waiting, again.waits_for, again.waits_kind) == (None, None, None, None)
    assert wf_store.parked_on() == []


def test_a_parked_run_can_be_claimed_before_its_timer_is_due(wf_store):
    """The engine decides whether a wake-up is early (a duplicate wake message claims and parks again)."""
    rec = claimed(wf_store)
    parked(wf_store, rec, wake_at=T0 + 1000)
    assert wf_store.claim(rec.id, "w", now=T0 + 1, lease=LEASE).epoch == 2


def test_a_live_lease_refuses_every_other_claim_and_changes_nothing(wf_store):
    rec = claimed(wf_store, lease=10.0)
    before = wf_store.get(rec.id)
    for now in (T0, T0 + 5, T0 + 9.999):
        assert wf_store.claim(rec.id, "worker-b", now=now, lease=LEASE) is None
        assert wf_store.claim(rec.id, "worker-a", now=now, lease=LEASE) is None   # its own owner too
    assert wf_store.get(rec.id) == before


def test_an_expired_lease_is_claimable_at_its_exact_end(wf_store):
    rec = claimed(wf_store, lease=10.0)
    again = wf_store.claim(rec.id, "worker-b", now=T0 + 10.0, lease=LEASE)
    assert (again.epoch, again.owner, again.lease_until) == (2, "worker-b", T0 + 10.0 + LEASE)


@pytest.mark.parametrize("end", ["succeeded", "failed", "cancelled", "attention"])
def test_terminal_and_attention_runs_cannot_be_claimed(wf_store, end):
    rec = claimed(wf_store)
    if end == "succeeded":
        assert wf_store.finish(rec.id, rec.epoch, SUCCEEDED, result=b"r", now=T0)
    elif end == "failed":
        assert wf_store.finish(rec.id, rec.epoch, FAILED, error=b"e", now=T0)
    elif end == "cancelled":
        assert wf_store.cancel(rec.id, now=T0).status == CANCELLED
    else:
        assert wf_store.attention(rec.id, rec.epoch, "pos 0: step a != step b", now=T0)
    before = wf_store.get(rec.id)
    assert wf_store.claim(rec.id, "w", now=T0 + 1e6, lease=LEASE) is None
    assert wf_store.get(rec.id) == before


def test_claim_of_an_absent_run_is_none_and_creates_nothing(wf_store):
    assert wf_store.claim("absent", "w", now=T0, lease=LEASE) is None
    assert wf_store.get("absent") is None and wf_store.runs() == []


# -- renew ------------------------------------------------------------------------------------

def test_renew_extends_the_lease_of_the_claiming_epoch_only(wf_store):
    rec = claimed(wf_store, lease=10.0)
    assert wf_store.renew(rec.id, rec.epoch, now=T0 + 5, lease=20.0) is True
    assert wf_store.get(rec.id).lease_until == T0 + 25.0
    assert wf_store.claim(rec.id, "b", now=T0 + 24, lease=LEASE) is None
    assert wf_store.renew(rec.id, rec.epoch + 1, now=T0 + 6, lease=20.0) is False
    assert wf_store.renew(rec.id, rec.epoch - 1, now=T0 + 6, lease=20.0) is False
    assert wf_store.get(rec.id).lease_until == T0 + 25.0


def test_renew_after_the_lease_expired_works_until_another_activation_claims(wf_store):
    """The fence is the epoch, not the clock: a slow activation nobody overtook keeps its run."""
    rec = claimed(wf_store, lease=10.0)
    assert wf_store.renew(rec.id, rec.epoch, now=T0 + 11, lease=10.0) is True
    assert wf_store.get(rec.id).lease_until == T0 + 21
    other = wf_store.claim(rec.id, "b", now=T0 + 21, lease=10.0)
    assert other.epoch == rec.epoch + 1
    assert wf_store.renew(rec.id, rec.epoch, now=T0 + 22, lease=100.0) is False
    assert wf_store.get(rec.id) == other


def test_renew_is_refused_once_the_run_is_no_longer_running(wf_store):
    rec = claimed(wf_store)
    parked(wf_store, rec)
    assert wf_store.renew(rec.id, rec.epoch, now=T0, lease=LEASE) is False
    assert wf_store.get(rec.id).status == PARKED and wf_store.get(rec.id).lease_until is None
    assert wf_store.renew("absent", 1, now=T0, lease=LEASE) is False
    pending = started(wf_store)
    assert wf_store.renew(pending, 0, now=T0, lease=LEASE) is False


# -- the journal ------------------------------------------------------------------------------

def test_append_writes_at_the_journals_length_with_every_field_kept(wf_store):
    rec = claimed(wf_store)
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "charge", output=b"ch_1", now=T0 + 1)
    assert wf_store.append(rec.id, rec.epoch, 1, "step", "refund", error=b"boom", attempt=3, now=T0 + 2)
    assert wf_store.append(rec.id, rec.epoch, 2, "sleep", "sleep", now=T0 + 3)
    assert wf_store.append(rec.id, rec.epoch, 3, "step", "returns-none", output=None, now=T0 + 4)
    assert wf_store.append(rec.id, rec.epoch, 4, "step", "returns-empty", output=b"", error=b"", now=T0 + 5)
    got = wf_store.journal(rec.id)
    assert all(isinstance(e, JournalEntry) for e in got)
    assert got == [
        JournalEntry(0, "step", "charge", b"ch_1", None, 1, 1, T0 + 1),
        JournalEntry(1, "step", "refund", None, b"boom", 3, 1, T0 + 2),
        JournalEntry(2, "sleep", "sleep", None, None, 1, 1, T0 + 3),
        JournalEntry(3, "step", "returns-none", None, None, 1, 1, T0 + 4),
        JournalEntry(4, "step", "returns-empty", b"", b"", 1, 1, T0 + 5),
    ]
    assert type(got[0].output) is bytes


def test_the_journal_is_ordered_by_position_as_integers(wf_store):
    rec = claimed(wf_store)
    for p in range(12):
        assert wf_store.append(rec.id, rec.epoch, p, "step", f"x#{p}", output=str(p).encode(), now=T0 + p)
    got = wf_store.journal(rec.id)
    assert [e.position for e in got] == list(range(12))
    assert [e.name for e in got] == [f"x#{p}" for p in range(12)]      # x#2 before x#10
    assert [e.output for e in got] == [str(p).encode() for p in range(12)]


def test_append_at_any_other_position_is_refused_no_gaps_no_overwrite(wf_store):
    rec = claimed(wf_store)
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "a", output=b"first", now=T0)
    first = wf_store.journal(rec.id)
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "a", output=b"second", now=T0 + 1) is False
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "other", output=b"x", now=T0 + 1) is False
    assert wf_store.append(rec.id, rec.epoch, 2, "step", "gap", now=T0 + 1) is False
    assert wf_store.append(rec.id, rec.epoch, 1000, "step", "gap", now=T0 + 1) is False
    assert wf_store.journal(rec.id) == first


def test_a_stale_epoch_cannot_append_and_no_entry_ever_changes(wf_store):
    """The zombie: A's lease expired, B claimed, B appended; A comes back."""
    a = claimed(wf_store, lease=10.0)
    assert wf_store.append(a.id, a.epoch, 0, "step", "charge", output=b"A", now=T0 + 1)
    b = wf_store.claim(a.id, "worker-b", now=T0 + 11, lease=LEASE)
    assert b.epoch == a.epoch + 1
    assert wf_store.append(a.id, b.epoch, 1, "step", "ship", output=b"B", now=T0 + 12)
    seen = wf_store.journal(a.id)
    assert wf_store.append(a.id, a.epoch, 2, "step", "next", output=b"A2", now=T0 + 13) is False
    assert wf_store.append(a.id, a.epoch, 1, "step", "ship", output=b"A1", now=T0 + 13) is False
    assert wf_store.append(a.id, b.epoch + 1, 2, "step", "future", now=T0 + 13) is False
    assert wf_store.journal(a.id) == seen
    assert [(e.output, e.epoch) for e in seen] == [(b"A", a.epoch), (b"B", b.epoch)]


def test_append_is_refused_unless_the_run_is_running_at_that_epoch(wf_store):
    pending = started(wf_store)
    assert wf_store.append(pending, 0, 0, "step", "a", now=T0) is False
    assert wf_store.append("absent", 1, 0, "step", "a", now=T0) is False
    rec = claimed(wf_store)
    parked(wf_store, rec)
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "a", now=T0) is False
    done = claimed(wf_store)
    assert wf_store.finish(done.id, done.epoch, SUCCEEDED, result=b"", now=T0)
    assert wf_store.append(done.id, done.epoch, 0, "step", "a", now=T0) is False
    assert wf_store.journal(pending) == wf_store.journal(rec.id) == wf_store.journal(done.id) == []
    assert wf_store.get("absent") is None


def test_append_after_the_lease_expired_works_until_another_activation_claims(wf_store):
    rec = claimed(wf_store, lease=1.0)
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "slow", output=b"o", now=T0 + 100)
    assert len(wf_store.journal(rec.id)) == 1


def test_journals_of_runs_are_apart(wf_store):
    a, b = claimed(wf_store), claimed(wf_store)
    assert wf_store.append(a.id, a.epoch, 0, "step", "a0", now=T0)
    assert wf_store.append(b.id, b.epoch, 0, "step", "b0", now=T0)
    assert wf_store.append(a.id, a.epoch, 1, "step", "a1", now=T0)
    assert [e.name for e in wf_store.journal(a.id)] == ["a0", "a1"]
    assert [e.name for e in wf_store.journal(b.id)] == ["b0"]


# -- park -------------------------------------------------------------------------------------

def test_park_suspends_the_run_with_its_marker_and_frees_the_lease(wf_store):
    rec = claimed(wf_store)
    assert wf_store.park(rec.id, rec.epoch, wake_at=T0 + 172800, waiting=b"sleep", waits_for=None,
                         inbox_seen=0, now=T0 + 1) == "parked"
    got = wf_store.get(rec.id)
    assert (got.status, got.owner, got.lease_until, got.wake_at, got.waiting, got.waits_for, got.inbox_seen,
            got.epoch, got.updated_at) == (PARKED, None, None, T0 + 172800, b"sleep", None, 0, rec.epoch, T0 + 1)
    assert reasons(wf_store, now=T0 + 172800 - 0.001) == []
    assert reasons(wf_store, now=T0 + 172800) == [(rec.id, "timer")]


def test_park_without_a_timer_on_a_task_is_listed_by_parked_on(wf_store):
    rec = claimed(wf_store)
    assert wf_store.park(rec.id, rec.epoch, wake_at=None, waiting=None, waits_for="task-7", waits_kind="task",
                         inbox_seen=0, now=T0) == "parked"
    got = wf_store.get(rec.id)
    assert (got.wake_at, got.waiting, got.waits_for) == (None, None, "task-7")
    assert wf_store.parked_on() == [(rec.id, "task-7", "task")]
    assert wf_store.get(rec.id).waits_kind == "task"
    assert reasons(wf_store, now=T0 + 1e9) == []


def test_park_is_refused_with_inbox_when_an_event_arrived_unread(wf_store):
    rec = claimed(wf_store)
    assert wf_store.send(rec.id, "review", "ev-1", b"5 stars", now=T0)[0]
    before = wf_store.get(rec.id)
    assert wf_store.park(rec.id, rec.epoch, wake_at=None, waiting=b"wait review", waits_for=None, inbox_seen=0,
                         now=T0 + 1) == "inbox"
    assert wf_store.get(rec.id) == before          # nothing changed: still RUNNING under its lease
    assert before.status == RUNNING and before.inbox_count == 1
    assert wf_store.park(rec.id, rec.epoch, wake_at=None, waiting=b"wait more", waits_for=None, inbox_seen=1,
                         now=T0 + 1) == "parked"
    assert wf_store.get(rec.id).inbox_seen == 1
    assert reasons(wf_store, now=T0 + 1e6) == []


def test_park_is_fenced_for_a_stale_epoch_or_a_run_no_longer_running(wf_store):
    a = claimed(wf_store, lease=1.0)
    b = wf_store.claim(a.id, "b", now=T0 + 2, lease=LEASE)
    assert wf_store.park(a.id, a.epoch, wake_at=None, waiting=None, waits_for=None, inbox_seen=0,
                         now=T0 + 3) == "fenced"
    assert wf_store.send(a.id, "t", "e", b"", now=T0 + 3)[0]
    # fenced wins over inbox: a stale activation learns it lost, not that it has mail
    assert wf_store.park(a.id, a.epoch, wake_at=None, waiting=None, waits_for=None, inbox_seen=0,
                         now=T0 + 3) == "fenced"
    assert wf_store.get(a.id).status == RUNNING and wf_store.get(a.id).owner == "b"
    parked(wf_store, b)
    assert wf_store.park(a.id, b.epoch, wake_at=None, waiting=None, waits_for=None, inbox_seen=1,
                         now=T0 + 4) == "fenced"
    assert wf_store.park("absent", 1, wake_at=None, waiting=None, waits_for=None, inbox_seen=0,
                         now=T0) == "fenced"


# -- finish, attention ------------------------------------------------------------------------

def test_finish_ends_the_run_in_one_terminal_state(wf_store):
    ok, bad = claimed(wf_store), claimed(wf_store)
    assert wf_store.finish(ok.id, ok.epoch, SUCCEEDED, result=b"done", now=T0 + 1) is True
    assert wf_store.finish(bad.id, bad.epoch, FAILED, error=b"trace", now=T0 + 1) is True
    got_ok, got_bad = wf_store.get(ok.id), wf_store.get(bad.id)
    assert (got_ok.status, got_ok.result, got_ok.error, got_ok.owner, got_ok.lease_until, got_ok.wake_at,
            got_ok.epoch, got_ok.updated_at) == (SUCCEEDED, b"done", None, None, None, None, ok.epoch, T0 + 1)
    assert (got_bad.status, got_bad.result, got_bad.error) == (FAILED, None, b"trace")
    assert got_ok.terminal and got_bad.terminal
    assert wf_store.finish(ok.id, ok.epoch, FAILED, error=b"again", now=T0 + 2) is False
    assert wf_store.get(ok.id) == got_ok
    assert reasons(wf_store, now=T0 + 1e9) == []


def test_a_result_of_none_and_an_empty_result_are_kept_apart(wf_store):
    a, b = claimed(wf_store), claimed(wf_store)
    wf_store.finish(a.id, a.epoch, SUCCEEDED, result=None, now=T0)
    wf_store.finish(b.id, b.epoch, SUCCEEDED, result=b"", now=T0)
    assert (wf_store.get(a.id).result, wf_store.get(b.id).result) == (None, b"")


def test_finish_is_fenced(wf_store):
    a = claimed(wf_store, lease=1.0)
    b = wf_store.claim(a.id, "b", now=T0 + 5, lease=LEASE)
    assert wf_store.finish(a.id, a.epoch, SUCCEEDED, result=b"zombie", now=T0 + 6) is False
    assert wf_store.get(a.id) == b
    parked(wf_store, b)
    assert wf_store.finish(a.id, b.epoch, SUCCEEDED, result=b"parked", now=T0 + 6) is False
    assert wf_store.finish("absent", 1, SUCCEEDED, now=T0) is False
    assert wf_store.get(a.id).status == PARKED


def test_finishing_a_child_sends_its_parent_a_child_event_in_the_same_step(wf_store):
    parent = claimed(wf_store)
    child = claimed(wf_store, started(wf_store, parent=parent.id))
    assert wf_store.park(parent.id, parent.epoch, wake_at=None, waiting=b"child", waits_for=child.id,
                         waits_kind="child", inbox_seen=0, now=T0) == "parked"
    assert wf_store.parked_on() == [(parent.id, child.id, "child")]
    assert reasons(wf_store, now=T0 + 1) == []
    assert wf_store.finish(child.id, child.epoch, SUCCEEDED, result=b"r", now=T0 + 2)
    evs = wf_store.events(parent.id)
    assert evs == [Event(1, "__child__", child.id, b"", T0 + 2)]
    assert wf_store.get(parent.id).inbox_count == 1
    assert reasons(wf_store, now=T0 + 2) == [(parent.id, "inbox")]
    assert wf_store.events(child.id) == []


def test_a_child_notifies_its_parent_once_however_often_it_ends(wf_store):
    parent = claimed(wf_store)
    child = claimed(wf_store, started(wf_store, parent=parent.id))
    assert wf_store.finish(child.id, child.epoch, FAILED, error=b"e", now=T0)
    again = wf_store.reset(child.id, 0, now=T0 + 1)                 # the operator retries it
    rec = wf_store.claim(child.id, "w", now=T0 + 1, lease=LEASE)
    assert rec.epoch == again.epoch + 1
    assert wf_store.finish(child.id, rec.epoch, SUCCEEDED, result=b"r", now=T0 + 2)
    assert [(e.topic, e.event_id) for e in wf_store.events(parent.id)] == [("__child__", child.id)]
    assert wf_store.get(parent.id).inbox_count == 1


def test_a_child_event_shares_the_parents_event_ids(wf_store):
    """(run, event id) is stored once: an event sent under the child's run id stands for its notice."""
    parent = claimed(wf_store)
    child = claimed(wf_store, started(wf_store, parent=parent.id))
    assert wf_store.send(parent.id, "user", child.id, b"sent", now=T0)[0]
    assert wf_store.finish(child.id, child.epoch, SUCCEEDED, result=b"", now=T0 + 1)
    assert wf_store.events(parent.id) == [Event(1, "user", child.id, b"sent", T0)]
    assert wf_store.get(parent.id).inbox_count == 1


def test_a_child_of_a_finished_or_absent_parent_still_finishes(wf_store):
    parent = claimed(wf_store)
    child = claimed(wf_store, started(wf_store, parent=parent.id))
    orphan = claimed(wf_store, started(wf_store, parent="no-such-parent"))
    assert wf_store.finish(parent.id, parent.epoch, SUCCEEDED, result=b"", now=T0)
    assert wf_store.finish(child.id, child.epoch, SUCCEEDED, result=b"", now=T0 + 1)
    assert wf_store.finish(orphan.id, orphan.epoch, SUCCEEDED, result=b"", now=T0 + 1)
    assert wf_store.events(parent.id) == [] and wf_store.get(parent.id).inbox_count == 0
    assert wf_store.get("no-such-parent") is None
    assert wf_store.get(child.id).status == wf_store.get(orphan.id).status == SUCCEEDED


def test_attention_parks_the_run_visible_with_its_reason_and_never_due(wf_store):
    rec = claimed(wf_store)
    reason = "position 3: the journal has step 'charge', the code called step 'refund'"
    assert wf_store.attention(rec.id, rec.epoch, reason, now=T0 + 1) is True
    got = wf_store.get(rec.id)
    assert (got.status, got.attention, got.owner, got.lease_until, got.wake_at, got.waiting, got.epoch) == (
        NEEDS_ATTENTION, reason, None, None, None, None, rec.epoch)
    assert not got.terminal
    assert wf_store.send(rec.id, "t", "e", b"", now=T0 + 2)[0] is True    # it still takes events
    assert reasons(wf_store, now=T0 + 1e9) == []
    assert [r.id for r in wf_store.runs(status=NEEDS_ATTENTION)] == [rec.id]
    assert wf_store.attention(rec.id, rec.epoch, "again", now=T0 + 3) is False
    assert wf_store.get(rec.id).attention == reason


def test_attention_is_fenced(wf_store):
    a = claimed(wf_store, lease=1.0)
    b = wf_store.claim(a.id, "b", now=T0 + 5, lease=LEASE)
    assert wf_store.attention(a.id, a.epoch, "stale", now=T0 + 6) is False
    assert wf_store.get(a.id) == b
    assert wf_store.attention("absent", 1, "x", now=T0) is False


# -- continue_as_new --------------------------------------------------------------------------

def test_continue_as_new_restarts_the_run_with_a_new_input_and_an_empty_journal(wf_store):
    rec = claimed(wf_store)
    for p in range(3):
        assert wf_store.append(rec.id, rec.epoch, p, "step", f"s{p}", output=b"o", now=T0)
    for n in range(1, 4):
        assert wf_store.send(rec.id, "t", f"e{n}", bytes([n]), now=T0)[0]
    assert wf_store.continue_as_new(rec.id, rec.epoch, b"next input", drop_events=[1, 2], now=T0 + 5) is True
    got = wf_store.get(rec.id)
    assert (got.status, got.epoch, got.generation, got.input, got.owner, got.lease_until, got.wake_at,
            got.waiting, got.inbox_count) == (PENDING, rec.epoch + 1, 1, b"next input", None, None, T0 + 5, None, 3)
    assert wf_store.journal(rec.id) == []
    assert [(e.seq, e.event_id) for e in wf_store.events(rec.id)] == [(3, "e3")]
    assert reasons(wf_store, now=T0 + 5) == [(rec.id, "start")]
    # the old activation is fenced; the next one starts the journal at 0
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "old", now=T0 + 6) is False
    nxt = wf_store.claim(rec.id, "w", now=T0 + 6, lease=LEASE)
    assert nxt.epoch == rec.epoch + 2 and nxt.generation == 1
    assert wf_store.append(rec.id, nxt.epoch, 0, "step", "s0", output=b"new", now=T0 + 6)
    assert wf_store.send(rec.id, "t", "e4", b"", now=T0 + 7)[1].inbox_count == 4     # seqs keep growing
    assert wf_store.send(rec.id, "t", "e3", b"", now=T0 + 7)[0] is False
    assert wf_store.continue_as_new(rec.id, nxt.epoch, b"third", drop_events=(), now=T0 + 8)
    assert wf_store.get(rec.id).generation == 2
    assert [e.seq for e in wf_store.events(rec.id)] == [3, 4]


def test_continue_as_new_is_fenced(wf_store):
    a = claimed(wf_store, lease=1.0)
    assert wf_store.append(a.id, a.epoch, 0, "step", "s", now=T0)
    b = wf_store.claim(a.id, "b", now=T0 + 5, lease=LEASE)
    assert wf_store.continue_as_new(a.id, a.epoch, b"x", drop_events=[], now=T0 + 6) is False
    assert wf_store.get(a.id) == b
    assert len(wf_store.journal(a.id)) == 1
    assert wf_store.continue_as_new("absent", 1, b"x", drop_events=[], now=T0) is False


# -- cancel, reset ----------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["pending", "running", "parked", "attention"])
def test_cancel_ends_a_run_that_is_not_terminal_and_fences_its_activation(wf_store, state):
    rec = wf_store.get(started(wf_store)) if state == "pending" else claimed(wf_store)
    if state == "parked":
        parked(wf_store, rec, wake_at=T0 + 10)
    elif state == "attention":
        wf_store.attention(rec.id, rec.epoch, "diverged", now=T0)
    got = wf_store.cancel(rec.id, now=T0 + 1)
    assert (got.status, got.epoch, got.owner, got.lease_until, got.wake_at, got.waiting, got.updated_at) == (
        CANCELLED, rec.epoch + 1, None, None, None, None, T0 + 1)
    assert wf_store.get(rec.id) == got
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "late", now=T0 + 2) is False
    assert wf_store.renew(rec.id, rec.epoch, now=T0 + 2, lease=LEASE) is False
    assert wf_store.finish(rec.id, rec.epoch, SUCCEEDED, now=T0 + 2) is False
    assert wf_store.park(rec.id, rec.epoch, wake_at=None, waiting=None, waits_for=None, inbox_seen=0,
                         now=T0 + 2) == "fenced"
    assert reasons(wf_store, now=T0 + 1e9) == [] and wf_store.parked_on() == []
    assert wf_store.send(rec.id, "t", "e", b"", now=T0 + 2) == (False, got)


def test_cancel_of_a_terminal_run_returns_it_unchanged_and_of_an_absent_one_none(wf_store):
    rec = claimed(wf_store)
    wf_store.finish(rec.id, rec.epoch, SUCCEEDED, result=b"r", now=T0)
    done = wf_store.get(rec.id)
    assert wf_store.cancel(rec.id, now=T0 + 1) == done
    assert wf_store.get(rec.id) == done
    cancelled = wf_store.cancel(started(wf_store), now=T0)
    assert wf_store.cancel(cancelled.id, now=T0 + 5) == cancelled
    assert wf_store.cancel("absent", now=T0) is None
    assert wf_store.get("absent") is None


def test_cancelling_a_child_notifies_its_parent(wf_store):
    parent = claimed(wf_store)
    parked(wf_store, parent)
    child = started(wf_store, parent=parent.id)
    wf_store.cancel(child, now=T0 + 1)
    assert wf_store.events(parent.id) == [Event(1, "__child__", child, b"", T0 + 1)]
    assert reasons(wf_store, now=T0 + 1) == [(parent.id, "inbox")]


@pytest.mark.parametrize("state", ["pending", "running", "parked", "attention", "succeeded", "failed", "cancelled"])
def test_reset_truncates_the_journal_and_makes_any_run_pending_due_now(wf_store, state):
    rec = claimed(wf_store)
    for p in range(5):
        assert wf_store.append(rec.id, rec.epoch, p, "step", f"s{p}", output=b"o", now=T0)
    if state == "pending":
        rec = wf_store.reset(rec.id, 5, now=T0)
    elif state == "parked":
        parked(wf_store, rec, wake_at=T0 + 100, waits_for="task")
    elif state == "attention":
        wf_store.attention(rec.id, rec.epoch, "diverged", now=T0)
    elif state == "succeeded":
        wf_store.finish(rec.id, rec.epoch, SUCCEEDED, result=b"r", now=T0)
    elif state == "failed":
        wf_store.finish(rec.id, rec.epoch, FAILED, error=b"e", now=T0)
    elif state == "cancelled":
        rec = wf_store.cancel(rec.id, now=T0)
    before = wf_store.get(rec.id)
    got = wf_store.reset(rec.id, 2, now=T0 + 7)
    assert (got.status, got.epoch, got.owner, got.lease_until, got.wake_at, got.waiting, got.waits_for,
            got.result, got.error, got.attention, got.updated_at) == (
        PENDING, before.epoch + 1, None, None, T0 + 7, None, None, None, None, None, T0 + 7)
    assert (got.input, got.generation, got.inbox_count, got.created_at) == (
        before.input, before.generation, before.inbox_count, before.created_at)
    assert wf_store.get(rec.id) == got
    assert [e.name for e in wf_store.journal(rec.id)] == ["s0", "s1"]
    assert reasons(wf_store, now=T0 + 7) == [(rec.id, "start")]
    assert wf_store.parked_on() == []
    # the activation that held it is fenced; the next one continues at position 2
    assert wf_store.append(rec.id, before.epoch, 2, "step", "stale", now=T0 + 8) is False
    nxt = wf_store.claim(rec.id, "w", now=T0 + 8, lease=LEASE)
    assert wf_store.append(rec.id, nxt.epoch, 2, "step", "s2-again", output=b"n", now=T0 + 8)
    assert wf_store.append(rec.id, nxt.epoch, 4, "step", "gap", now=T0 + 8) is False


def test_reset_past_the_end_keeps_the_journal_and_reset_to_zero_empties_it(wf_store):
    rec = claimed(wf_store)
    for p in range(3):
        wf_store.append(rec.id, rec.epoch, p, "step", f"s{p}", now=T0)
    assert wf_store.reset(rec.id, 10, now=T0).epoch == rec.epoch + 1
    assert len(wf_store.journal(rec.id)) == 3
    assert wf_store.reset(rec.id, 0, now=T0).epoch == rec.epoch + 2
    assert wf_store.journal(rec.id) == []
    assert wf_store.reset("absent", 0, now=T0) is None
    assert wf_store.get("absent") is None


def test_reset_keeps_the_journal_ordered_past_ten_entries(wf_store):
    rec = claimed(wf_store)
    for p in range(12):
        wf_store.append(rec.id, rec.epoch, p, "step", f"x#{p}", now=T0)
    wf_store.reset(rec.id, 10, now=T0)
    assert [e.position for e in wf_store.journal(rec.id)] == list(range(10))
    wf_store.reset(rec.id, 2, now=T0)
    assert [e.name for e in wf_store.journal(rec.id)] == ["x#0", "x#1"]


# -- events -----------------------------------------------------------------------------------

def test_send_stores_events_with_seqs_in_the_order_accepted(wf_store):
    r = started(wf_store)
    stored, rec = wf_store.send(r, "review", "rv-9", b"\x81stars\x05", now=T0 + 1)
    assert stored is True
    assert (rec.inbox_count, rec.updated_at, rec.status) == (1, T0 + 1, PENDING)
    assert wf_store.get(r) == rec
    wf_store.send(r, "payment", "pay-1", b"", now=T0 + 2)
    wf_store.send(r, "review", "rv-10", b"2", now=T0 + 3)
    got = wf_store.events(r)
    assert all(isinstance(e, Event) for e in got)
    assert got == [Event(1, "review", "rv-9", b"\x81stars\x05", T0 + 1), Event(2, "payment", "pay-1", b"", T0 + 2),
                   Event(3, "review", "rv-10", b"2", T0 + 3)]


def test_a_duplicate_event_id_is_stored_once_whatever_its_topic_or_payload(wf_store):
    r = started(wf_store)
    assert wf_store.send(r, "review", "ev", b"first", now=T0)[0] is True
    stored, rec = wf_store.send(r, "review", "ev", b"second", now=T0 + 1)
    assert stored is False and rec == wf_store.get(r) and rec.inbox_count == 1
    assert wf_store.send(r, "other", "ev", b"third", now=T0 + 1)[0] is False
    assert wf_store.events(r) == [Event(1, "review", "ev", b"first", T0)]
    other = started(wf_store)                    # event ids are per run
    assert wf_store.send(other, "review", "ev", b"x", now=T0)[0] is True


def test_send_to_an_absent_run_is_refused_and_creates_nothing(wf_store):
    assert wf_store.send("absent", "t", "e", b"", now=T0) == (False, None)
    assert wf_store.get("absent") is None and wf_store.events("absent") == []


@pytest.mark.parametrize("status", [SUCCEEDED, FAILED, CANCELLED])
def test_a_terminal_run_takes_no_events(wf_store, status):
    rec = claimed(wf_store)
    if status == CANCELLED:
        wf_store.cancel(rec.id, now=T0)
    else:
        wf_store.finish(rec.id, rec.epoch, status, now=T0)
    done = wf_store.get(rec.id)
    assert wf_store.send(rec.id, "t", "e", b"", now=T0 + 1) == (False, done)
    assert wf_store.events(rec.id) == [] and wf_store.get(rec.id) == done


def test_events_are_filtered_by_topic_and_seq_and_limited_oldest_first(wf_store):
    r = started(wf_store)
    for n in range(1, 13):
        wf_store.send(r, "a" if n % 3 else "b", f"e{n}", str(n).encode(), now=T0 + n)
    assert [e.seq for e in wf_store.events(r)] == list(range(1, 13))
    assert [e.seq for e in wf_store.events(r, "b")] == [3, 6, 9, 12]
    assert [e.seq for e in wf_store.events(r, "a", after_seq=4)] == [5, 7, 8, 10, 11]
    assert [e.seq for e in wf_store.events(r, "a", after_seq=4, limit=2)] == [5, 7]
    assert [e.seq for e in wf_store.events(r, limit=3)] == [1, 2, 3]
    assert [e.seq for e in wf_store.events(r, after_seq=9)] == [10, 11, 12]   # 10 after 9, as integers
    assert wf_store.events(r, after_seq=12) == []
    assert wf_store.events(r, "none") == []
    assert [e.payload for e in wf_store.events(r, "b", after_seq=3, limit=1)] == [b"6"]


# -- the sweeper ------------------------------------------------------------------------------

def test_due_lists_each_reason_once_and_nothing_that_needs_no_activation(wf_store):
    start = started(wf_store, "start", now=T0)
    later = started(wf_store, "start-later", now=T0 + 100)
    timer = claimed(wf_store, started(wf_store, "timer"))
    parked(wf_store, timer, wake_at=T0 + 5)
    sleeping = claimed(wf_store, started(wf_store, "sleeping"))
    parked(wf_store, sleeping, wake_at=T0 + 50)
    inbox = claimed(wf_store, started(wf_store, "inbox"))
    parked(wf_store, inbox)
    wf_store.send("inbox", "t", "e", b"", now=T0)
    waiting = claimed(wf_store, started(wf_store, "waiting"))
    parked(wf_store, waiting, waits_for="task-1")
    lease = claimed(wf_store, started(wf_store, "lease"), lease=3.0)
    live = claimed(wf_store, started(wf_store, "live"), lease=1000.0)
    done = claimed(wf_store, started(wf_store, "done"))
    wf_store.finish("done", done.epoch, SUCCEEDED, now=T0)
    att = claimed(wf_store, started(wf_store, "attention"))
    wf_store.attention("attention", att.epoch, "x", now=T0)
    wf_store.send("attention", "t", "e", b"", now=T0)
    wf_store.cancel(started(wf_store, "cancelled"), now=T0)
    before = snapshot(wf_store, start, later, "timer", "inbox", "lease")
    assert sorted(reasons(wf_store, now=T0 + 10)) == [("inbox", "inbox"), ("lease", "lease"), ("start", "start"),
                                                 ("timer", "timer")]
    assert sorted(reasons(wf_store, now=T0 + 2)) == [("inbox", "inbox"), ("start", "start")]
    assert sorted(reasons(wf_store, now=T0 - 1)) == [("inbox", "inbox")]
    assert sorted(reasons(wf_store, now=T0 + 100)) == [("inbox", "inbox"), ("lease", "lease"), ("sleeping", "timer"),
                                                  ("start", "start"), ("start-later", "start"), ("timer", "timer")]
    assert snapshot(wf_store, start, later, "timer", "inbox", "lease") == before     # listing changes nothing


def test_due_gives_the_first_reason_in_the_order_start_timer_inbox_lease(wf_store):
    both = claimed(wf_store, started(wf_store, "timer-and-inbox"))
    parked(wf_store, both, wake_at=T0 + 5)
    wf_store.send(both.id, "t", "e", b"", now=T0)
    expired = claimed(wf_store, started(wf_store, "lease-and-inbox"), lease=1.0)
    wf_store.send(expired.id, "t", "e", b"", now=T0)
    pending = started(wf_store, "start-and-inbox")
    wf_store.send(pending, "t", "e", b"", now=T0)
    assert sorted(reasons(wf_store, now=T0 + 1)) == [("lease-and-inbox", "lease"), ("start-and-inbox", "start"),
                                                ("timer-and-inbox", "inbox")]
    assert sorted(reasons(wf_store, now=T0 + 5)) == [("lease-and-inbox", "lease"), ("start-and-inbox", "start"),
                                                ("timer-and-inbox", "timer")]


def test_a_running_run_with_unread_events_is_due_only_when_its_lease_expires(wf_store):
    """While it runs, its activation will see the event (park answers "inbox")."""
    rec = claimed(wf_store, lease=10.0)
    wf_store.send(rec.id, "t", "e", b"", now=T0)
    assert reasons(wf_store, now=T0 + 9) == []
    assert reasons(wf_store, now=T0 + 10) == [(rec.id, "lease")]


def test_due_honours_its_limit_and_lists_each_run_once(wf_store):
    ids = {started(wf_store, f"r{n:03d}") for n in range(25)}
    for n in range(5):
        rec = claimed(wf_store, f"r{n:03d}", lease=1.0)
        parked(wf_store, rec, wake_at=T0)
        wf_store.send(rec.id, "t", "e", b"", now=T0)          # timer and inbox: listed once
    page = reasons(wf_store, now=T0 + 10, limit=7)
    assert len(page) == 7 and len({r for r, _ in page}) == 7 and {r for r, _ in page} <= ids
    everything = reasons(wf_store, now=T0 + 10, limit=1000)
    assert sorted(r for r, _ in everything) == sorted(ids)
    assert sorted(reason for _, reason in everything) == ["start"] * 20 + ["timer"] * 5
    assert len(reasons(wf_store, now=T0 + 10)) == 25           # the default limit is 500


def test_parked_on_pages_the_parked_runs_with_what_they_wait_for(wf_store):
    for n in range(11):
        rec = claimed(wf_store, started(wf_store, f"p{n:02d}"))
        if n == 4:
            parked(wf_store, rec, wake_at=T0 + 60)           # a timer only: not listed
        else:
            parked(wf_store, rec, waits_for=f"task-{n}", wake_at=T0 + 60 if n == 5 else None)
    claimed(wf_store, started(wf_store, "running"))
    expected = [(f"p{n:02d}", f"task-{n}", "task") for n in range(11) if n != 4]
    assert wf_store.parked_on() == expected
    pages, after = [], None
    while True:
        page = wf_store.parked_on(limit=3, after=after)
        if not page:
            break
        pages.append(page)
        after = page[-1][0]
    assert pages == [expected[0:3], expected[3:6], expected[6:9], expected[9:]]
    wf_store.claim("p00", "w", now=T0, lease=LEASE)
    wf_store.cancel("p01", now=T0)
    assert wf_store.parked_on(limit=2) == expected[2:4]


def test_due_gives_each_run_its_epoch_and_since_when_it_is_due(wf_store):
    start = started(wf_store, "start", now=T0 + 1)
    sleeping = claimed(wf_store, started(wf_store, "sleeping"))
    parked(wf_store, sleeping, wake_at=T0 + 3)
    inbox = claimed(wf_store, started(wf_store, "inbox"))
    parked(wf_store, inbox, wake_at=T0 + 50)
    wf_store.send(inbox.id, "t", "e", b"", now=T0)
    lease = claimed(wf_store, started(wf_store, "lease"), lease=2.0)
    again = claimed(wf_store, started(wf_store, "again"))
    assert wf_store.continue_as_new(again.id, again.epoch, b"next", drop_events=[], now=T0 + 4)
    got = {due.run_id: due for due in wf_store.due(now=T0 + 10)}
    assert got == {start: ("start", "start", 0, T0 + 1), "sleeping": ("sleeping", "timer", 1, T0 + 3),
                   "inbox": ("inbox", "inbox", 1, -math.inf), "lease": ("lease", "lease", 1, T0 + 2),
                   "again": ("again", "start", 2, T0 + 4)}
    assert all(due.epoch == wf_store.get(due.run_id).epoch for due in got.values())
    assert [due.run_id for due in wf_store.due(now=T0 + 10)][:2] == ["inbox", start]   # the longest due first


def test_release_hands_the_run_back_pending_due_now_with_its_journal_and_inbox(wf_store):
    rec = claimed(wf_store)
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "a", output=b"o", now=T0)
    assert wf_store.send(rec.id, "t", "e1", b"p", now=T0)[0]
    assert wf_store.release(rec.id, rec.epoch, now=T0 + 1)
    got = wf_store.get(rec.id)
    assert (got.status, got.epoch, got.owner, got.lease_until, got.wake_at, got.updated_at) == (
        PENDING, rec.epoch, None, None, T0 + 1, T0 + 1)
    assert (got.inbox_count, got.inbox_seen, got.input, got.generation) == (1, 0, b"input", 0)
    assert [e.name for e in wf_store.journal(rec.id)] == ["a"]
    assert [e.event_id for e in wf_store.events(rec.id)] == ["e1"]
    assert wf_store.due(now=T0 + 1) == [(rec.id, "start", rec.epoch, T0 + 1)]     # at once, not at the lease's end
    again = wf_store.claim(rec.id, "worker-b", now=T0 + 1, lease=LEASE)
    assert (again.status, again.epoch, again.owner) == (RUNNING, rec.epoch + 1, "worker-b")


def test_a_released_activation_is_fenced_out_of_every_later_write(wf_store):
    rec = claimed(wf_store)
    assert wf_store.release(rec.id, rec.epoch, now=T0)
    assert not wf_store.release(rec.id, rec.epoch, now=T0)
    assert not wf_store.renew(rec.id, rec.epoch, now=T0, lease=LEASE)
    assert not wf_store.append(rec.id, rec.epoch, 0, "step", "a", now=T0)
    assert wf_store.park(rec.id, rec.epoch, wake_at=None, waiting=None, waits_for=None, inbox_seen=0,
                         now=T0) == "fenced"
    assert not wf_store.finish(rec.id, rec.epoch, SUCCEEDED, result=b"r", now=T0)
    assert not wf_store.attention(rec.id, rec.epoch, "why", now=T0)
    assert not wf_store.continue_as_new(rec.id, rec.epoch, b"i", drop_events=[], now=T0)
    assert wf_store.get(rec.id).status == PENDING and wf_store.journal(rec.id) == []


@pytest.mark.parametrize("state", ["pending", "parked", "stale", "attention", "succeeded", "cancelled", "absent"])
def test_release_is_refused_unless_the_run_is_running_at_that_epoch(wf_store, state):
    rec = claimed(wf_store)
    epoch = rec.epoch
    if state == "pending":
        wf_store.reset(rec.id, 0, now=T0)
    elif state == "parked":
        parked(wf_store, rec, wake_at=T0 + 60)
    elif state == "stale":
        wf_store.claim(rec.id, "worker-b", now=T0 + LEASE, lease=LEASE)
    elif state == "attention":
        wf_store.attention(rec.id, epoch, "why", now=T0)
    elif state == "succeeded":
        wf_store.finish(rec.id, epoch, SUCCEEDED, now=T0)
    elif state == "cancelled":
        wf_store.cancel(rec.id, now=T0)
        epoch += 1
    run_id = "absent" if state == "absent" else rec.id
    before = snapshot(wf_store, run_id)
    assert not wf_store.release(run_id, epoch, now=T0 + 1)
    assert snapshot(wf_store, run_id) == before


def test_parked_on_says_whether_a_run_waits_on_a_task_or_a_child_until_it_is_claimed(wf_store):
    on_task = claimed(wf_store, started(wf_store, "on-task"))
    on_child = claimed(wf_store, started(wf_store, "on-child"))
    parked(wf_store, on_task, waits_for="on-task:c0:e1", waits_kind="task")
    parked(wf_store, on_child, waits_for="on-child:w0:e1", waits_kind="child")
    assert wf_store.parked_on() == [("on-child", "on-child:w0:e1", "child"), ("on-task", "on-task:c0:e1", "task")]
    assert [wf_store.get(r).waits_kind for r in ("on-child", "on-task")] == ["child", "task"]
    again = wf_store.claim("on-child", "worker-b", now=T0, lease=LEASE)
    assert (again.waits_for, again.waits_kind) == (None, None)
    assert wf_store.release(again.id, again.epoch, now=T0)
    assert wf_store.get("on-child").waits_kind is None
    assert [p.kind for p in wf_store.parked_on()] == ["task"]


# -- the whole life of a run ------------------------------------------------------------------

def test_a_run_sleeps_waits_for_an_event_and_succeeds(wf_store):
    r = started(wf_store, "order-42")
    a = wf_store.claim(r, "w1", now=T0, lease=LEASE)
    assert wf_store.append(r, a.epoch, 0, "step", "charge", output=b"ch", now=T0)
    assert wf_store.append(r, a.epoch, 1, "sleep", "sleep", output=b"", now=T0)
    assert wf_store.park(r, a.epoch, wake_at=T0 + 172800, waiting=b"sleep", waits_for=None, inbox_seen=0,
                         now=T0) == "parked"
    assert reasons(wf_store, now=T0 + 172799) == []
    assert wf_store.send(r, "review", "rv-9", b"5", now=T0 + 1000)[0]     # sent before the wait: kept
    assert reasons(wf_store, now=T0 + 1001) == [(r, "inbox")]        # an early wake-up; the engine parks again
    b = wf_store.claim(r, "w2", now=T0 + 1001, lease=LEASE)
    assert wf_store.park(r, b.epoch, wake_at=T0 + 172800, waiting=b"sleep", waits_for=None, inbox_seen=1,
                         now=T0 + 1001) == "parked"
    assert reasons(wf_store, now=T0 + 172800) == [(r, "timer")]
    c = wf_store.claim(r, "w3", now=T0 + 172800, lease=LEASE)
    assert c.epoch == 3
    assert [e.name for e in wf_store.journal(r)] == ["charge", "sleep"]
    ev = wf_store.events(r, "review", after_seq=0, limit=1)[0]
    assert wf_store.append(r, c.epoch, 2, "wait", "review", output=ev.payload, now=T0 + 172800)
    assert wf_store.finish(r, c.epoch, SUCCEEDED, result=b"ok", now=T0 + 172801)
    done = wf_store.get(r)
    assert (done.status, done.epoch, done.result, done.inbox_count, done.inbox_seen) == (SUCCEEDED, 3, b"ok", 1, 1)
    assert reasons(wf_store, now=T0 + 1e9) == []


# -- bad input --------------------------------------------------------------------------------

BAD_RUN_IDS = ["", "x" * (RUN_ID_MAX + 1), None, 5, b"run"]
BAD_TIMES = [math.nan, math.inf, -math.inf, True, "1700000000", None, 10**400]
BAD_EPOCHS = [-1, True, 1.0, "1", None, 2**63]
BAD_INTS = [-1, True, 1.5, "0", None, 2**63]
BAD_LIMITS = [0, -1, True, 1.5, "5", None, 2**63]
BAD_BYTES = ["text", 5, [1, 2]]


def _bad_calls(s, r: str):
    """(label, call) for every public method and every argument it takes, each call bad in one argument.
    ``r`` is a RUNNING run at epoch 1 with a journal entry and an event."""
    ok = dict(now=T0)
    yield from ((f"create run_id={b!r}", lambda b=b: s.create(b, "n", "1", b"", **ok)) for b in BAD_RUN_IDS)
    yield from ((f"create name={b!r}", lambda b=b: s.create(rid(), b, "1", b"", **ok))
                for b in ["", "x" * 201, None, 5])
    yield from ((f"create version={b!r}", lambda b=b: s.create(rid(), "n", b, b"", **ok))
                for b in ["", "v" * 65, 1, None])
    yield from ((f"create input={b!r}", lambda b=b: s.create(rid(), "n", "1", b, **ok)) for b in BAD_BYTES + [None])
    yield from ((f"create now={b!r}", lambda b=b: s.create(rid(), "n", "1", b"", now=b)) for b in BAD_TIMES)
    yield from ((f"create parent={b!r}", lambda b=b: s.create(rid(), "n", "1", b"", parent=b, **ok))
                for b in ["", "x" * (RUN_ID_MAX + 1), 5, b"p"])
    yield from ((f"get {b!r}", lambda b=b: s.get(b)) for b in BAD_RUN_IDS)
    yield from ((f"runs status={b!r}", lambda b=b: s.runs(status=b)) for b in ["DONE", "running", 5])
    yield from ((f"runs name={b!r}", lambda b=b: s.runs(name=b)) for b in ["", 5, "x" * 201])
    yield from ((f"runs limit={b!r}", lambda b=b: s.runs(limit=b)) for b in BAD_LIMITS)
    yield from ((f"runs after={b!r}", lambda b=b: s.runs(after=b)) for b in [5, b"r", ""])
    yield from ((f"claim run_id={b!r}", lambda b=b: s.claim(b, "w", now=T0, lease=1.0)) for b in BAD_RUN_IDS)
    yield from ((f"claim owner={b!r}", lambda b=b: s.claim(r, b, now=T0 + 1e6, lease=1.0))
                for b in ["", None, 5, "o" * 201])
    yield from ((f"claim now={b!r}", lambda b=b: s.claim(r, "w", now=b, lease=1.0)) for b in BAD_TIMES)
    yield from ((f"claim lease={b!r}", lambda b=b: s.claim(r, "w", now=T0 + 1e6, lease=b)) for b in BAD_TIMES)
    yield from ((f"renew run_id={b!r}", lambda b=b: s.renew(b, 1, now=T0, lease=1.0)) for b in BAD_RUN_IDS)
    yield from ((f"renew epoch={b!r}", lambda b=b: s.renew(r, b, now=T0, lease=1.0)) for b in BAD_EPOCHS)
    yield from ((f"renew now={b!r}", lambda b=b: s.renew(r, 1, now=b, lease=1.0)) for b in BAD_TIMES)
    yield from ((f"renew lease={b!r}", lambda b=b: s.renew(r, 1, now=T0, lease=b)) for b in BAD_TIMES)
    yield from ((f"journal {b!r}", lambda b=b: s.journal(b)) for b in BAD_RUN_IDS)

    def append(**kw):
        args = dict(run_id=r, epoch=1, position=1, kind="step", name="a", output=b"o", error=None, attempt=1, now=T0)
        args.update(kw)
        return s.append(args.pop("run_id"), args.pop("epoch"), args.pop("position"), args.pop("kind"),
                        args.pop("name"), **args)
    yield from ((f"append run_id={b!r}", lambda b=b: append(run_id=b)) for b in BAD_RUN_IDS)
    yield from ((f"append epoch={b!r}", lambda b=b: append(epoch=b)) for b in BAD_EPOCHS)
    yield from ((f"append position={b!r}", lambda b=b: append(position=b)) for b in BAD_INTS)
    yield from ((f"append kind={b!r}", lambda b=b: append(kind=b)) for b in ["", "k" * 33, None, 5])
    yield from ((f"append name={b!r}", lambda b=b: append(name=b)) for b in ["", "n" * 201, None, 5])
    yield from ((f"append output={b!r}", lambda b=b: append(output=b)) for b in BAD_BYTES)
    yield from ((f"append error={b!r}", lambda b=b: append(error=b)) for b in BAD_BYTES)
    yield from ((f"append attempt={b!r}", lambda b=b: append(attempt=b)) for b in BAD_INTS)
    yield from ((f"append now={b!r}", lambda b=b: append(now=b)) for b in BAD_TIMES)

    def park(**kw):
        args = dict(run_id=r, epoch=1, wake_at=None, waiting=None, waits_for=None, inbox_seen=1, now=T0)
        args.update(kw)
        return s.park(args.pop("run_id"), args.pop("epoch"), **args)
    yield from ((f"park run_id={b!r}", lambda b=b: park(run_id=b)) for b in BAD_RUN_IDS)
    yield from ((f"park epoch={b!r}", lambda b=b: park(epoch=b)) for b in BAD_EPOCHS)
    yield from ((f"park wake_at={b!r}", lambda b=b: park(wake_at=b)) for b in BAD_TIMES if b is not None)
    yield from ((f"park waiting={b!r}", lambda b=b: park(waiting=b)) for b in BAD_BYTES)
    yield from ((f"park waits_for={b!r}", lambda b=b: park(waits_for=b, waits_kind="task"))
                for b in ["", 5, "t" * 201, b"t"])
    yield from ((f"park waits_kind={b!r}", lambda b=b: park(waits_for="t", waits_kind=b))
                for b in [None, "", "call", "Task", 5, b"task", ["task"]])
    yield from ((f"park waits_kind={b!r} without waits_for", lambda b=b: park(waits_kind=b)) for b in ["task", "child"])
    yield from ((f"release run_id={b!r}", lambda b=b: s.release(b, 1, **ok)) for b in BAD_RUN_IDS)
    yield from ((f"release epoch={b!r}", lambda b=b: s.release(r, b, **ok)) for b in BAD_EPOCHS)
    yield from ((f"release now={b!r}", lambda b=b: s.release(r, 1, now=b)) for b in BAD_TIMES)
    yield from ((f"park inbox_seen={b!r}", lambda b=b: park(inbox_seen=b)) for b in BAD_INTS)
    yield from ((f"park now={b!r}", lambda b=b: park(now=b)) for b in BAD_TIMES)
    yield from ((f"finish run_id={b!r}", lambda b=b: s.finish(b, 1, SUCCEEDED, **ok)) for b in BAD_RUN_IDS)
    yield from ((f"finish epoch={b!r}", lambda b=b: s.finish(r, b, SUCCEEDED, **ok)) for b in BAD_EPOCHS)
    yield from ((f"finish status={b!r}", lambda b=b: s.finish(r, 1, b, **ok))
                for b in [RUNNING, PENDING, PARKED, CANCELLED, NEEDS_ATTENTION, "succeeded", None, 1])
    yield from ((f"finish result={b!r}", lambda b=b: s.finish(r, 1, SUCCEEDED, result=b, **ok)) for b in BAD_BYTES)
    yield from ((f"finish error={b!r}", lambda b=b: s.finish(r, 1, FAILED, error=b, **ok)) for b in BAD_BYTES)
    yield from ((f"finish now={b!r}", lambda b=b: s.finish(r, 1, SUCCEEDED, now=b)) for b in BAD_TIMES)
    yield from ((f"attention run_id={b!r}", lambda b=b: s.attention(b, 1, "why", **ok)) for b in BAD_RUN_IDS)
    yield from ((f"attention epoch={b!r}", lambda b=b: s.attention(r, b, "why", **ok)) for b in BAD_EPOCHS)
    yield from ((f"attention reason={b!r}", lambda b=b: s.attention(r, 1, b, **ok)) for b in ["", None, 5, "x" * 4001])
    yield from ((f"attention now={b!r}", lambda b=b: s.attention(r, 1, "why", now=b)) for b in BAD_TIMES)
    yield from ((f"continue_as_new run_id={b!r}", lambda b=b: s.continue_as_new(b, 1, b"", drop_events=[], **ok))
                for b in BAD_RUN_IDS)
    yield from ((f"continue_as_new epoch={b!r}", lambda b=b: s.continue_as_new(r, b, b"", drop_events=[], **ok))
                for b in BAD_EPOCHS)
    yield from ((f"continue_as_new input={b!r}", lambda b=b: s.continue_as_new(r, 1, b, drop_events=[], **ok))
                for b in BAD_BYTES + [None])
    yield from ((f"continue_as_new drop_events={b!r}", lambda b=b: s.continue_as_new(r, 1, b"", drop_events=b, **ok))
                for b in [None, 5, "12", b"\x01", [1, -1], [True], ["1"], [1.0], {"a": 1}, [2**63]])
    yield from ((f"continue_as_new now={b!r}", lambda b=b: s.continue_as_new(r, 1, b"", drop_events=[], now=b))
                for b in BAD_TIMES)
    yield from ((f"cancel run_id={b!r}", lambda b=b: s.cancel(b, **ok)) for b in BAD_RUN_IDS)
    yield from ((f"cancel now={b!r}", lambda b=b: s.cancel(r, now=b)) for b in BAD_TIMES)
    yield from ((f"reset run_id={b!r}", lambda b=b: s.reset(b, 0, **ok)) for b in BAD_RUN_IDS)
    yield from ((f"reset to_position={b!r}", lambda b=b: s.reset(r, b, **ok)) for b in BAD_INTS)
    yield from ((f"reset now={b!r}", lambda b=b: s.reset(r, 0, now=b)) for b in BAD_TIMES)
    yield from ((f"send run_id={b!r}", lambda b=b: s.send(b, "t", "e2", b"", **ok)) for b in BAD_RUN_IDS)
    yield from ((f"send topic={b!r}", lambda b=b: s.send(r, b, "e2", b"", **ok)) for b in ["", None, 5, "t" * 201])
    yield from ((f"send event_id={b!r}", lambda b=b: s.send(r, "t", b, b"", **ok)) for b in ["", None, 5, "e" * 201])
    yield from ((f"send payload={b!r}", lambda b=b: s.send(r, "t", "e2", b, **ok)) for b in BAD_BYTES + [None])
    yield from ((f"send now={b!r}", lambda b=b: s.send(r, "t", "e2", b"", now=b)) for b in BAD_TIMES)
    yield from ((f"events run_id={b!r}", lambda b=b: s.events(b)) for b in BAD_RUN_IDS)
    yield from ((f"events topic={b!r}", lambda b=b: s.events(r, b)) for b in ["", 5, "t" * 201])
    yield from ((f"events after_seq={b!r}", lambda b=b: s.events(r, after_seq=b)) for b in BAD_INTS)
    yield from ((f"events limit={b!r}", lambda b=b: s.events(r, limit=b)) for b in BAD_LIMITS)
    yield from ((f"due now={b!r}", lambda b=b: s.due(now=b)) for b in BAD_TIMES)
    yield from ((f"due limit={b!r}", lambda b=b: s.due(now=T0, limit=b)) for b in BAD_LIMITS)
    yield from ((f"parked_on limit={b!r}", lambda b=b: s.parked_on(limit=b)) for b in BAD_LIMITS)
    yield from ((f"parked_on after={b!r}", lambda b=b: s.parked_on(after=b)) for b in [5, b"r", ""])


def test_bad_input_to_every_method_is_refused_and_stores_nothing(wf_store):
    rec = claimed(wf_store)
    assert wf_store.append(rec.id, rec.epoch, 0, "step", "a", output=b"o", now=T0)
    assert wf_store.send(rec.id, "t", "e1", b"p", now=T0)[0]
    before = snapshot(wf_store, rec.id)
    n = 0
    for label, call in _bad_calls(wf_store, rec.id):
        with pytest.raises(ConfigurationError):
            call()
            pytest.fail(f"{label} was accepted")
        assert snapshot(wf_store, rec.id) == before, f"{label} changed the store"
        n += 1
    assert n > 200
    # and the run still works: nothing was half done
    assert wf_store.append(rec.id, rec.epoch, 1, "step", "b", now=T0)
    assert wf_store.park(rec.id, rec.epoch, wake_at=None, waiting=None, waits_for=None, inbox_seen=1,
                         now=T0) == "parked"


# -- races ------------------------------------------------------------------------------------

class _Racers:
    """Runs ``body(store, barrier, idx, *args) -> result`` in ``n`` processes on the store's
    ``contract_recipe``, or in threads on the store itself when it has none; returns the
    results by index.  Every racer meets the others (and this process) at ``barrier``."""

    def __init__(self, store, n: int):
        self.store, self.n = store, n
        self.recipe = getattr(store, "contract_recipe", None)
        if self.recipe is not None:
            ctx = multiprocessing.get_context("fork")
            self.barrier, self.out, self._spawn = ctx.Barrier(n + 1), ctx.Queue(), ctx.Process
        else:
            self.barrier, self.out, self._spawn = threading.Barrier(n + 1), queue.Queue(), threading.Thread

    def run(self, body, *args) -> list:
        workers = [self._spawn(target=_race_body, args=(self.recipe, self.store if self.recipe is None else None,
                                                        body, self.barrier, self.out, idx, args), daemon=True)
                   for idx in range(self.n)]
        for w in workers:
            w.start()
        return workers

    def wait(self, timeout: float = 30.0) -> None:
        try:
            self.barrier.wait(timeout)
        except threading.BrokenBarrierError:
            failures = []
            while True:
                try:
                    idx, ok, value = self.out.get(timeout=5.0)
                except queue.Empty:
                    break
                if not ok:
                    failures.append(f"racer {idx}: {value}")
            raise AssertionError(f"a racer failed or stalled: {failures or 'no report'}") from None

    def results(self, workers, timeout: float = 30.0) -> list:
        got = {}
        for _ in workers:
            idx, ok, value = self.out.get(timeout=timeout)
            assert ok, f"racer {idx} failed: {value}"
            got[idx] = value
        for w in workers:
            w.join(timeout)
            assert not w.is_alive()
        return [got[i] for i in range(self.n)]


def _race_body(recipe, store, body, barrier, out, idx, args):
    own = store is None
    try:
        if own:
            store = build(recipe)
            store.get("warm-up")                 # connected (and migrated) before the first barrier
        try:
            out.put((idx, True, body(store, barrier, idx, *args)))
        finally:
            if own:
                store.close()
    except BaseException as e:                   # reported to the test; the barrier is broken for the others
        barrier.abort()
        out.put((idx, False, repr(e)))


ROUNDS = 20


def _claim_racer(store, barrier, idx, run_id):
    wins = []
    for rnd in range(ROUNDS):
        barrier.wait(30)
        now = T0 + 10 * rnd
        rec = store.claim(run_id, f"racer-{idx}", now=now, lease=5.0)
        barrier.wait(30)                         # every racer has tried before the winner frees the run
        if rec is not None:
            wins.append((rnd, rec.epoch))
            # even rounds park the run, odd ones let the lease run out: both make it claimable again
            assert store.append(run_id, rec.epoch, rnd, "step", f"won-by-{idx}", now=now)
            if rnd % 2 == 0:
                assert store.park(run_id, rec.epoch, wake_at=now, waiting=None, waits_for=None,
                                  inbox_seen=rec.inbox_count, now=now) == "parked"
        barrier.wait(30)
    return wins


def test_racing_claims_on_one_run_have_exactly_one_winner_per_epoch(wf_store):
    run_id = started(wf_store)
    racers = _Racers(wf_store, 4)
    workers = racers.run(_claim_racer, run_id)
    for _ in range(ROUNDS):
        racers.wait()
        racers.wait()
        racers.wait()
    wins = racers.results(workers)
    by_round = sorted(w for ws in wins for w in ws)
    assert [rnd for rnd, _ in by_round] == list(range(ROUNDS)), "a round had no winner or two"
    assert [epoch for _, epoch in by_round] == list(range(1, ROUNDS + 1))
    journal = wf_store.journal(run_id)
    assert [(e.position, e.epoch) for e in journal] == [(n, n + 1) for n in range(ROUNDS)]
    winner = {rnd: idx for idx, ws in enumerate(wins) for rnd, _ in ws}
    assert [e.name for e in journal] == [f"won-by-{winner[n]}" for n in range(ROUNDS)]
    assert wf_store.get(run_id).epoch == ROUNDS


def _append_racer(store, barrier, idx, run_id, epoch):
    won = []
    for pos in range(ROUNDS):
        barrier.wait(30)
        if store.append(run_id, epoch, pos, "step", "s", output=f"{idx}:{pos}".encode(), now=T0 + pos):
            won.append(pos)
        barrier.wait(30)
    return won


def test_racing_appends_at_one_position_have_exactly_one_winner(wf_store):
    """Two writers of the same activation (a duplicated wake-up that slipped past the claim):
    each position is written once, by one of them, and stays as written."""
    rec = claimed(wf_store)
    racers = _Racers(wf_store, 2)
    workers = racers.run(_append_racer, rec.id, rec.epoch)
    for pos in range(ROUNDS):
        racers.wait()
        racers.wait()
        assert len(wf_store.journal(rec.id)) == pos + 1
    won = racers.results(workers)
    assert sorted(won[0] + won[1]) == list(range(ROUNDS))
    assert not set(won[0]) & set(won[1])
    owner = {pos: idx for idx, ps in enumerate(won) for pos in ps}
    assert [e.output for e in wf_store.journal(rec.id)] == [f"{owner[p]}:{p}".encode() for p in range(ROUNDS)]


def _park_or_send_racer(store, barrier, idx, run_id):
    outcomes = []
    for rnd in range(ROUNDS):
        barrier.wait(30)                         # the run is claimed
        rec = store.get(run_id) if idx == 0 else None      # the activation's last look at its inbox
        barrier.wait(30)                         # go
        if idx == 0:
            outcomes.append(store.park(run_id, rec.epoch, wake_at=None, waiting=b"wait", waits_for=None,
                                       inbox_seen=rec.inbox_count, now=T0 + rnd))
        else:
            outcomes.append(store.send(run_id, "review", f"ev-{rnd}", str(rnd).encode(), now=T0 + rnd)[0])
        barrier.wait(30)                         # both done
    return outcomes


def test_an_event_sent_while_the_run_parks_is_never_lost(wf_store):
    """Either park sees it ("inbox") or the parked run is due with reason inbox."""
    run_id = started(wf_store)
    racers = _Racers(wf_store, 2)
    workers = racers.run(_park_or_send_racer, run_id)
    seen = []
    for rnd in range(ROUNDS):
        now = T0 + rnd
        rec = wf_store.claim(run_id, "w", now=now, lease=1000.0)
        assert rec is not None and rec.epoch == rnd + 1
        racers.wait()
        racers.wait()
        racers.wait()
        got = wf_store.get(run_id)
        assert got.inbox_count == rnd + 1
        if got.status == RUNNING:                # park answered "inbox": the activation reads it and parks
            seen.append("inbox")
            assert got.epoch == rec.epoch and got.inbox_seen == rec.inbox_seen
            assert wf_store.park(run_id, rec.epoch, wake_at=None, waiting=b"w", waits_for=None,
                                 inbox_seen=got.inbox_count, now=now) == "parked"
        else:
            seen.append("parked")
            assert (got.status, got.inbox_seen) == (PARKED, rnd)
            assert reasons(wf_store, now=now) == [(run_id, "inbox")]
    outcomes = racers.results(workers)
    assert outcomes[1] == [True] * ROUNDS
    assert outcomes[0] == seen
    assert [e.event_id for e in wf_store.events(run_id)] == [f"ev-{n}" for n in range(ROUNDS)]
