"""The in-memory result backend: statuses, heartbeats, revocations and schedule records for one process.

Waits register under the backend's lock and read there too (``WaitHub`` in
inline mode, on the same lock); ``store`` hands each status to the waiters of
its id under that lock, so a waiter wakes the moment the worker stores a
terminal status, and only the waiters of that id wake.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

from .. import _checks as checks
from ..results import TaskStatus
from .groups import GroupRecord, check_create, check_group_id, check_lifetime, check_member
from .waiting import Waiter, WaitHub
from .base import (DEFAULT_RESULT_EXPIRES, ResultBackend, ScheduleRecord, check_definition, check_fired,
                   check_non_terminal, check_proofs, check_schedule_ids, status_ttl)

__all__ = ["InMemoryResultBackend"]


class InMemoryResultBackend(ResultBackend):
    def __init__(self, *, result_expires: float = DEFAULT_RESULT_EXPIRES, url: str = "memory://"):
        self.url = url
        self.result_expires = checks.seconds("result_expires", result_expires)
        self._cond = threading.Condition(threading.Lock())
        self._waits = WaitHub(name="memory", read=None, lock=self._cond, label=url)
        self._statuses: dict[str, tuple[TaskStatus, float]] = {}
        self._heartbeats: dict[str, tuple[dict[str, Any], float]] = {}
        self._revoked: dict[str, tuple[float, bytes | None]] = {}   # id -> (until, proof)
        self._stores = 0
        self._schedules: dict[str, ScheduleRecord] = {}
        self._groups: dict[str, _Group] = {}

    @classmethod
    def from_url(cls, url: str = "memory://", **kwargs) -> "InMemoryResultBackend":
        return cls(url=url, **kwargs)

    def workflow_store_recipe(self) -> tuple[str, Any] | None:
        return ("stem.workflows.store_memory:MemoryWorkflowStore", self)

    def store(self, status: TaskStatus) -> None:
        self.store_many((status,))

    def store_many(self, statuses: Sequence[TaskStatus]) -> None:
        now, default = time.time(), self.result_expires
        entries = [(s, now + status_ttl(s, default)) for s in statuses]   # checked before any is stored
        with self._cond:
            for entry in entries:
                self._statuses[entry[0].id] = entry
            if len(self._statuses) > 4096:
                self._stores += len(statuses)
                if self._stores > len(self._statuses) // 2:
                    self._expire(time.time())
            self._waits.offer_locked(statuses)

    def store_if_not_terminal(self, statuses: Sequence[TaskStatus]) -> None:
        check_non_terminal(statuses)
        now, default = time.time(), self.result_expires
        entries = [(s, now + status_ttl(s, default)) for s in statuses]
        with self._cond:
            for entry in entries:
                current = self._get(entry[0].id, now)
                if current is None or not current.is_terminal:
                    self._statuses[entry[0].id] = entry

    def _expire(self, now: float) -> None:
        self._stores = 0
        dead = [k for k, (_, exp) in self._statuses.items() if exp <= now]
        for k in dead:
            del self._statuses[k]

    def get(self, task_id: str) -> TaskStatus | None:
        with self._cond:
            return self._get(task_id, time.time())

    def _get(self, task_id: str, now: float) -> TaskStatus | None:
        entry = self._statuses.get(task_id)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._statuses[task_id]
            return None
        return entry[0]

    def get_many(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        now = time.time()
        with self._cond:
            return [self._get(t, now) for t in task_ids]

    def _open_wait(self, ids: list[str], mode: str, keep_latest: bool, deadline: float) -> Waiter:
        """Register and read under the lock ``store`` holds to announce: nothing falls between."""
        now = time.time()
        with self._cond:
            waiter = self._waits.open(ids, mode, keep_latest)
            self._waits.offer_locked([s for s in (self._get(i, now) for i in ids) if s is not None])
        return waiter

    def forget(self, task_id: str) -> None:
        with self._cond:
            self._statuses.pop(task_id, None)

    def put_heartbeat(self, worker_id: str, data: dict[str, Any], ttl: float) -> None:
        ttl = checks.seconds("ttl", ttl)
        now = time.time()
        with self._cond:
            self._heartbeats[worker_id] = ({**data, "worker_id": worker_id, "seen_at": now}, now + ttl)

    def heartbeats(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._cond:
            for k in [k for k, (_, exp) in self._heartbeats.items() if exp <= now]:
                del self._heartbeats[k]
            return [dict(d) for d, _ in self._heartbeats.values()]

    def remove_heartbeat(self, worker_id: str) -> None:
        with self._cond:
            self._heartbeats.pop(worker_id, None)

    def revoke(self, task_ids: Sequence[str], expires: float | None = None,
               proofs: Sequence[bytes | None] | None = None) -> None:
        expires = checks.optional_seconds("expires", expires)
        task_ids = list(task_ids)
        checked = check_proofs(task_ids, proofs)
        until = time.time() + (self.result_expires if expires is None else expires)
        with self._cond:
            for t, proof in zip(task_ids, checked):
                self._revoked[t] = (until, proof)

    def _live_revocations(self) -> dict[str, tuple[float, bytes | None]]:
        now = time.time()
        for k in [k for k, (exp, _) in self._revoked.items() if exp <= now]:
            del self._revoked[k]
        return self._revoked

    def revoked(self, task_ids: Sequence[str] | None = None) -> set[str]:
        with self._cond:
            live = self._live_revocations()
            if task_ids is None:
                return set(live)
            return {t for t in task_ids if t in live}

    def revocation_proofs(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        with self._cond:
            live = self._live_revocations()
            return {t: live[t][1] for t in task_ids if t in live and live[t][1] is not None}

    # -- schedule records ---------------------------------------------------------------
    def schedule_records(self, ids: Sequence[str] | None = None) -> dict[str, ScheduleRecord]:
        wanted = check_schedule_ids(ids)
        with self._cond:
            if wanted is None:
                return dict(self._schedules)
            return {i: self._schedules[i] for i in wanted if i in self._schedules}

    def _record(self, schedule_id: str, now: float) -> ScheduleRecord:
        return self._schedules.get(schedule_id) or ScheduleRecord(schedule_id, None, False, None, None, now)

    def put_schedule(self, schedule_id: str, definition: bytes | None) -> None:
        checks.schedule_id(schedule_id)
        definition = check_definition(definition)
        now = time.time()
        with self._cond:
            self._schedules[schedule_id] = self._record(schedule_id, now)._replace(definition=definition,
                                                                                    updated_at=now)

    def remove_schedule(self, schedule_id: str) -> bool:
        checks.schedule_id(schedule_id)
        with self._cond:
            return self._schedules.pop(schedule_id, None) is not None

    def pause_schedule(self, schedule_id: str, paused: bool) -> bool:
        checks.schedule_id(schedule_id)
        checks.flag("paused", paused)
        now = time.time()
        with self._cond:
            record = self._schedules.get(schedule_id)
            if record is not None and record.paused == paused:
                return False
            self._schedules[schedule_id] = self._record(schedule_id, now)._replace(paused=paused, updated_at=now)
            return paused or record is not None

    def mark_fired(self, schedule_id: str, fire_time: float, run_id: str) -> None:
        schedule_id, fire_time, run_id = check_fired(schedule_id, fire_time, run_id)
        now = time.time()
        with self._cond:
            record = self._record(schedule_id, now)
            if schedule_id not in self._schedules or record.last_fired is None or record.last_fired < fire_time:
                self._schedules[schedule_id] = record._replace(last_fired=fire_time, last_run_id=run_id,
                                                               updated_at=now)

    # -- group records -------------------------------------------------------------------
    def _group(self, group_id: str, now: float) -> "_Group | None":
        g = self._groups.get(group_id)
        if g is not None and g.expires_at is not None and g.expires_at <= now:
            del self._groups[group_id]
            return None
        return g

    def group_create(self, group_id: str, expected: int, data: bytes, *, seal_by: float, ttl: float,
                     held: bool = False) -> bool:
        group_id, expected, data, seal_by, ttl, held = check_create(group_id, expected, data, seal_by, ttl, held)
        now = time.time()
        with self._cond:
            if self._group(group_id, now) is not None:
                return False
            self._groups[group_id] = _Group(group_id, expected, data, now, seal_by, ttl, held)
            return True

    def group_seal(self, group_id: str) -> GroupRecord | None:
        check_group_id(group_id)
        now = time.time()
        with self._cond:
            g = self._group(group_id, now)
            if g is None:
                return None
            g.sealed = True
            g.maybe_end(now)
            return g.record()

    def group_record(self, group_id: str, member_id: str, index: int, ok: bool,
                     outcome: bytes, ttl: float | None = None) -> GroupRecord | None:
        group_id, member_id, index, outcome, ttl = check_member(group_id, member_id, index, outcome, ttl,
                                                                self.result_expires)
        now = time.time()
        with self._cond:
            g = self._group(group_id, now)
            if g is None:
                return None
            if member_id not in g.done:
                g.ttl = ttl if not g.done else max(g.ttl, ttl)
                g.done.add(member_id)
                g.outcomes[index] = outcome
                if ok:
                    g.succeeded += 1
                else:
                    g.failed_ids.add(member_id)
                g.maybe_end(now)
            return g.record()

    def group_release(self, group_id: str, ttl: float | None = None) -> GroupRecord | None:
        check_group_id(group_id)
        ttl = check_lifetime(ttl, self.result_expires)
        now = time.time()
        with self._cond:
            g = self._group(group_id, now)
            if g is None:
                return None
            g.held = False
            g.ttl = max(g.ttl, ttl)
            if g.ended:
                g.expires_at = now + g.ttl
            return g.record()

    def group_get(self, group_id: str) -> GroupRecord | None:
        check_group_id(group_id)
        with self._cond:
            g = self._group(group_id, time.time())
            return None if g is None else g.record()

    def group_outcomes(self, group_id: str, start: int, stop: int) -> list[bytes | None]:
        check_group_id(group_id)
        with self._cond:
            g = self._group(group_id, time.time())
            if g is None:
                return [None] * max(0, stop - start)
            return [g.outcomes.get(i) for i in range(start, stop)]

    def group_failed_members(self, group_id: str, limit: int = 100) -> list[str]:
        check_group_id(group_id)
        with self._cond:
            g = self._group(group_id, time.time())
            return [] if g is None else sorted(g.failed_ids)[:limit]

    def group_interrupt_unsealed(self, now: float | None = None) -> list[GroupRecord]:
        now = time.time() if now is None else now
        out = []
        with self._cond:
            for g in list(self._groups.values()):
                if self._group(g.id, now) is None:
                    continue
                if not g.sealed and not g.interrupted and g.seal_by < now:
                    g.interrupted = True
                    g.expires_at = now + g.ttl      # held or not: no reader will come
                    out.append(g.record())
        return out


class _Group:
    __slots__ = ("id", "expected", "data", "created_at", "seal_by", "ttl", "held", "sealed", "interrupted", "done",
                 "failed_ids", "succeeded", "outcomes", "expires_at")

    def __init__(self, group_id: str, expected: int, data: bytes, created_at: float, seal_by: float, ttl: float,
                 held: bool):
        self.id, self.expected, self.data, self.created_at, self.seal_by, self.ttl, self.held = (
            group_id, expected, data, created_at, seal_by, ttl, held)
        self.sealed = self.interrupted = False
        self.done: set[str] = set()
        self.failed_ids: set[str] = set()
        self.succeeded = 0
        self.outcomes: dict[int, bytes] = {}
        self.expires_at: float | None = None      # set when it ends: a group never expires in flight

    @property
    def ended(self) -> bool:
        return self.interrupted or (self.sealed and len(self.done) >= self.expected)

    def maybe_end(self, now: float) -> None:
        if self.expires_at is None and not self.held and self.ended:
            self.expires_at = now + self.ttl

    def record(self) -> GroupRecord:
        return GroupRecord(self.id, self.expected, self.sealed, len(self.done), self.succeeded, len(self.failed_ids),
                           self.interrupted, self.data, self.created_at, self.seal_by, self.ttl, self.held)
