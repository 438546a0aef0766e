"""The in-memory result backend: statuses, heartbeats and revocations for one process.

``wait`` sleeps on a condition variable that ``store`` notifies, so a waiter
wakes the moment the worker stores a terminal status.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

from .. import _checks as checks
from ..results import TaskStatus
from .base import DEFAULT_RESULT_EXPIRES, ResultBackend, check_non_terminal, check_proofs

__all__ = ["InMemoryResultBackend"]


class InMemoryResultBackend(ResultBackend):
    def __init__(self, *, result_expires: float = DEFAULT_RESULT_EXPIRES, url: str = "memory://"):
        self.url = url
        self.result_expires = checks.seconds("result_expires", result_expires)
        self._cond = threading.Condition(threading.Lock())
        self._statuses: dict[str, tuple[TaskStatus, float]] = {}
        self._heartbeats: dict[str, tuple[dict[str, Any], float]] = {}
        self._revoked: dict[str, tuple[float, bytes | None]] = {}   # id -> (until, proof)
        self._stores = 0

    @classmethod
    def from_url(cls, url: str = "memory://", **kwargs) -> "InMemoryResultBackend":
        return cls(url=url, **kwargs)

    def store(self, status: TaskStatus) -> None:
        self.store_many((status,))

    def store_many(self, statuses: Sequence[TaskStatus]) -> None:
        expires = time.time() + self.result_expires
        with self._cond:
            for s in statuses:
                self._statuses[s.id] = (s, expires)
            if len(self._statuses) > 4096:
                self._stores += len(statuses)
                if self._stores > len(self._statuses) // 2:
                    self._expire(time.time())
            self._cond.notify_all()

    def store_if_not_terminal(self, statuses: Sequence[TaskStatus]) -> None:
        check_non_terminal(statuses)
        now = time.time()
        expires = now + self.result_expires
        with self._cond:
            for s in statuses:
                current = self._get(s.id, now)
                if current is None or not current.is_terminal:
                    self._statuses[s.id] = (s, expires)

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

    def wait(self, task_id: str, timeout: float) -> TaskStatus | None:
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while True:
                status = self._get(task_id, time.time())
                if status is not None and status.is_terminal:
                    return status
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return status
                self._cond.wait(remaining)

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
