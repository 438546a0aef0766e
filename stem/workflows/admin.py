"""What operators do to runs (``stem wf ...``, the dashboard): look, cancel, reset, retry.

Each takes a producer (its broker, for the wake-up; its backend, for the mirror), the
workflow store and the queue activations go to.  They need no registry: the worker
that picks the wake up replays the run with its own code.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError, RunNotFoundError
from . import clock
from .codec import decode, decode_error
from .mirror import mirror
from .store import FAILED, PARKED, JournalEntry, RunRecord, WorkflowStore, check_position, check_run_id
from .wake import publish_wake

__all__ = ["describe", "entry_view", "cancel", "reset", "retry", "failing_position"]

#: Characters of a recorded value ``describe`` shows (``--json`` shows values whole).
PREVIEW = 200


def _get(store: WorkflowStore, run_id: str) -> RunRecord:
    run = store.get(check_run_id(run_id))
    if run is None:
        raise RunNotFoundError(f"no workflow run {run_id!r}")
    return run


def _value(data: bytes | None) -> Any:
    try:
        return decode(data)
    except Exception:  # noqa: BLE001 - shown as bytes: it was not the engine's msgpack
        return data


def entry_view(e: JournalEntry) -> dict[str, Any]:
    return {"position": e.position, "kind": e.kind, "name": e.name, "attempt": e.attempt, "epoch": e.epoch,
            "at": e.created_at, "output": _value(e.output),
            "error": None if e.error is None else decode_error(e.error)}


def run_view(run: RunRecord) -> dict[str, Any]:
    return {"id": run.id, "workflow": run.name, "version": run.version, "status": run.status, "epoch": run.epoch,
            "generation": run.generation, "owner": run.owner, "lease_until": run.lease_until,
            "wake_at": run.wake_at, "waiting": _value(run.waiting), "waits_for": run.waits_for,
            "inbox": run.inbox_count, "inbox_seen": run.inbox_seen, "parent": run.parent,
            "input": _value(run.input), "result": _value(run.result),
            "error": None if run.error is None else decode_error(run.error), "attention": run.attention,
            "created_at": run.created_at, "updated_at": run.updated_at}


def describe(store: WorkflowStore, run_id: str, *, events: int = 50) -> dict[str, Any]:
    """The run, its journal and its newest events (at most ``events``)."""
    run = _get(store, run_id)
    inbox = store.events(run_id, after_seq=max(0, run.inbox_count - events), limit=events) if events else []
    return {**run_view(run), "journal": [entry_view(e) for e in store.journal(run_id)],
            "events": [{"seq": e.seq, "topic": e.topic, "event_id": e.event_id, "payload": _value(e.payload),
                        "at": e.created_at} for e in inbox]}


def cancel(producer: Any, store: WorkflowStore, run_id: str, *, queue: str = "default") -> RunRecord:
    """End a run CANCELLED (an activation holding it is fenced out) and mirror it REVOKED;
    its parent, if parked on it, is woken.  A terminal run is left as it is (its mirror is
    written again).  The run's children go on: cancel them by their ids."""
    check_run_id(run_id)
    run = store.cancel(run_id, now=clock.now())
    if run is None:
        raise RunNotFoundError(f"no workflow run {run_id!r}")
    mirror(producer.backend, run, queue)
    if run.parent is not None:
        parent = store.get(run.parent)
        if parent is not None and parent.status == PARKED:
            publish_wake(producer, parent.id, parent.epoch, "done", queue)
    return run


def reset(producer: Any, store: WorkflowStore, run_id: str, to_position: int, *,
          queue: str = "default") -> RunRecord:
    """Delete the journal from ``to_position`` on and run the run again from there (any
    status: NEEDS_ATTENTION to resume after a code change, FAILED or CANCELLED to retry).
    Entries before it are replayed as recorded; calls from it on are made again (a
    called task or a child run started again gets a new id)."""
    check_position(to_position)
    run = _get(store, run_id)
    length = len(store.journal(run_id))
    if to_position > length:
        raise ConfigurationError(f"run {run_id} has {length} journal entries: reset to a position from 0 to {length}")
    run = store.reset(run_id, to_position, now=clock.now())
    if run is None:
        raise RunNotFoundError(f"no workflow run {run_id!r}")
    mirror(producer.backend, run, queue, force=True)
    publish_wake(producer, run_id, run.epoch, "reset", queue)
    return run


def failing_position(journal: list[JournalEntry]) -> int:
    """Where ``retry`` resets a FAILED run to: the last entry when it records a failure
    (for a called task's, the call itself, so a new task is published), else the end of
    the journal (the workflow's own code raised after its last durable call)."""
    if journal and journal[-1].error is not None:
        last = journal[-1]
        if last.kind == "call.result" and last.position > 0 and journal[last.position - 1].kind == "call":
            return last.position - 1
        return last.position
    return len(journal)


def retry(producer: Any, store: WorkflowStore, run_id: str, *, queue: str = "default") -> tuple[RunRecord, int]:
    """Run a FAILED run again from where it failed (``failing_position``); returns the run
    and that position."""
    run = _get(store, run_id)
    if run.status != FAILED:
        raise ConfigurationError(f"run {run_id} is {run.status}: retry takes a FAILED run "
                                 f"(reset RUN --to POSITION runs any run again from a position)")
    position = failing_position(store.journal(run_id))
    return reset(producer, store, run_id, position, queue=queue), position
