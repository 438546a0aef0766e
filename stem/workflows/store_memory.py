"""The workflow store in one process's memory: the reference the other stores are held to.

Every operation runs under one lock, so each is atomic as the contract asks.  It lives
beside an in-memory result backend (``for_backend``: one store per backend instance),
for tests and the embedded default; it is gone with the process.
"""

from __future__ import annotations

import threading

from .store import (CANCELLED, NEEDS_ATTENTION, PARKED, PENDING, RUNNING, DueRun, Event, JournalEntry, ParkedRun,
                    ParkOutcome, RunRecord, WorkflowStore)

__all__ = ["MemoryWorkflowStore"]


class MemoryWorkflowStore(WorkflowStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, RunRecord] = {}
        self._journal_of: dict[str, list[JournalEntry]] = {}
        self._inbox_of: dict[str, list[Event]] = {}

    @classmethod
    def for_backend(cls, backend: object) -> "MemoryWorkflowStore":
        store = getattr(backend, "_workflow_store", None)
        if store is None:
            store = cls()
            setattr(backend, "_workflow_store", store)
        return store

    # -- runs ------------------------------------------------------------------------------
    def _create(self, run_id: str, name: str, version: str, input: bytes, *, now: float,
                parent: str | None) -> tuple[bool, RunRecord]:
        with self._lock:
            run = self._records.get(run_id)
            if run is not None:
                return False, run
            run = RunRecord(run_id, name, version, input, PENDING, 0, None, None, now, None, None, 0, 0, parent,
                            None, None, None, 0, now, now)
            self._records[run_id] = run
            self._journal_of[run_id] = []
            self._inbox_of[run_id] = []
            return True, run

    def _get(self, run_id: str) -> RunRecord | None:
        with self._lock:
            return self._records.get(run_id)

    def _runs(self, *, status: str | None, name: str | None, limit: int, after: str | None) -> list[RunRecord]:
        with self._lock:
            got = sorted((r for r in self._records.values()
                          if (status is None or r.status == status) and (name is None or r.name == name)
                          and (after is None or r.id > after)), key=lambda r: r.id)
        return got[:limit]

    # -- one activation ----------------------------------------------------------------------
    def _held(self, run_id: str, epoch: int) -> RunRecord | None:
        run = self._records.get(run_id)
        if run is None or run.epoch != epoch or run.status != RUNNING:
            return None
        return run

    def _claim(self, run_id: str, owner: str, *, now: float, lease: float) -> RunRecord | None:
        with self._lock:
            run = self._records.get(run_id)
            if run is None:
                return None
            free = run.status in (PENDING, PARKED) or (
                run.status == RUNNING and run.lease_until is not None and run.lease_until <= now)
            if not free:
                return None
            run = run._replace(status=RUNNING, epoch=run.epoch + 1, owner=owner, lease_until=now + lease,
                               wake_at=None, waiting=None, waits_for=None, waits_kind=None, updated_at=now)
            self._records[run_id] = run
            return run

    def _renew(self, run_id: str, epoch: int, *, now: float, lease: float) -> bool:
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return False
            self._records[run_id] = run._replace(lease_until=now + lease, updated_at=now)
            return True

    def _journal(self, run_id: str) -> list[JournalEntry]:
        with self._lock:
            return list(self._journal_of.get(run_id, ()))

    def _append(self, run_id: str, epoch: int, position: int, kind: str, name: str, *, output: bytes | None,
                error: bytes | None, attempt: int, now: float) -> bool:
        with self._lock:
            if self._held(run_id, epoch) is None:
                return False
            journal = self._journal_of[run_id]
            if position != len(journal):
                return False
            journal.append(JournalEntry(position, kind, name, output, error, attempt, epoch, now))
            return True

    def _park(self, run_id: str, epoch: int, *, wake_at: float | None, waiting: bytes | None,
              waits_for: str | None, waits_kind: str | None, inbox_seen: int, now: float) -> ParkOutcome:
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return "fenced"
            if run.inbox_count != inbox_seen:
                return "inbox"
            self._records[run_id] = run._replace(status=PARKED, owner=None, lease_until=None, wake_at=wake_at,
                                              waiting=waiting, waits_for=waits_for, waits_kind=waits_kind,
                                              inbox_seen=inbox_seen, updated_at=now)
            return "parked"

    def _notify_parent(self, run: RunRecord, now: float) -> None:
        if run.parent is None:
            return
        parent = self._records.get(run.parent)
        if parent is None or parent.terminal:
            return
        events = self._inbox_of[parent.id]
        if any(e.event_id == run.id for e in events):     # (run, event id) is stored once, whatever the topic
            return
        seq = parent.inbox_count + 1
        events.append(Event(seq, "__child__", run.id, b"", now))
        self._records[parent.id] = parent._replace(inbox_count=seq, updated_at=now)

    def _finish(self, run_id: str, epoch: int, status: str, *, result: bytes | None, error: bytes | None,
                now: float) -> bool:
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return False
            run = run._replace(status=status, owner=None, lease_until=None, wake_at=None, waiting=None,
                               waits_for=None, waits_kind=None, result=result, error=error, updated_at=now)
            self._records[run_id] = run
            self._notify_parent(run, now)
            return True

    def _attention(self, run_id: str, epoch: int, reason: str, *, now: float) -> bool:
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return False
            self._records[run_id] = run._replace(status=NEEDS_ATTENTION, owner=None, lease_until=None, wake_at=None,
                                              waiting=None, waits_for=None, waits_kind=None, attention=reason,
                                              updated_at=now)
            return True

    def _continue_as_new(self, run_id: str, epoch: int, input: bytes, *, drop_events: list[int],
                         now: float) -> bool:
        drop = set(drop_events)
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return False
            self._journal_of[run_id] = []
            self._inbox_of[run_id] = [e for e in self._inbox_of[run_id] if e.seq not in drop]
            self._records[run_id] = run._replace(input=input, status=PENDING, epoch=epoch + 1, owner=None,
                                              lease_until=None, wake_at=now, waiting=None, waits_for=None,
                                              waits_kind=None, generation=run.generation + 1, updated_at=now)
            return True

    def _release(self, run_id: str, epoch: int, *, now: float) -> bool:
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return False
            self._records[run_id] = run._replace(status=PENDING, owner=None, lease_until=None, wake_at=now,
                                                 waiting=None, waits_for=None, waits_kind=None, updated_at=now)
            return True

    # -- operators -----------------------------------------------------------------------------
    def _cancel(self, run_id: str, *, now: float) -> RunRecord | None:
        with self._lock:
            run = self._records.get(run_id)
            if run is None or run.terminal:
                return run
            run = run._replace(status=CANCELLED, epoch=run.epoch + 1, owner=None, lease_until=None, wake_at=None,
                               waiting=None, waits_for=None, waits_kind=None, updated_at=now)
            self._records[run_id] = run
            self._notify_parent(run, now)
            return run

    def _reset(self, run_id: str, to_position: int, *, now: float) -> RunRecord | None:
        with self._lock:
            run = self._records.get(run_id)
            if run is None:
                return None
            self._journal_of[run_id] = self._journal_of[run_id][:to_position]
            run = run._replace(status=PENDING, epoch=run.epoch + 1, owner=None, lease_until=None, wake_at=now,
                               waiting=None, waits_for=None, waits_kind=None, result=None, error=None, attention=None,
                               updated_at=now)
            self._records[run_id] = run
            return run

    # -- events --------------------------------------------------------------------------------
    def _send(self, run_id: str, topic: str, event_id: str, payload: bytes, *,
              now: float) -> tuple[bool, RunRecord | None]:
        with self._lock:
            run = self._records.get(run_id)
            if run is None:
                return False, None
            if run.terminal:
                return False, run
            events = self._inbox_of[run_id]
            if any(e.event_id == event_id for e in events):
                return False, run
            seq = run.inbox_count + 1
            events.append(Event(seq, topic, event_id, payload, now))
            run = run._replace(inbox_count=seq, updated_at=now)
            self._records[run_id] = run
            return True, run

    def _events(self, run_id: str, topic: str | None, after_seq: int, limit: int) -> list[Event]:
        with self._lock:
            got = [e for e in self._inbox_of.get(run_id, ())
                   if e.seq > after_seq and (topic is None or e.topic == topic)]
        return got[:limit]

    # -- the sweeper ---------------------------------------------------------------------------
    def _due(self, *, now: float, limit: int) -> list[DueRun]:
        out: list[DueRun] = []
        with self._lock:
            for run in self._records.values():
                reason = _due_reason(run, now)
                if reason is not None:
                    out.append(DueRun(run.id, reason, run.epoch, _due_at(run)))
        out.sort(key=lambda d: d.due_at)
        return out[:limit]

    def _parked_on(self, *, limit: int, after: str | None) -> list[ParkedRun]:
        with self._lock:
            got = sorted(ParkedRun(r.id, r.waits_for, r.waits_kind) for r in self._records.values()
                         if r.status == PARKED and r.waits_for is not None and (after is None or r.id > after))
        return got[:limit]


def _due_at(run: RunRecord) -> float:
    """The due index's key of a due run, as the other stores keep it."""
    if run.status == RUNNING:
        return run.lease_until  # type: ignore[return-value]
    if run.status == PARKED and run.inbox_count > run.inbox_seen:
        return float("-inf")
    return run.wake_at  # type: ignore[return-value]


def _due_reason(run: RunRecord, now: float) -> str | None:
    if run.status == PENDING and run.wake_at is not None and run.wake_at <= now:
        return "start"
    if run.status == PARKED:
        if run.wake_at is not None and run.wake_at <= now:
            return "timer"
        if run.inbox_count > run.inbox_seen:
            return "inbox"
    if run.status == RUNNING and run.lease_until is not None and run.lease_until <= now:
        return "lease"
    return None

