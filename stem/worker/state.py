"""What the worker's threads share, behind one lock, with named operations.

A worker runs four threads (``docs/design.md``, "Threads"): the *fetcher*
leases deliveries and takes them in, the *main loop* turns the engine, renews
leases, enforces time limits and publishes heartbeats, the *settle thread*
stores outcomes and acks them (and sometimes leases the refill in the same
round trip), the *control thread* serves commands.  What they share lives
here, under one condition variable, and changes only through the methods
below: the unsettled jobs (every delivery the worker holds), the prefetch
window and its refill threshold, paused queues, local revocations, the
counters and the stop request.

``ConsumeTurn`` is the handshake between the fetcher and the settle thread:
at most one consume is in flight, either the fetcher's own or one a settle
round trip carries (Redis: store, ack and lease in one pipeline), so prefetch
stays bounded and a pause or a shutdown sees every consume end.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Sequence

from .engine import Job
from .lifecycle import ShutdownMode
from .window import PrefetchWindow

__all__ = ["WorkerState", "ConsumeTurn", "COUNTERS"]

#: The counters a worker keeps (``stats()``, the heartbeat, metrics).
#: ``routed_limited``: deliveries sent into their limit's lane instead of run (``stem.limits``).
COUNTERS = ("received", "processed", "succeeded", "failed", "retried", "revoked", "dead_lettered",
            "broker_reconnects", "routed_limited")


class ConsumeTurn:
    """Whose turn it is to consume: the fetcher's, or a settle round trip's.

    The fetcher waits for room (``fetcher_turn``); when the room it waits for is
    what a settle batch frees, the settle thread may take the next consume over
    (``settle_claim``) and carry it in its own round trip, then hand the turn
    back (``settle_release``).  Every method runs under the state's lock."""

    def __init__(self, state: "WorkerState"):
        self._state = state
        self._cond = state._cond
        self.waiting = False            # the fetcher waits for room (or for an unpaused queue)
        self.consuming = False          # a consume is in flight (the fetcher's or a settle refill's)
        self.generation = 0             # + 1 each time a consume ends (a pause waits on it)
        self.refilling = False          # a settle round trip took the next consume over
        self.refill_on_settle = True    # until the store says it cannot consume with its settle

    # -- the fetcher's side --------------------------------------------------------------------
    def fetcher_turn(self, timeout: float) -> tuple[list[str], int] | None:
        """(queues, how many to lease) when the fetcher may consume now; else wait up to
        ``timeout`` seconds for room and return None (the caller asks again)."""
        s = self._state
        with self._cond:
            held = len(s._jobs)
            free = s._prefetch_limit - held
            queues = s._active_queues()
            if free < (s._refill_at if held else 1) or not queues or self.refilling:
                self.waiting = True
                self._cond.wait(timeout)
                self.waiting = False
                return None
            self.consuming = True
            return queues, free

    def fetcher_done(self) -> set[str]:
        """The fetcher's consume ended; returns the queues paused meanwhile."""
        with self._cond:
            self.generation += 1
            self.consuming = False
            self._cond.notify_all()
            return set(self._state._paused)

    # -- the settle thread's side ------------------------------------------------------------------
    def settle_claim(self, acks: Sequence[Job]) -> tuple[list[str], int] | None:
        """Before settling ``acks``: when the fetcher waits for the room they free (its own
        threshold), take its next consume over.  (queues, how many to lease), or None:
        settle the usual way.  Pair with ``settle_release``."""
        s = self._state
        with self._cond:
            if (not self.refill_on_settle or not self.waiting or self.consuming or self.refilling
                    or s._stop_mode is not None):
                return None
            queues = s._active_queues()
            held = len(s._jobs) - sum(1 for j in acks if j.seq in s._jobs)
            free = s._prefetch_limit - held
            if not queues or free < (s._refill_at if held else 1):
                return None
            self.consuming = self.refilling = True
            return queues, free

    def settle_release(self, handover: Callable[[set[str]], None] | None) -> None:
        """After ``settle_claim``: the consume ended.  ``handover(paused)`` (when the round
        trip was done) forgets the acks and takes the leased deliveries in before the turn
        goes back, so the fetcher never counts room that leased deliveries already use."""
        s = self._state
        try:
            with self._cond:
                self.generation += 1
                self.consuming = False
                paused = set(s._paused)
                if paused:
                    self._cond.notify_all()   # a pause may wait for this consume
            if handover is not None:
                handover(paused)
        finally:
            with self._cond:
                self.refilling = False
                if s._stop_mode is not None or (self.waiting and s._prefetch_limit - len(s._jobs) >= s._refill_at):
                    self._cond.notify_all()

    def refill_unsupported(self) -> None:
        """The store cannot consume with its settle: never ask again."""
        self.refill_on_settle = False

    def wait_until_handed_back(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until no settle round trip holds the turn (shutdown)."""
        with self._cond:
            self._cond.wait_for(lambda: not self.refilling, timeout=timeout)


class WorkerState:
    def __init__(self, *, queues: Sequence[str], concurrency: int, window: PrefetchWindow):
        self._cond = threading.Condition()
        self.queues: tuple[str, ...] = tuple(queues)
        self._jobs: dict[int, Job] = {}            # every unsettled delivery the worker holds, by seq
        self._by_task: dict[str, Job] = {}
        self._seq = 0
        self._paused: set[str] = set()
        self._revoked: set[str] = set()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._window = window
        self._concurrency = concurrency
        self._prefetch_limit = 0
        self._refill_at = 1
        self._stop_mode: ShutdownMode | None = None
        self._stop = threading.Event()
        self.turn = ConsumeTurn(self)
        self._set_limit()

    # -- jobs ---------------------------------------------------------------------------------
    def admit(self, accepted: Iterable[tuple[Any, Any, Any, bool]]) -> list[Job]:
        """Jobs for ``(delivery, envelope, handler, renew_now)`` rows, held from now on (one
        lock per batch).  ``renew_now``: its lease moves to a new timeout at the next turn."""
        jobs = []
        with self._cond:
            for delivery, envelope, handler, renew_now in accepted:
                self._seq += 1
                job = Job(self._seq, delivery, envelope, handler)
                if renew_now:
                    job.extended_at = 0.0
                self._jobs[job.seq] = job
                self._by_task[envelope.id] = job
                jobs.append(job)
        return jobs

    def forget(self, jobs: Iterable[Job], *, wake: bool = True) -> None:
        """These jobs are settled: no longer held.  Wakes a waiting fetcher only once a
        refill's worth of room is free (a wake-up per settled task costs more than the task)."""
        with self._cond:
            for j in jobs:
                j.settled = True
                self._jobs.pop(j.seq, None)
                if self._by_task.get(j.envelope.id) is j:
                    del self._by_task[j.envelope.id]
            if wake and self.turn.waiting and self._prefetch_limit - len(self._jobs) >= self._refill_at:
                self._cond.notify_all()

    def held(self) -> int:
        with self._cond:
            return len(self._jobs)

    def jobs(self) -> list[Job]:
        """A snapshot of the held jobs."""
        with self._cond:
            return list(self._jobs.values())

    def job_for(self, task_id: str) -> Job | None:
        with self._cond:
            return self._by_task.get(task_id)

    def due_for_renewal(self, now: float, urgent: set[str]) -> list[Job]:
        """Held jobs whose lease needs renewing now (a third of its timeout passed, or the
        task asked for it: ``urgent``), marked as renewed at ``now``."""
        with self._cond:
            due = [j for j in self._jobs.values()
                   if j.envelope.id in urgent or now - j.extended_at >= j.delivery.visibility_timeout / 3.0]
        for j in due:
            j.extended_at = now
        return due

    def room_if_waiting(self) -> tuple[int, int | None]:
        """(held, free slots when the fetcher waits for room, else None): the outbox's cue."""
        held = len(self._jobs)   # a read of a dict's size needs no lock
        return held, (self._prefetch_limit - held if self.turn.waiting else None)

    # -- the prefetch window --------------------------------------------------------------------
    @property
    def prefetch_limit(self) -> int:
        return self._prefetch_limit

    @property
    def refill_at(self) -> int:
        return self._refill_at

    @property
    def concurrency(self) -> int:
        return self._concurrency

    @property
    def window(self) -> PrefetchWindow:
        return self._window

    def observe_run_times(self, batch: Iterable[tuple[Any, Any]]) -> None:
        """Let the window follow a settle batch's run times (a wider window wakes the fetcher)."""
        if self._window.observe(batch):
            with self._cond:
                if self._set_limit():
                    self._cond.notify_all()

    def resize(self, delta: int, apply: Callable[[int], None]) -> int:
        """Grow or shrink the pool by ``delta`` (never below 1): ``apply(delta)`` resizes the
        engine under the lock; the window follows.  Returns the new concurrency."""
        with self._cond:
            new = max(1, self._concurrency + delta)
            delta = new - self._concurrency
            if delta:
                apply(delta)
                self._concurrency = new
                self._set_limit()
                self._cond.notify_all()   # also for a narrower window: the engine's slots changed
            return self._concurrency

    def _set_limit(self) -> bool:
        """Under the lock: the window for the current concurrency, and the free slots at which
        the fetcher refills (half of it; at once when nothing is held).  True when it grew."""
        limit = self._concurrency * self._window.per_child
        wider = limit > self._prefetch_limit
        self._prefetch_limit = limit
        self._refill_at = max(1, limit // 2)
        return wider

    # -- queues and revocations ---------------------------------------------------------------------
    def _active_queues(self) -> list[str]:
        return [q for q in self.queues if q not in self._paused]

    def pause(self, queue: str, timeout: float) -> None:
        """Stop fetching from ``queue``; returns once no consume in flight still includes it."""
        turn = self.turn
        with self._cond:
            self._paused.add(queue)
            generation = turn.generation
            self._cond.wait_for(lambda: not turn.consuming or turn.generation > generation
                                or self._stop.is_set(), timeout=timeout)

    def resume(self, queue: str) -> None:
        with self._cond:
            self._paused.discard(queue)
            self._cond.notify_all()

    def paused(self) -> list[str]:
        with self._cond:
            return sorted(self._paused)

    def revoke_local(self, task_ids: Iterable[str]) -> None:
        with self._cond:
            self._revoked.update(task_ids)

    def revoked_locally(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._revoked)

    # -- counters ---------------------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to a counter (under the lock: three threads count)."""
        with self._cond:
            self._counters[name] += n

    def counters(self) -> dict[str, int]:
        with self._cond:
            return dict(self._counters)

    # -- stopping -------------------------------------------------------------------------------
    def request_stop(self, mode: ShutdownMode) -> None:
        """Ask the worker to stop in ``mode`` (a later, stronger request wins)."""
        with self._cond:
            if self._stop_mode is None or mode.rank > self._stop_mode.rank:
                self._stop_mode = mode
            self._cond.notify_all()
        self._stop.set()

    @property
    def stop_mode(self) -> ShutdownMode | None:
        return self._stop_mode

    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait_for_stop(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early when a stop is requested."""
        return self._stop.wait(timeout)

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()
