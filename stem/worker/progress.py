"""Statuses of running tasks (started, progress): coalesced, and written off the hot path.

A RUNNING status tells a waiter that its task started and how far it got; the
queue depends on none of it.  So it never delays a result:

* ``ctx.progress()`` only notes the latest value per task (latest wins), on
  whichever thread reads it from the child;
* a task still running ``STARTED_AFTER`` seconds after it started gets a
  RUNNING status of its own (a task that runs for minutes without progress
  calls is visible as started; short tasks cost nothing);
* the settle thread (or the main loop, without one) writes what is noted at
  most once per ``FLUSH_INTERVAL``, all tasks in one batch, between settle
  batches, and forgets what a terminal settle superseded;
* the write is conditional (``ResultBackend.store_if_not_terminal``), so a
  late RUNNING never turns SUCCEEDED back into RUNNING, whatever the order;
* a failed write is logged and dropped: the next note carries the latest;
* a task with ``ignore_result`` gets none: a success would leave it behind.
  Its lifetime otherwise is the longer of the task's own (``ttl_of``), and
  the backend keeps it at least ``result_expires``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable

from ..errors import StemError
from ..results import TaskState, TaskStatus

__all__ = ["StatusBoard", "FLUSH_INTERVAL", "STARTED_AFTER"]

log = logging.getLogger("stem.worker")

FLUSH_INTERVAL = 0.25
STARTED_AFTER = 1.0


class StatusBoard:
    def __init__(self, backend: Any, worker_id: str, *, interval: float = FLUSH_INTERVAL):
        self._backend = backend
        self._worker_id = worker_id
        self._interval = interval
        self._pending: dict[str, TaskStatus] = {}
        self._lock = threading.Lock()
        self._next_flush = 0.0

    def started(self, envelope: Any, started_at: float | None, *, args: dict | None = None,
                children: list[str] | None = None) -> None:
        """Note that this task runs (unless a progress note already says more); ``args``
        and ``children`` as its statuses show them (``Job.shown_args``, ``Job.children``)."""
        if envelope.ignore_result:
            return
        with self._lock:
            if envelope.id not in self._pending:
                self._pending[envelope.id] = self._status(envelope, started_at, None, envelope.meta, args, children)

    def progress(self, envelope: Any, started_at: float | None, fraction: float, data: Any, *,
                 args: dict | None = None, children: list[str] | None = None) -> None:
        """Note the task's latest progress (replacing any earlier note)."""
        if envelope.ignore_result:
            return
        meta = dict(envelope.meta)
        if data is not None:
            meta["progress_data"] = data
        status = self._status(envelope, started_at, fraction, meta, args, children)
        with self._lock:
            self._pending[envelope.id] = status

    def forget(self, task_ids: Iterable[str]) -> None:
        """Drop the notes of tasks whose outcome is being stored."""
        if self._pending:
            with self._lock:
                for task_id in task_ids:
                    self._pending.pop(task_id, None)

    def flush(self, now: float, *, force: bool = False) -> None:
        """Write what is noted when ``FLUSH_INTERVAL`` has passed since the last write."""
        if not self._pending or (not force and now < self._next_flush):
            return
        with self._lock:
            statuses = list(self._pending.values())
            self._pending.clear()
        self._next_flush = now + self._interval
        try:
            self._backend.store_if_not_terminal(statuses)
        except StemError as exc:
            log.warning("could not store the progress of %d running tasks (%s); the next note retries",
                        len(statuses), exc)

    def _status(self, env: Any, started_at: float | None, fraction: float | None, meta: dict, args: dict | None,
                children: list[str] | None) -> TaskStatus:
        status = TaskStatus.of(env, TaskState.RUNNING, progress=fraction, started_at=started_at,
                               updated_at=time.time(), worker=self._worker_id, args=args,
                               children=None if children is None else list(children))
        status.meta = meta
        return status
