"""Waking runs: the activation task, its deterministic ids, and the called tasks' doorbell.

An activation is the internal task ``stem.wf.activate`` (args ``{"run_id": ...}``).
Every wake-up is a keyed publish under an explicit id, ``wfa:<run>:<epoch>:<why>``:

* ``epoch`` is the run's fencing epoch when the wake was decided (the one it parked
  at, or 0 for a new run), so the wakes of one parking share ids and collapse (50
  duplicate publishes make one activation while it is queued), while the next parking
  gets fresh ids that a stale wake still queued cannot shadow;
* ``why`` is one letter (``WHY``): a timer's delayed wake (``t``) and an event's
  immediate one (``e``) of the same parking are different tasks, so the delayed one
  cannot swallow the immediate one; nor can it swallow the sweeper's wake of an overdue
  timer (``o``), which covers a lost delayed wake and a broker whose clock disagrees
  with the workflows' clock.

Wake ids are published with ``idempotent_for=0``: the key goes with the activation's
terminal settle, so a later wake of the same parking (the sweeper's, after a
lost one) is published again, never refused for as long as a result lingers.  A
superfluous activation costs a read: it finds nothing due and returns.

A task run by ``ctx.call`` carries the headers ``RUN_HEADER`` (its run) and
``QUEUE_HEADER`` (where that run's activations go).  The worker that settles it
(whatever its registry) calls ``CallNotifier.finished`` after the task's terminal
status is stored: the run gets a ``__call__`` event (event id: the task id, so a
redelivered settle stores nothing twice) and, if it is parked, a wake.  A crash in
between is covered by the sweeper, which checks parked runs' tasks in the backend.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Sequence

from ..errors import DuplicateTaskError, StemError
from ..task import TaskOptions
from . import clock
from .store import PARKED, WorkflowStore

__all__ = ["ACTIVATE", "RUN_HEADER", "QUEUE_HEADER", "CALL_TOPIC", "CHILD_TOPIC", "SYSTEM_TOPICS", "WHY",
           "wake_id", "publish_wake", "plain_producer", "CallNotifier"]

log = logging.getLogger("stem.workflows")

#: The internal task that runs one activation of a run.
ACTIVATE = "stem.wf.activate"
#: Headers of a task run by ``ctx.call``: its run's id, and the queue of that run's activations.
RUN_HEADER = "stem-wf-run"
QUEUE_HEADER = "stem-wf-queue"
#: Events the engine sends itself: a called task ended; a child run ended (the store sends it).
CALL_TOPIC = "__call__"
CHILD_TOPIC = "__child__"
SYSTEM_TOPICS = (CALL_TOPIC, CHILD_TOPIC)
#: Why a run is woken -> the letter of its wake id.
WHY = {"start": "s", "timer": "t", "inbox": "e", "lease": "l", "done": "c", "reset": "r", "overdue": "o"}


def wake_id(run_id: str, epoch: int, why: str) -> str:
    return f"wfa:{run_id}:{epoch}:{WHY[why]}"


_plain: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def plain_producer(producer: Any) -> Any:
    """A producer on ``producer``'s broker, backend and signer without its registry: the
    engine publishes activations and called tasks that the publishing process's registry
    need not hold (they may run on other workers)."""
    if producer.registry is None:
        return producer
    got = _plain.get(producer)
    if got is None:
        from ..producer import Stem
        got = _plain[producer] = Stem(producer.broker, producer.backend, None, producer.signer)
    return got


def publish_wake(producer: Any, run_id: str, epoch: int, why: str, queue: str, *,
                 eta: float | None = None) -> bool:
    """Publish an activation of ``run_id`` under its wake id (``eta``: wall-clock epoch
    seconds, for a timer).  False when that id is already queued or running (collapsed)."""
    try:
        plain_producer(producer).enqueue(ACTIVATE, {"run_id": run_id}, options=TaskOptions(queue=queue),
                                         task_id=wake_id(run_id, epoch, why), eta=eta, idempotent_for=0.0,
                                         on_duplicate="raise")
    except DuplicateTaskError:
        return False
    return True


class CallNotifier:
    """Rings a run's doorbell when a task it called ended (the worker's settle calls it)."""

    def __init__(self, *, store: Callable[[], WorkflowStore], producer: Any):
        self._store = store
        self.producer = producer

    def finished(self, envelopes: Sequence[Any]) -> None:
        """Each envelope's task ended and its status is stored.  Best effort: a failure is
        logged, and the sweeper finds the run from the backend instead."""
        for env in envelopes:
            headers = env.headers
            run_id = headers.get(RUN_HEADER)
            if not run_id:
                continue
            try:
                _, run = self._store().send(run_id, CALL_TOPIC, env.id, b"", now=clock.now())
                if run is not None and run.status == PARKED:
                    publish_wake(self.producer, run_id, run.epoch, "done", headers.get(QUEUE_HEADER) or "default")
            except StemError as exc:
                log.warning("could not tell run %s that its task %s ended (%s); the sweeper will", run_id, env.id,
                            exc)
            except Exception:  # noqa: BLE001 - never breaks a settle
                log.exception("could not tell run %s that its task %s ended; the sweeper will", run_id, env.id)
