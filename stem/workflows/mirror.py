"""A run's status, mirrored under its run id in the result backend.

The store is the truth; the mirror is what ``Stem.get_status(run_id)``,
``wait_for_task(run_id)`` and the dashboard read, as for any task:

============================  ==========================================================
store                         mirrored ``TaskStatus``
============================  ==========================================================
PENDING                       PENDING
RUNNING, PARKED               RUNNING
NEEDS_ATTENTION               RUNNING, ``reason="needs-attention"``, ``error``: why
SUCCEEDED                     SUCCEEDED, ``result``: the workflow's return value
FAILED                        FAILED, ``reason="workflow-failed"``, error, type, traceback
CANCELLED                     REVOKED, ``reason="cancelled"``
============================  ==========================================================

``meta`` holds ``workflow`` (its name) and ``workflow_status`` (the store's word).
A terminal mirror is written after the store's terminal write; the activation that
ended the run writes it, and any later activation of a terminal run writes it again if
it is missing (a crash fell in between), so it is never lost.  Non-terminal mirrors
never overwrite a terminal one (``store_if_not_terminal``), except after an operator's
reset, which means it.
"""

from __future__ import annotations

from typing import Any

from ..results import TaskState, TaskStatus
from .codec import decode, decode_error
from .store import (CANCELLED, FAILED, NEEDS_ATTENTION, PENDING, SUCCEEDED, RunRecord)

__all__ = ["status_of", "mirror", "mirror_if_missing"]


def status_of(run: RunRecord, queue: str = "") -> TaskStatus:
    meta = {"workflow": run.name, "workflow_status": run.status}
    base = {"id": run.id, "name": run.name, "queue": queue, "meta": meta, "attempt": run.generation,
            "started_at": run.created_at, "updated_at": run.updated_at}
    if run.status == SUCCEEDED:
        return TaskStatus(state=TaskState.SUCCEEDED, result=decode(run.result), finished_at=run.updated_at, **base)
    if run.status == FAILED:
        err = decode_error(run.error)
        return TaskStatus(state=TaskState.FAILED, error=err.get("message"), error_type=err.get("type"),
                          traceback=err.get("traceback"), reason="workflow-failed", finished_at=run.updated_at,
                          **base)
    if run.status == CANCELLED:
        return TaskStatus(state=TaskState.REVOKED, reason="cancelled", finished_at=run.updated_at, **base)
    if run.status == PENDING:
        return TaskStatus(state=TaskState.PENDING, **base)
    if run.status == NEEDS_ATTENTION:
        return TaskStatus(state=TaskState.RUNNING, reason="needs-attention", error=run.attention,
                          error_type="NeedsAttention", **base)
    return TaskStatus(state=TaskState.RUNNING, **base)


def mirror(backend: Any, run: RunRecord, queue: str = "", *, force: bool = False) -> TaskStatus:
    """Write ``run``'s mirror; ``force`` overwrites a terminal one (a reset)."""
    status = status_of(run, queue)
    if status.is_terminal or force:
        backend.store(status)
    else:
        backend.store_if_not_terminal([status])
    return status


def mirror_if_missing(backend: Any, run: RunRecord, queue: str = "") -> bool:
    """Write a terminal run's mirror unless the backend already holds a terminal status
    for it; True if written."""
    current = backend.get(run.id)
    if current is not None and current.is_terminal:
        return False
    mirror(backend, run, queue)
    return True
