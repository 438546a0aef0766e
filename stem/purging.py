"""Purge with statuses: every task a purge deletes ends REVOKED, reason ``purged``.

Why: deleting a queue's waiting messages and recording nothing leaves their statuses
PENDING for good: ``wait_for_task`` waits until its timeout, and a group or chord with a
purged member never counts it, so it never finishes (Celery #2911 / #3317).  So a purge
ends each task as a worker ends a revoked one it meets (``stem.worker.settle``,
``finish_unrun``): its REVOKED status is stored (which wakes its waiters) and, for a
canvas task, it is reported to its group or chain (``stem.canvas.Runner``), recorded by
member id, so it counts once however often it is reported; the group then fails or runs
its callback with a ``MemberFailure`` as its ``on_failure`` policy says.

The steps, each safe to repeat (the broker's "Purge with statuses"):

1. ``broker.purge_hold(queue)``: every waiting message moves into the queue's holding area
   in one atomic step, its key released (as ``purge`` always did).  No worker sees it again.
2. Page by page (``batch`` entries, so a million messages never make one reply): decode
   each frame, store the REVOKED statuses and carry the canvas tasks on.
3. ``broker.purge_drop(queue, ids)``: the page leaves the holding area.

A purge killed anywhere leaves each message waiting (before 1), or held (after 1; with or
without its status stored, with or without its group count): ``purge_queue`` again
finishes the job, storing and reporting the held ones again (idempotent).  A task whose
stored status is already terminal (a copy of it ran, or the status of an earlier,
interrupted purge) keeps that status and is reported with it.

A frame that does not decode at all is dropped and counted in ``unreadable``: it has no
task to give a status to.  One that decodes but fails its signature check gets its REVOKED
status under the broker's task id, and is reported to its group only from its unverified
place (as the worker does for its DEAD status: it can only fail a group, never complete one).
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

from . import _checks as checks
from .brokers.base import validate_queue_name
from .envelope import decode_frame
from .errors import BackendError, BrokerError, DecodeError, SignatureError
from .redact import shown_args
from .results import TERMINAL_STATES, Reason, TaskState, TaskStatus, apply_result_options, check_result_options

__all__ = ["PurgeReport", "purge_queue", "DEFAULT_BATCH"]

log = logging.getLogger("stem.purge")

#: Held entries read, recorded and dropped per step.
DEFAULT_BATCH = 1000
#: What stops a purge (to be run again later) rather than being skipped.
_OUTAGES = (BrokerError, BackendError)


class PurgeReport(NamedTuple):
    queue: str
    purged: int         # messages deleted for good (held entries dropped), this run and any it finished
    revoked: int        # of those, tasks given their REVOKED status now
    kept: int           # of those, tasks whose stored status was terminal already (left as it was)
    unreadable: int     # of those, frames that do not decode: dropped, no status


def _unverified(frame: bytes) -> Any:
    try:
        return decode_frame(frame, None)
    except Exception:  # noqa: BLE001 - best effort, as the worker's dead_unrun
        return None


def purge_queue(stem: Any, queue: str, *, batch: int = DEFAULT_BATCH) -> PurgeReport:
    """Delete every waiting (ready, delayed, throttled) task of ``queue`` and end each one
    REVOKED with reason ``purged`` (see the module docstring).  ``stem`` is a producer
    (``stem.Stem``) with a result backend.  Running tasks are not touched; dead letters
    stay (they have their DEAD statuses).  Safe to run again after a crash: it finishes
    what an interrupted purge held."""
    validate_queue_name(queue)
    checks.integer("batch", batch)
    backend = stem._require_backend()
    broker = stem.broker
    moved = broker.purge_hold(queue)
    log.info("purge of %s: %d waiting message(s) held", queue, moved)
    from .canvas import Runner
    runner = Runner(stem)
    purged = revoked = kept = unreadable = 0
    while True:
        page = broker.purge_held(queue, batch)
        if not page:
            break
        r, k, u = _record_page(stem, backend, runner, queue, page)
        revoked, kept, unreadable = revoked + r, kept + k, unreadable + u
        purged += broker.purge_drop(queue, [h.id for h in page])
    return PurgeReport(queue, purged, revoked, kept, unreadable)


def _record_page(stem: Any, backend: Any, runner: Any, queue: str, page: list) -> tuple[int, int, int]:
    """Store the REVOKED statuses of one page of held messages and carry their canvases on;
    returns (revoked, kept, unreadable)."""
    registry = stem.registry
    now = time.time()
    envs: list[tuple[Any, Any, bool]] = []      # (task id, envelope or None, verified)
    unreadable = 0
    frames = {}
    for held in page:
        try:
            env, verified = decode_frame(held.frame, stem.signer), True
        except SignatureError:
            env, verified = _unverified(held.frame), False
        except DecodeError:
            env, verified = None, False
        except Exception:  # noqa: BLE001 - whatever a frame holds, it never stops a purge
            log.exception("decoding purged message %s failed unexpectedly", held.task_id)
            env, verified = None, False
        if env is None or not held.task_id:
            unreadable += 1
            continue
        envs.append((held.task_id, env, verified))
        frames[held.task_id] = len(held.frame)
    existing = backend.get_many([task_id for task_id, _, _ in envs]) if envs else []
    store: list[TaskStatus] = []
    ended: list[tuple[Any, TaskStatus]] = []
    revoked = kept = 0
    for (task_id, env, verified), old in zip(envs, existing):
        if old is not None and old.state in TERMINAL_STATES:
            status = old
            kept += 1
        elif verified:
            handler = registry.get(env.name) if registry is not None and env.name in registry else None
            if handler is not None:             # its status lives, and shows its arguments, as its handler says
                apply_result_options(env, handler.options)
            check_result_options(env)
            args = shown_args(env.args, None if handler is None else handler.options.redact,
                              size_hint=frames[task_id])
            status = TaskStatus.of(env, TaskState.REVOKED, reason=str(Reason.PURGED),
                                   error=f"purged from queue {queue!r}", finished_at=now, args=args)
            status.queue = queue
            store.append(status)
            revoked += 1
        else:
            status = TaskStatus(id=task_id, state=TaskState.REVOKED, queue=queue, reason=str(Reason.PURGED),
                                error=f"purged from queue {queue!r} (its signature did not verify)", finished_at=now)
            store.append(status)
            revoked += 1
        if env.canvas and env.id == task_id:
            ended.append((env, status))
    in_canvas = {id(s) for _, s in ended}
    plain = [s for s in store if id(s) not in in_canvas]
    if plain:
        backend.store_many(plain)
    if ended:
        _carry_on(backend, runner, ended, [s for s in store if id(s) in in_canvas])
    return revoked, kept, unreadable


def _carry_on(backend: Any, runner: Any, ended: list, store: list[TaskStatus]) -> None:
    """``Runner.finished_many`` for a page; when it fails on something other than an outage
    (a group description that does not verify, a forged canvas place), one by one, each
    failure logged and skipped: an entry that can never be carried on must not make every
    purge of its queue fail at the same place.  An outage propagates (the page stays held:
    run the purge again)."""
    try:
        runner.finished_many(ended, store)
        return
    except _OUTAGES:
        raise
    except Exception:  # noqa: BLE001 - sorted out one by one below
        log.warning("carrying %d purged canvas tasks on together failed; one by one", len(ended), exc_info=True)
    if store:
        backend.store_many(store)
    for env, status in ended:
        try:
            runner.finished(env, status)
        except _OUTAGES:
            raise
        except Exception:  # noqa: BLE001 - its status is stored; only its canvas place is lost
            log.exception("cannot carry the canvas of purged task %s on", env.id)

