"""The sweeper: every worker of a registry with workflows wakes the runs that are due.

Nothing is stranded by a crash between a store write and the publish that should
follow it, because the store lists every run that needs an activation
(``WorkflowStore.due``: a new run never claimed, a parked run whose timer is due or
whose inbox has unread events, a running run whose lease expired) and the sweeper
publishes a keyed wake for each (``stem.workflows.wake``: duplicates across workers and
sweeps collapse); ``due`` gives each run's epoch, which the wake id names, so a sweep
reads no run.  A due timer is left to the delayed wake its parking published until it
is overdue by a sweep interval.  It never deletes or changes anything in the store: a
due marker is only replaced by the claim of the activation that acts on it.

Every ``PARKED_ON_EVERY`` sweeps it also pages through the runs parked on a called task
(``WorkflowStore.parked_on``, kind "task") and reads those tasks' statuses in the result
backend: an ended one whose doorbell was lost (the worker died between storing the
task's status and sending the ``__call__`` event) gets the event and a wake now.  A run
parked on a child is left alone: the child's terminal write sent it its ``__child__``
event in the same step (``WorkflowStore.finish``, ``cancel``), so ``due`` lists it.

Runs on a daemon thread of its own (``start``/``stop``), every ``interval`` seconds.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..errors import StemError
from . import clock
from .store import PARKED, WorkflowStore
from .wake import CALL_TOPIC, publish_wake

__all__ = ["Sweeper", "PARKED_ON_EVERY", "DUE_LIMIT", "PAGE"]

log = logging.getLogger("stem.workflows")

#: The parked-on pass runs once every this many sweeps.
PARKED_ON_EVERY = 6
#: Due runs woken per sweep at most (the rest at the next).
DUE_LIMIT = 500
#: Runs per page of the parked-on pass.
PAGE = 500


class Sweeper:
    def __init__(self, *, store: WorkflowStore, producer: Any, queue: str, interval: float):
        self.store = store
        self.producer = producer
        self.queue = queue
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sweeps = 0

    def sweep(self, *, parked_on: bool = True) -> int:
        """One sweep; returns how many wakes it published (collapsed ones not counted)."""
        woken = 0
        store = self.store
        now = clock.now()
        for due in store.due(now=now, limit=DUE_LIMIT):
            reason = due.reason
            if reason == "timer":
                # the parking published a delayed wake due then: only a timer overdue by a sweep
                # interval (that wake was lost, or the broker's clock is not the workflows') is woken
                if due.due_at > now - self.interval:
                    continue
                reason = "overdue"
            woken += publish_wake(self.producer, due.run_id, due.epoch, reason, self.queue)
        if parked_on:
            woken += self._parked_on()
        return woken

    def _parked_on(self) -> int:
        woken = 0
        store, backend = self.store, self.producer.backend
        after = None
        while True:
            page = store.parked_on(limit=PAGE, after=after)
            if not page:
                break
            # kind None: parked before the store kept kinds; a child's mirror answers as a task's status
            on_tasks = [parked for parked in page if parked.kind != "child"]
            statuses = backend.get_many([parked.waits_for for parked in on_tasks]) if on_tasks else []
            for (run_id, waits_for, _), status in zip(on_tasks, statuses):
                if status is None or not status.is_terminal:
                    continue
                _, run = store.send(run_id, CALL_TOPIC, waits_for, b"", now=clock.now())
                if run is not None and run.status == PARKED:
                    woken += publish_wake(self.producer, run_id, run.epoch, "done", self.queue)
            if len(page) < PAGE:
                break
            after = page[-1][0]
        return woken

    # -- the thread ------------------------------------------------------------------------
    def start(self) -> "Sweeper":
        self._thread = threading.Thread(target=self._loop, name="stem-wf-sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sweeps += 1
            try:
                n = self.sweep(parked_on=self._sweeps % PARKED_ON_EVERY == 0)
            except StemError as exc:
                log.warning("the workflow sweep failed (%s); trying again in %.1fs", exc, self.interval)
                continue
            except Exception:  # noqa: BLE001 - the sweeper must outlive a bug in one sweep
                log.exception("the workflow sweep failed")
                continue
            if n:
                log.info("workflow sweep: woke %d run(s)", n)
