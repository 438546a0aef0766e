"""The workflow store in one process's memory: the reference the other stores are held to.

Every operation runs under one lock, so each is atomic as the contract asks.  It lives
beside an in-memory result backend (``for_backend``: one store per backend instance),
for tests and the embedded default; it is gone with the process.
"""

from __future__ import annotations

import threading
from typing import Sequence

from .store import (CANCELLED, FAILED, NEEDS_ATTENTION, PARKED, PENDING, RUNNING, STATUSES, SUCCEEDED, Event,
                    JournalEntry, ParkOutcome, RunRecord, WorkflowStore, check_epoch, check_limit, check_payload,
                    check_position, check_run_id, check_seqs, check_text, check_time)
from ..errors import ConfigurationError

__all__ = ["MemoryWorkflowStore"]


class MemoryWorkflowStore(WorkflowStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, RunRecord] = {}
        self._journals: dict[str, list[JournalEntry]] = {}
        self._events: dict[str, list[Event]] = {}

    @classmethod
    def for_backend(cls, backend: object) -> "MemoryWorkflowStore":
        store = getattr(backend, "_workflow_store", None)
        if store is None:
            store = cls()
            setattr(backend, "_workflow_store", store)
        return store

    # -- runs ------------------------------------------------------------------------------
    def create(self, run_id: str, name: str, version: str, input: bytes, *, now: float,
               parent: str | None = None) -> tuple[bool, RunRecord]:
        check_run_id(run_id)
        check_text("a workflow name", name)
        check_text("a workflow version", version, limit=64)
        data = check_payload("input", input, optional=False)
        now = check_time("now", now)
        if parent is not None:
            check_run_id(parent)
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                return False, run
            run = RunRecord(run_id, name, version, data, PENDING, 0, None, None, now, None, None, 0, 0, parent,
                            None, None, None, 0, now, now)
            self._runs[run_id] = run
            self._journals[run_id] = []
            self._events[run_id] = []
            return True, run

    def get(self, run_id: str) -> RunRecord | None:
        check_run_id(run_id)
        with self._lock:
            return self._runs.get(run_id)

    def runs(self, *, status: str | None = None, name: str | None = None, limit: int = 100,
             after: str | None = None) -> list[RunRecord]:
        if status is not None and status not in STATUSES:
            raise ConfigurationError(f"a run status is one of {sorted(STATUSES)}, got {status!r}")
        check_text("a workflow name", name, optional=True)
        check_limit(limit)
        if after is not None:
            check_run_id(after)
        with self._lock:
            got = sorted((r for r in self._runs.values()
                          if (status is None or r.status == status) and (name is None or r.name == name)
                          and (after is None or r.id > after)), key=lambda r: r.id)
        return got[:limit]

    # -- one activation ----------------------------------------------------------------------
    def _held(self, run_id: str, epoch: int) -> RunRecord | None:
        run = self._runs.get(run_id)
        if run is None or run.epoch != epoch or run.status != RUNNING:
            return None
        return run

    def claim(self, run_id: str, owner: str, *, now: float, lease: float) -> RunRecord | None:
        check_run_id(run_id)
        check_text("an owner", owner)
        now = check_time("now", now)
        lease = check_time("lease", lease)
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            free = run.status in (PENDING, PARKED) or (
                run.status == RUNNING and run.lease_until is not None and run.lease_until <= now)
            if not free:
                return None
            run = run._replace(status=RUNNING, epoch=run.epoch + 1, owner=owner, lease_until=now + lease,
                               wake_at=None, waiting=None, waits_for=None, updated_at=now)
            self._runs[run_id] = run
            return run

    def renew(self, run_id: str, epoch: int, *, now: float, lease: float) -> bool:
        check_run_id(run_id)
        check_epoch(epoch)
        now = check_time("now", now)
        lease = check_time("lease", lease)
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return False
            self._runs[run_id] = run._replace(lease_until=now + lease, updated_at=now)
            return True

    def journal(self, run_id: str) -> list[JournalEntry]:
        check_run_id(run_id)
        with self._lock:
            return list(self._journals.get(run_id, ()))

    def append(self, run_id: str, epoch: int, position: int, kind: str, name: str, *,
               output: bytes | None = None, error: bytes | None = None, attempt: int = 1,
               now: float) -> bool:
        check_run_id(run_id)
        check_epoch(epoch)
        check_position(position)
        check_text("an entry kind", kind, limit=32)
        check_text("an entry name", name)
        output = check_payload("output", output)
        error = check_payload("error", error)
        check_position(attempt)
        now = check_time("now", now)
        with self._lock:
            if self._held(run_id, epoch) is None:
                return False
            journal = self._journals[run_id]
            if position != len(journal):
                return False
            journal.append(JournalEntry(position, kind, name, output, error, attempt, epoch, now))
            return True

    def park(self, run_id: str, epoch: int, *, wake_at: float | None, waiting: bytes | None,
             waits_for: str | None, inbox_seen: int, now: float) -> ParkOutcome:
        check_run_id(run_id)
        check_epoch(epoch)
        wake_at = check_time("wake_at", wake_at, optional=True)
        waiting = check_payload("waiting", waiting)
        check_text("waits_for", waits_for, optional=True)
        check_position(inbox_seen)
        now = check_time("now", now)
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return "fenced"
            if run.inbox_count != inbox_seen:
                return "inbox"
            self._runs[run_id] = run._replace(status=PARKED, owner=None, lease_until=None, wake_at=wake_at,
                                              waiting=waiting, waits_for=waits_for, inbox_seen=inbox_seen,
                                              updated_at=now)
            return "parked"

    def _notify_parent(self, run: RunRecord, now: float) -> None:
        if run.parent is None:
            return
        parent = self._runs.get(run.parent)
        if parent is None or parent.terminal:
            return
        events = self._events[parent.id]
        if any(e.event_id == run.id for e in events):     # (run, event id) is stored once, whatever the topic
            return
        seq = parent.inbox_count + 1
        events.append(Event(seq, "__child__", run.id, b"", now))
        self._runs[parent.id] = parent._replace(inbox_count=seq, updated_at=now)

    def finish(self, run_id: str, epoch: int, status: str, *, result: bytes | None = None,
               error: bytes | None = None, now: float) -> bool:
        check_run_id(run_id)
        check_epoch(epoch)
        if status not in (SUCCEEDED, FAILED):
            raise ConfigurationError(f"a run finishes SUCCEEDED or FAILED, got {status!r}")
        result = check_payload("result", result)
        error = check_payload("error", error)
        now = check_time("now", now)
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return False
            run = run._replace(status=status, owner=None, lease_until=None, wake_at=None, waiting=None,
                               waits_for=None, result=result, error=error, updated_at=now)
            self._runs[run_id] = run
            self._notify_parent(run, now)
            return True

    def attention(self, run_id: str, epoch: int, reason: str, *, now: float) -> bool:
        check_run_id(run_id)
        check_epoch(epoch)
        check_text("a reason", reason, limit=4000)
        now = check_time("now", now)
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return False
            self._runs[run_id] = run._replace(status=NEEDS_ATTENTION, owner=None, lease_until=None, wake_at=None,
                                              waiting=None, waits_for=None, attention=reason, updated_at=now)
            return True

    def continue_as_new(self, run_id: str, epoch: int, input: bytes, *, drop_events: Sequence[int],
                        now: float) -> bool:
        check_run_id(run_id)
        check_epoch(epoch)
        data = check_payload("input", input, optional=False)
        drop = check_seqs("drop_events", drop_events)
        now = check_time("now", now)
        with self._lock:
            run = self._held(run_id, epoch)
            if run is None:
                return False
            self._journals[run_id] = []
            self._events[run_id] = [e for e in self._events[run_id] if e.seq not in drop]
            self._runs[run_id] = run._replace(input=data, status=PENDING, epoch=epoch + 1, owner=None,
                                              lease_until=None, wake_at=now, waiting=None, waits_for=None,
                                              generation=run.generation + 1, updated_at=now)
            return True

    # -- operators -----------------------------------------------------------------------------
    def cancel(self, run_id: str, *, now: float) -> RunRecord | None:
        check_run_id(run_id)
        now = check_time("now", now)
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.terminal:
                return run
            run = run._replace(status=CANCELLED, epoch=run.epoch + 1, owner=None, lease_until=None, wake_at=None,
                               waiting=None, waits_for=None, updated_at=now)
            self._runs[run_id] = run
            self._notify_parent(run, now)
            return run

    def reset(self, run_id: str, to_position: int, *, now: float) -> RunRecord | None:
        check_run_id(run_id)
        check_position(to_position)
        now = check_time("now", now)
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            self._journals[run_id] = self._journals[run_id][:to_position]
            run = run._replace(status=PENDING, epoch=run.epoch + 1, owner=None, lease_until=None, wake_at=now,
                               waiting=None, waits_for=None, result=None, error=None, attention=None,
                               updated_at=now)
            self._runs[run_id] = run
            return run

    # -- events --------------------------------------------------------------------------------
    def send(self, run_id: str, topic: str, event_id: str, payload: bytes, *,
             now: float) -> tuple[bool, RunRecord | None]:
        check_run_id(run_id)
        check_text("a topic", topic)
        check_text("an event id", event_id)
        data = check_payload("payload", payload, optional=False)
        now = check_time("now", now)
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return False, None
            if run.terminal:
                return False, run
            events = self._events[run_id]
            if any(e.event_id == event_id for e in events):
                return False, run
            seq = run.inbox_count + 1
            events.append(Event(seq, topic, event_id, data, now))
            run = run._replace(inbox_count=seq, updated_at=now)
            self._runs[run_id] = run
            return True, run

    def events(self, run_id: str, topic: str | None = None, after_seq: int = 0,
               limit: int = 100) -> list[Event]:
        check_run_id(run_id)
        check_text("a topic", topic, optional=True)
        check_position(after_seq)
        check_limit(limit)
        with self._lock:
            got = [e for e in self._events.get(run_id, ()) if e.seq > after_seq and (topic is None or e.topic == topic)]
        return got[:limit]

    # -- the sweeper ---------------------------------------------------------------------------
    def due(self, *, now: float, limit: int = 500) -> list[tuple[str, str]]:
        now = check_time("now", now)
        check_limit(limit)
        out: list[tuple[str, str]] = []
        with self._lock:
            for run in self._runs.values():
                reason = _due_reason(run, now)
                if reason is not None:
                    out.append((run.id, reason))
                    if len(out) >= limit:
                        break
        return out

    def parked_on(self, *, limit: int = 500, after: str | None = None) -> list[tuple[str, str]]:
        check_limit(limit)
        if after is not None:
            check_run_id(after)
        with self._lock:
            got = sorted((r.id, r.waits_for) for r in self._runs.values()
                         if r.status == PARKED and r.waits_for is not None and (after is None or r.id > after))
        return got[:limit]  # type: ignore[return-value]


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

