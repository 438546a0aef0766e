"""One activation of a run: claim it, re-run its function from the top, then park, finish
or ask for attention.

The body of the internal task ``stem.wf.activate`` (``stem.workflows.wake``).  In order:

1. **Look before claiming.**  A run that is absent, terminal (its mirror is written
   again if a crash lost it), NEEDS_ATTENTION, held under a live lease, or parked with
   nothing due (its timer ahead, no unread event, its task or child not ended) is left
   alone: duplicate and stale wakes cost one read.
2. **Claim** (compare-and-set: epoch + 1, a lease).  A renewal thread (``Lease``)
   extends the lease every third of it while the activation runs; a renewal refused
   means another activation claimed the run (this one stalled past its lease): every
   later write of this one is refused too, so it can change nothing.
3. **Passes.**  The function runs from the top with a ``WorkflowContext`` over the
   journal (``stem.workflows.context``); it ends by returning, raising, or one of the
   engine's signals.  A suspension parks the run with the inbox counter read at the
   start of the pass: ``"inbox"`` (an event arrived since) runs another pass instead,
   so an event is never left unread by a parked run.
4. **Publish** what the parking needs: a timer's delayed wake (broker time: the
   sweeper, reading the workflows' clock, covers a moved clock and a lost publish).

An activation that stops without an outcome (a broker or store outage, whose error
fails its task for a retry; ``WorkerShutdown`` of a soft shutdown) hands the run back
(``release``: PENDING, due now) instead of leaving it RUNNING until its lease runs out.

A run's terminal write (``finish``) comes before its mirror in the result backend,
and before the parent's wake (the store already gave the parent its ``__child__``
event in the same write).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from ..errors import BackendError, BrokerError, EncodeError, StemError, WorkerShutdown
from . import clock
from .codec import decode, encode, encode_error, error_of, roundtrip
from .context import (Attention, ContinueAsNew, EngineSignal, Fail, Fenced, Outage, PassState, Services, Suspend,
                      WorkflowContext, check_size)
from .mirror import mirror, mirror_if_missing
from .store import FAILED, NEEDS_ATTENTION, PARKED, PENDING, RUNNING, SUCCEEDED, RunRecord, WorkflowStore
from .wake import publish_wake

__all__ = ["activate", "Lease", "owner_id", "is_due", "MAX_PASSES", "REMIRROR_AFTER", "HAND_BACK"]

log = logging.getLogger("stem.workflows")

#: Passes of one activation at most (each after an event arrived during the last): past it the
#: activation returns and the run's lease, once expired, makes it due again.
MAX_PASSES = 1000
#: A RUNNING mirror is written again when the run was last touched this long ago (seconds), so a
#: run asleep for days does not lose its mirror to the backend's result lifetime.
REMIRROR_AFTER = 3600.0
#: What stops an activation without an outcome and hands its run back at once (``release``):
#: an outage (the activation's task is retried) or a soft shutdown (it is redelivered).
HAND_BACK = (BrokerError, BackendError, WorkerShutdown)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"[:200]


class Lease:
    """Renews the lease of the activation holding ``run_id`` at ``epoch`` every third of it."""

    def __init__(self, store: WorkflowStore, run_id: str, epoch: int, lease: float):
        self._store = store
        self._run_id = run_id
        self._epoch = epoch
        self._lease = lease
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(target=self._loop, name=f"stem-wf-lease-{run_id[:40]}", daemon=True)

    @property
    def lost(self) -> bool:
        return self._lost

    def start(self) -> "Lease":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _loop(self) -> None:
        while not self._stop.wait(self._lease / 3):
            try:
                ok = self._store.renew(self._run_id, self._epoch, now=clock.now(), lease=self._lease)
            except StemError as exc:
                log.warning("could not renew the lease of run %s (%s); trying again", self._run_id, exc)
                continue
            except Exception:  # noqa: BLE001 - a bug here must not kill the activation
                log.exception("renewing the lease of run %s failed", self._run_id)
                continue
            if not ok:
                self._lost = True
                log.warning("run %s: the lease of epoch %d was lost (another activation claimed it); this "
                            "activation can change nothing more", self._run_id, self._epoch)
                return


def is_due(run: RunRecord, now: float, store: WorkflowStore, backend: Any) -> bool:
    """Whether an activation has something to do for ``run`` (the claim still decides)."""
    if run.status == PENDING:
        return True
    if run.status == RUNNING:
        return run.lease_until is not None and run.lease_until <= now
    if run.status != PARKED:
        return False
    if run.wake_at is not None and run.wake_at <= now:
        return True
    if run.inbox_count > run.inbox_seen:
        return True
    if run.waits_for is not None:
        kind = run.waits_kind
        if kind is None and run.waiting:       # parked by a store before waits_kind (schema version 8)
            kind = "child" if (decode(run.waiting) or {}).get("kind") == "child" else "task"
        if kind == "child":
            child = store.get(run.waits_for)
            return child is None or child.terminal
        status = backend.get(run.waits_for)
        return status is None or status.is_terminal    # None: it may never have been published
    return False


def activate(*, workflows: Any, store: WorkflowStore, producer: Any, run_id: str, owner: str) -> str:
    """Run one activation of ``run_id``; returns what happened, as a word for the logs
    (absent, terminal, attention, unknown, not-due, held, parked, succeeded, failed,
    needs-attention, continued, fenced, busy)."""
    now = clock.now()
    run = store.get(run_id)
    if run is None:
        return "absent"
    backend = producer.backend
    queue = workflows.queue
    if run.terminal:
        mirror_if_missing(backend, run, queue)
        return "terminal"
    if run.status == NEEDS_ATTENTION:
        return "attention"
    definition = workflows.definition(run.name, run.version)
    if definition is None:
        log.error("run %s is of workflow %r (version %s), which this worker's registry does not hold: left for "
                  "a worker that has it", run_id, run.name, run.version)
        return "unknown"
    if not is_due(run, now, store, backend):
        return "not-due" if run.status == PARKED else "held"
    claimed = store.claim(run_id, owner, now=now, lease=workflows.lease)
    if claimed is None:
        return "held"
    if run.status == PENDING or now - run.updated_at >= REMIRROR_AFTER:
        mirror(backend, claimed, queue)
    lease = Lease(store, run_id, claimed.epoch, workflows.lease).start()
    try:
        outcome = _passes(workflows, store, producer, definition, claimed, lease)
    except HAND_BACK:
        lease.stop()
        _release(store, run_id, claimed.epoch)
        raise
    finally:
        lease.stop()
    if outcome == "fenced":
        log.warning("run %s: the activation of epoch %d was fenced out (another activation claimed the run after "
                    "this one outlived its lease); it changed nothing more", run_id, claimed.epoch)
    return outcome


def _release(store: WorkflowStore, run_id: str, epoch: int) -> None:
    """Hand the run back (best effort: in a store outage the release fails too, and the
    lease runs out as it would have)."""
    try:
        store.release(run_id, epoch, now=clock.now())
    except StemError as exc:
        log.warning("could not hand run %s back (%s); it is due again when its lease runs out", run_id, exc)


def _passes(workflows: Any, store: WorkflowStore, producer: Any, definition: Any, run: RunRecord,
            lease: Lease) -> str:
    epoch = run.epoch
    services = Services(store=store, producer=producer, queue=workflows.queue, limits=workflows.limits,
                         lease_lost=lambda: lease.lost, version_of=workflows.version_of)
    journal = store.journal(run.id)
    for _ in range(MAX_PASSES):
        inbox_seen = run.inbox_count
        state = PassState(run=run, epoch=epoch, journal=journal, services=services)
        outcome = _run_function(definition.fn, state)
        if isinstance(outcome, Outage):
            # the activation's task fails and is retried; the run waits under its lease meanwhile
            raise outcome.error
        if isinstance(outcome, Suspend):
            got = store.park(run.id, epoch, wake_at=outcome.wake_at, waiting=encode(outcome.waiting),
                             waits_for=outcome.waits_for, waits_kind=outcome.waits_kind, inbox_seen=inbox_seen,
                             now=clock.now())
            if got == "parked":
                if outcome.wake_at is not None:
                    eta = time.time() + max(0.0, outcome.wake_at - clock.now())
                    publish_wake(producer, run.id, epoch, "timer", workflows.queue, eta=eta)
                return "parked"
            if got == "fenced":
                return "fenced"
            current = store.get(run.id)     # "inbox": an event arrived meanwhile; another pass reads it
            if current is None or current.epoch != epoch or current.status != RUNNING:
                return "fenced"
            run = current
            continue
        return _conclude(outcome, store, producer, workflows, run, epoch, state)
    log.warning("run %s: %d passes in one activation, each interrupted by a new event; leaving it to its "
                "lease", run.id, MAX_PASSES)
    return "busy"


def _run_function(fn: Any, state: PassState) -> Any:
    """The pass's outcome: an engine signal, ("value", v) or ("error", exc)."""
    run = state.run
    try:
        args = decode(run.input) or {}
        value = fn(WorkflowContext(state), **args)
    except EngineSignal as signal:
        outcome: Any = signal
    except Exception as exc:  # noqa: BLE001 - the workflow's own failure
        outcome = ("error", exc)
    else:
        outcome = ("value", value)
    if state.pending is not None:      # swallowed by the workflow (except BaseException): still acted on
        return state.pending
    journal, position = state.journal, state.position
    if isinstance(outcome, tuple) and position < len(journal):
        entry = journal[position]
        how = "returned" if outcome[0] == "value" else f"raised {type(outcome[1]).__name__}"
        return Attention(f"position {position}: the workflow {how} there, but its journal holds "
                         f"{len(journal)} entries (at {position}: {entry.kind} {entry.name!r}): a durable "
                         f"call was removed or the code is not deterministic. Restore the call, branch on "
                         f"ctx.patched(...), or reset the run: stem wf reset {run.id} --to {position}")
    return outcome


def _conclude(outcome: Any, store: WorkflowStore, producer: Any, workflows: Any, run: RunRecord, epoch: int,
              state: PassState) -> str:
    backend = producer.backend
    now = clock.now()
    if isinstance(outcome, Fenced):
        return "fenced"
    if isinstance(outcome, Attention):
        if not store.attention(run.id, epoch, outcome.reason[:4000], now=now):
            return "fenced"
        log.error("run %s needs attention: %s", run.id, outcome.reason)
        mirror(backend, run._replace(status=NEEDS_ATTENTION, attention=outcome.reason[:4000], updated_at=now),
               workflows.queue)
        return "needs-attention"
    if isinstance(outcome, ContinueAsNew):
        if not store.continue_as_new(run.id, epoch, outcome.input, drop_events=state.consumed_seqs(), now=now):
            return "fenced"
        publish_wake(producer, run.id, epoch + 1, "start", workflows.queue)
        return "continued"
    if isinstance(outcome, Fail):
        status, result, error = FAILED, None, outcome.error
    elif outcome[0] == "value":
        try:
            result, _ = roundtrip(outcome[1], f"the result of workflow {run.name!r}")
            check_size(workflows.limits, f"the result of workflow {run.name!r}", result)
            status, error = SUCCEEDED, None
        except EncodeError as exc:
            status, result, error = FAILED, None, error_of(exc)
    else:
        status, result, error = FAILED, None, error_of(outcome[1])
    error_bytes = None if error is None else encode_error(error)
    if not store.finish(run.id, epoch, status, result=result, error=error_bytes, now=now):
        return "fenced"
    if status == FAILED:
        log.warning("run %s (%s) failed: %s: %s", run.id, run.name, error.get("type"), error.get("message"))
    mirror(backend, run._replace(status=status, result=result, error=error_bytes, owner=None, lease_until=None,
                                 updated_at=now), workflows.queue)
    if run.parent is not None:
        parent = store.get(run.parent)
        if parent is not None and parent.status == PARKED:
            publish_wake(producer, parent.id, parent.epoch, "done", workflows.queue)
    return "succeeded" if status == SUCCEEDED else "failed"
