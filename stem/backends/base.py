"""The ``ResultBackend`` protocol: task statuses, heartbeats, revocations.

Every adapter (memory, sqlite, redis, postgres) implements all three parts so
``wait_for_task``, ``stem worker status`` and persistent revokes work the same
way everywhere (``tests/contract`` proves it).

* ``store`` is an upsert of the whole status.  A terminal status wakes every
  ``wait`` on that id, in any process that can reach the backend, without the
  waiter busy-polling (condition variables, pub/sub, LISTEN/NOTIFY ...).
* Statuses expire after ``result_expires`` seconds (default one day); an
  expired or unknown id reads as ``None`` (``Stem.get_status`` turns that
  into PENDING).
* Heartbeats are per worker id and vanish ``ttl`` seconds after the last put,
  so a dead worker disappears by itself.
* Revocations are persistent (until ``expires``) so a worker that starts after
  the revoke still honours it.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

from ..results import TaskStatus

__all__ = ["ResultBackend", "DEFAULT_RESULT_EXPIRES"]

DEFAULT_RESULT_EXPIRES = 86400.0


class ResultBackend(abc.ABC):
    url: str = ""
    result_expires: float = DEFAULT_RESULT_EXPIRES

    # -- statuses ---------------------------------------------------------------
    @abc.abstractmethod
    def store(self, status: TaskStatus) -> None:
        """Upsert ``status``; durable (as the adapter is) when this returns."""

    def store_many(self, statuses: Sequence[TaskStatus]) -> None:
        """Upsert a batch in one round trip where the adapter allows it."""
        for s in statuses:
            self.store(s)

    def store_many_and_ack(self, statuses: Sequence[TaskStatus], broker: Any, deliveries: Sequence[Any]) -> bool:
        """Store ``statuses`` and ack ``deliveries`` together (one transaction or one
        round trip) when ``broker`` lives in the same store; True if done.  The default
        does nothing and returns False: the worker then stores, then acks."""
        return False

    def store_many_ack_and_consume(self, statuses: Sequence[TaskStatus], broker: Any, deliveries: Sequence[Any],
                                   queues: Sequence[str], max_count: int, consumer: str) -> list | None:
        """``store_many_and_ack``, then lease up to ``max_count`` deliveries from ``queues``
        for ``consumer`` (as ``broker.consume`` with no wait would), all in one round trip,
        when ``broker`` lives in the same store; returns the new deliveries.  Tried once,
        never retried (a retry might lease twice); on an error nothing of the consume is
        left to the caller and it settles the usual way.  The default does nothing and
        returns None: the worker then never asks again."""
        return None

    @abc.abstractmethod
    def get(self, task_id: str) -> TaskStatus | None:
        """The latest status, or None when unknown or expired."""

    def get_many(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        return [self.get(t) for t in task_ids]

    @abc.abstractmethod
    def wait(self, task_id: str, timeout: float) -> TaskStatus | None:
        """Block until the task reaches a terminal state (return it) or
        ``timeout`` seconds pass (return the latest status, possibly None)."""

    @abc.abstractmethod
    def forget(self, task_id: str) -> None:
        """Drop the stored status."""

    # -- heartbeats -------------------------------------------------------------
    @abc.abstractmethod
    def put_heartbeat(self, worker_id: str, data: dict[str, Any], ttl: float) -> None:
        """Store the worker's heartbeat; it disappears ``ttl`` seconds later unless renewed."""

    @abc.abstractmethod
    def heartbeats(self) -> list[dict[str, Any]]:
        """Every live heartbeat (each dict as put, plus ``worker_id`` and ``seen_at``)."""

    @abc.abstractmethod
    def remove_heartbeat(self, worker_id: str) -> None:
        """Called by a worker on clean shutdown."""

    # -- revocations ------------------------------------------------------------
    @abc.abstractmethod
    def revoke(self, task_ids: Sequence[str], expires: float | None = None) -> None:
        """Remember that these ids must not run (for ``expires`` seconds, default ``result_expires``)."""

    @abc.abstractmethod
    def revoked(self, task_ids: Sequence[str] | None = None) -> set[str]:
        """The revoked ids among ``task_ids`` (all live revocations when None)."""

    # -- misc -------------------------------------------------------------------
    def close(self) -> None:
        """Release connections.  Safe to call twice."""

    def ping(self) -> None:
        """Raise ``BackendConnectionError`` when the backend cannot be reached."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
