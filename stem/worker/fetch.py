"""Fetching: leasing deliveries within the prefetch window and taking them in.

The *fetcher* thread leases deliveries while fewer than ``prefetch_limit``
are unsettled (a refill waits until ``_refill_at`` slots are free, or for
one slot when nothing is held), verifies and decodes them (``accept``:
bad signatures, undecodable frames, unknown tasks and poison are
dead-lettered, revoked and expired tasks end REVOKED) and hands jobs to
the engine.

With a backlog the fetcher mostly waits for room.  The settle round trip
that frees the room can carry the refill too (Redis: store when results are
kept, ack, consume in one pipeline), so the settle thread takes that consume over
(``claim_refill`` / ``end_refill``) and the fetcher does not wake for it.
The fetcher keeps what only it does: blocking consumes on empty queues,
backoff on broker errors, burst-idle detection.  At most one consume is in
flight (``consuming``), so prefetch stays bounded and ``Worker.pause`` and
the shutdown see every consume.  All state is read and written under the
worker's lock.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..brokers import Delivery
from ..envelope import decode_frame
from ..errors import DecodeError, SignatureError, StemError, UnknownTaskError
from ..results import TaskState
from ..signals import signals
from .engine import Job
from .execution import apply_handler_options
from .lifecycle import ShutdownMode

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["Fetcher", "FETCH_BLOCK_SECONDS"]

log = logging.getLogger("stem.worker")

# How long one consume call may block: bounds shutdown latency and burst-idle detection.
FETCH_BLOCK_SECONDS = 0.25
# How often the fetcher re-reads the backend's persistent revocations.
REVOKE_REFRESH = 1.0


def _decoded_or_none(d: Delivery, signer: Any):
    """The delivery's envelope (for the task name in its DEAD status), or None: never raises."""
    try:
        return decode_frame(d.frame, signer)
    except Exception:  # noqa: BLE001 - best effort: the delivery is dead-lettered either way
        return None


class Fetcher:
    def __init__(self, worker: "Worker"):
        self.w = worker
        self.waiting = False            # the fetcher thread waits for room (or for an unpaused queue)
        self.consuming = False          # a consume is in flight (the fetcher's or a settle refill's)
        self.generation = 0             # + 1 each time a consume ends (pause() waits on it)
        self.refilling = False          # the settle thread took the next consume over (claim_refill)
        self.refill_on_settle = True    # until the backend (or broker) says it cannot consume with its settle
        self._revoked_cache: set[str] = set()
        self._misrouted: set[tuple[str, str]] = set()
        self._revoked_checked = 0.0

    def run(self) -> None:
        """The fetcher thread."""
        w = self.w
        lock = w._lock
        backoff = 0.0
        while not w._stop_requested.is_set():
            with lock:
                free = w.prefetch_limit - len(w._jobs)
                queues = [q for q in w.queues if q not in w._paused]
                if free < (w._refill_at if w._jobs else 1) or not queues or self.refilling:
                    self.waiting = True
                    lock.wait(0.5)
                    self.waiting = False
                    continue
                self.consuming = True
            deliveries = None
            try:
                deliveries = w.broker.consume(queues, free, FETCH_BLOCK_SECONDS, consumer=w.id)
                if backoff:
                    log.warning("worker %s: broker reachable again", w.id)
                    w._counters["broker_reconnects"] += 1
                backoff = 0.0
            except StemError as exc:
                if not backoff:
                    log.error("worker %s: broker unreachable (%s); retrying with backoff", w.id, exc)
                backoff = min(max(backoff * 2, 0.1), 5.0)
            except Exception:  # noqa: BLE001 - a bug in an adapter must not silently stop all fetching
                log.exception("worker %s: consume failed unexpectedly; retrying with backoff", w.id)
                backoff = min(max(backoff * 2, 0.1), 5.0)
            with lock:
                self.generation += 1
                self.consuming = False
                paused = set(w._paused)
                lock.notify_all()
            if deliveries is None:
                w._stop_requested.wait(backoff)
                continue
            deliveries = self.without_paused(deliveries, paused)
            if deliveries:
                self.accept(deliveries)
            elif w._burst and self.idle():
                w.shutdown_nowait(ShutdownMode.WARM)

    def without_paused(self, deliveries: list[Delivery], paused: set[str]) -> list[Delivery]:
        """Give back what a consume in flight while its queue was paused brought."""
        if paused and deliveries:
            for d in [d for d in deliveries if d.queue in paused]:
                self.w._settler.broker_call(self.w.broker.nack, d, requeue=True)
            deliveries = [d for d in deliveries if d.queue not in paused]
        return deliveries

    # -- refilling with a settle round trip -----------------------------------------------
    def claim_refill(self, acks: list[Job]) -> tuple[list[str], int] | None:
        """Before settling ``acks``: when the fetcher waits for the room they free (its own
        threshold), take over its next consume.  Returns (queues, how many to lease), or
        None: settle the usual way.  Pair with ``end_refill``."""
        w = self.w
        with w._lock:
            if (not self.refill_on_settle or not self.waiting or self.consuming or self.refilling
                    or w._stop_mode is not None):
                return None
            queues = [q for q in w.queues if q not in w._paused]
            held = len(w._jobs) - sum(1 for j in acks if j.seq in w._jobs)
            free = w.prefetch_limit - held
            if not queues or free < (w._refill_at if held else 1):
                return None
            self.consuming = self.refilling = True
            return queues, free

    def end_refill(self, acks: list[Job], leased: list[Delivery] | None) -> None:
        """After ``claim_refill``: when the round trip was done (``leased`` not None), forget
        ``acks`` and take ``leased`` in; then hand fetching back, waking the fetcher only if
        room for a refill is still free (the queue ran short) or someone waits."""
        w = self.w
        try:
            with w._lock:
                self.generation += 1
                self.consuming = False
                paused = set(w._paused)
                if paused:
                    w._lock.notify_all()   # a pause() may wait for this consume
            if leased is not None:
                # what a pause turned away goes back before the acks leave the in-flight count,
                # so a worker that reads 0 in flight has nothing leased left in the broker
                leased = self.without_paused(leased, paused)
                w._forget(acks, wake=False)
                if leased:
                    self.accept(leased)
        finally:
            with w._lock:
                self.refilling = False
                if w._stop_mode is not None or (self.waiting and w.prefetch_limit - len(w._jobs) >= w._refill_at):
                    w._lock.notify_all()

    # -- taking deliveries in ------------------------------------------------------------------
    def idle(self) -> bool:
        w = self.w
        with w._lock:
            if w._jobs:
                return False
        for q in w.queues:
            s = w.broker.stats(q)
            if s.ready or s.in_flight or s.delayed:
                return False
        return True

    def accept(self, deliveries: list[Delivery]) -> None:
        """Verify, decode and route a batch (fetcher thread, or the settle thread's refill)."""
        w = self.w
        settler = w._settler
        now = time.time()
        jobs: list[Job] = []
        accepted: list[tuple[Delivery, Any, Any]] = []
        renew_now: set[int] = set()   # deliveries whose lease must move to the handler's timeout
        with w._lock:
            revoked_local = set(w._revoked)
        revoked = self.revocations()
        w._counters["received"] += len(deliveries)
        max_deliveries = w.broker.max_deliveries
        for d in deliveries:
            if d.delivery_count > max_deliveries:
                # the broker's poison cap (base.Broker): the DEAD status goes in before the dead letter
                settler.dead_unrun(d, "max-deliveries", f"delivered {d.delivery_count} times, more than the "
                                   f"broker's max_deliveries={max_deliveries}", _decoded_or_none(d, w.signer))
                continue
            try:
                env = decode_frame(d.frame, w.signer)
            except SignatureError as exc:
                settler.dead_unrun(d, "signature-invalid", str(exc))
                continue
            except DecodeError as exc:
                settler.dead_unrun(d, "decode-error", str(exc))
                continue
            if env.id in revoked or env.id in revoked_local:
                settler.finish_unrun(d, env, TaskState.REVOKED, "revoked")
                continue
            try:
                handler = w.registry.get(env.name)
            except UnknownTaskError as exc:
                settler.dead_unrun(d, "unknown-task", str(exc), env)
                continue
            if env.unset_options and apply_handler_options(env, handler):
                d.visibility_timeout = env.visibility_timeout
                renew_now.add(id(d))
            if handler.options.queue is not None and handler.options.queue != env.queue:
                self.warn_misrouted(env, handler)
            if env.expires_at is not None and env.expires_at < now:
                settler.finish_unrun(d, env, TaskState.REVOKED, "expired")
                continue
            if d.delivery_count > w.max_crash_redeliveries + 1 and w.isolation == "process":
                settler.dead_unrun(d, "poison", f"delivered {d.delivery_count} times without finishing", env)
                continue
            if signals.task_received.receivers:
                signals.task_received.send(w, envelope=env, delivery=d)
            accepted.append((d, env, handler))
        if not accepted:
            return
        with w._lock:  # one lock and one engine wake-up per batch, not per task
            for d, env, handler in accepted:
                w._seq += 1
                job = Job(w._seq, d, env, handler)
                if renew_now and id(d) in renew_now:
                    job.extended_at = 0.0   # the main loop renews it at its next turn
                w._jobs[job.seq] = job
                jobs.append(job)
        w._engine.submit_many(jobs)

    def warn_misrouted(self, env: Any, handler: Any) -> None:
        """A task published to another queue than its handler's (by a producer without
        the registry): it runs with the handler's settings; say so once per pair."""
        key = (env.name, env.queue)
        if key not in self._misrouted:
            self._misrouted.add(key)
            log.warning("task %s arrived on queue %r but its handler's queue is %r (a producer without the "
                        "registry?); running it here with the handler's options", env.name, env.queue,
                        handler.options.queue)

    def revocations(self) -> set[str]:
        """Persistent revocations, re-read at most every REVOKE_REFRESH seconds (the control
        plane's revoke reaches a running worker at once; this covers producers' revokes and
        workers started later, without a round trip per batch).  With a signer, only those
        whose signed proof verifies (``stem.revocation``; checked once per id, then cached)."""
        now = time.monotonic()
        backend = self.w.backend
        if backend is not None and now - self._revoked_checked >= REVOKE_REFRESH:
            try:
                revoked = backend.revoked()
                if self.w.signer is not None:
                    check = getattr(self, "_revocation_check", None)
                    if check is None:
                        from ..revocation import RevocationCheck
                        check = self._revocation_check = RevocationCheck(self.w.signer)
                    revoked = check.honoured(backend, revoked)
                self._revoked_cache = revoked
                self._revoked_checked = now
            except StemError as exc:
                log.warning("could not read revocations (%s); using the last known set", exc)
        return self._revoked_cache
