"""Fetching: leasing deliveries within the prefetch window and taking them in.

The *fetcher* thread leases deliveries while fewer than the prefetch limit
are unsettled (``WorkerState``; a refill waits until half the window is free,
or for one slot when nothing is held) and takes them in (``accept``): it
verifies and decodes each one; a bad signature, an unreadable frame, an
unknown task, poison and deliveries past the broker's cap are dead-lettered
(a DEAD status first), revoked and expired tasks end REVOKED, the rest
become jobs for the engine.

A delivery that came without a limit (its producer did not know the task's options) whose
handler has a global rate or concurrency limit is not run: it goes back to the broker, into
the lane of the limit the handler resolves (``Broker.route_limited``), once; it is leased
again under the limit and then runs.  Routing is not an attempt, never a retry, never a dead
letter (``stem.limits``).

With a backlog the fetcher mostly waits for room.  The settle round trip
that frees the room can carry the refill too (``ConsumeTurn``), and then the
fetcher does not wake for it.  It keeps what only it does: blocking consumes
on empty queues, backoff on broker errors, burst-idle detection.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from ..brokers import Broker, Delivery
from ..envelope import decode_frame
from ..errors import DecodeError, InvalidTaskOptionsError, SignatureError, StemError, UnknownTaskError
from ..limits import limit_resolver
from ..results import Reason, TaskState
from ..signals import signals
from ..task import TaskRegistry
from .engine import Engine
from .execution import apply_handler_options, apply_result_options, check_result_options
from .state import WorkerState

if TYPE_CHECKING:
    from .settle import Settler

__all__ = ["Fetcher", "FETCH_BLOCK_SECONDS"]

log = logging.getLogger("stem.worker")

# How long one consume call may block: bounds shutdown latency and burst-idle detection.
FETCH_BLOCK_SECONDS = 0.25
# How often the fetcher re-reads the backend's persistent revocations.
REVOKE_REFRESH = 1.0
# How long the fetcher sleeps at most while it waits for room (it is woken when room frees).
ROOM_WAIT = 0.5


def _decoded_or_none(d: Delivery, signer: Any):
    """The delivery's envelope (for the task name in its DEAD status), or None: never raises."""
    try:
        return decode_frame(d.frame, signer)
    except Exception:  # noqa: BLE001 - best effort: the delivery is dead-lettered either way
        return None


class Fetcher:
    def __init__(self, *, state: WorkerState, broker: Broker, backend: Any, signer: Any, registry: TaskRegistry,
                 engine: Engine, settler: "Settler", consumer: str, isolation: str, max_crash_redeliveries: int,
                 sender: Any = None):
        self.state = state
        self.broker = broker
        self.backend = backend
        self.signer = signer
        self.registry = registry
        self.engine = engine
        self.settler = settler
        self.consumer = consumer
        self.isolation = isolation
        self.max_crash_redeliveries = max_crash_redeliveries
        self.sender = sender            # what signals are sent from (the Worker)
        self._revoked_cache: set[str] = set()
        self._revoked_checked = 0.0
        self._revocation_check = None
        self._misrouted: set[tuple[str, str]] = set()

    def run(self, on_idle: Callable[[], None] | None = None) -> None:
        """The fetcher thread.  ``on_idle`` (burst mode) is called once the queues are empty
        and nothing is held."""
        state, turn = self.state, self.state.turn
        backoff = 0.0
        while not state.stopping():
            claim = turn.fetcher_turn(ROOM_WAIT)
            if claim is None:
                continue
            queues, free = claim
            deliveries = None
            try:
                deliveries = self.broker.consume(queues, free, FETCH_BLOCK_SECONDS, consumer=self.consumer)
                if backoff:
                    log.warning("worker %s: broker reachable again", self.consumer)
                    state.count("broker_reconnects")
                backoff = 0.0
            except StemError as exc:
                if not backoff:
                    log.error("worker %s: broker unreachable (%s); retrying with backoff", self.consumer, exc)
                backoff = min(max(backoff * 2, 0.1), 5.0)
            except Exception:  # noqa: BLE001 - a bug in an adapter must not silently stop all fetching
                log.exception("worker %s: consume failed unexpectedly; retrying with backoff", self.consumer)
                backoff = min(max(backoff * 2, 0.1), 5.0)
            paused = turn.fetcher_done()
            if deliveries is None:
                state.wait_for_stop(backoff)
                continue
            deliveries = self.without_paused(deliveries, paused)
            if deliveries:
                self.accept(deliveries)
            elif on_idle is not None and self.idle():
                on_idle()

    def without_paused(self, deliveries: list[Delivery], paused: set[str]) -> list[Delivery]:
        """Give back what a consume in flight while its queue was paused brought."""
        if paused and deliveries:
            for d in [d for d in deliveries if d.queue in paused]:
                self.settler.broker_call(self.broker.nack, d, requeue=True)
            deliveries = [d for d in deliveries if d.queue not in paused]
        return deliveries

    def take_refill(self, leased: list[Delivery], paused: set[str], settled: list) -> None:
        """Deliveries a settle round trip leased (``ConsumeTurn.settle_release``): what a pause
        turned away goes back before the settled jobs leave the in-flight count (so a worker
        that reads 0 in flight has nothing leased left in the broker), then the rest come in."""
        leased = self.without_paused(leased, paused)
        self.settler.forget(settled, wake=False)
        if leased:
            self.accept(leased)

    def idle(self) -> bool:
        """Nothing held and nothing left in the queues (burst mode's end)."""
        if self.state.held():
            return False
        for q in self.state.queues:
            s = self.broker.stats(q)
            if s.ready or s.in_flight or s.delayed or s.throttled:
                return False
        return True

    # -- taking deliveries in ------------------------------------------------------------------
    def accept(self, deliveries: list[Delivery]) -> None:
        """Verify, decode and route a batch (fetcher thread, or the settle thread's refill)."""
        settler = self.settler
        signer = self.signer
        now = time.time()
        accepted: list[tuple[Delivery, Any, Any, bool]] = []
        revoked_local = self.state.revoked_locally()
        revoked = self.revocations()
        self.state.count("received", len(deliveries))
        max_deliveries = self.broker.max_deliveries
        poison_after = self.max_crash_redeliveries + 1 if self.isolation == "process" else None
        for d in deliveries:
            if d.delivery_count > max_deliveries:
                # the broker's poison cap (base.Broker): the DEAD status goes in before the dead letter
                settler.dead_unrun(d, Reason.MAX_DELIVERIES, f"delivered {d.delivery_count} times, more than the "
                                   f"broker's max_deliveries={max_deliveries}", _decoded_or_none(d, signer))
                continue
            try:
                env = decode_frame(d.frame, signer)
            except SignatureError as exc:
                settler.dead_unrun(d, Reason.SIGNATURE_INVALID, str(exc))
                continue
            except DecodeError as exc:
                settler.dead_unrun(d, Reason.DECODE_ERROR, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - whatever a frame does, it never stops the fetcher
                log.exception("decoding delivery %s failed unexpectedly", d.task_id)
                settler.dead_unrun(d, Reason.DECODE_ERROR, f"{type(exc).__name__}: {exc}")
                continue
            if env.result_ttl is not None or env.failure_ttl is not None:
                problem = check_result_options(env)
                if problem is not None:
                    settler.dead_unrun(d, Reason.DECODE_ERROR, problem, env)
                    continue
            if env.id in revoked or env.id in revoked_local:
                if env.name in self.registry:   # its REVOKED status lives as its handler says
                    apply_result_options(env, self.registry.get(env.name).options)
                settler.finish_unrun(d, env, TaskState.REVOKED, Reason.REVOKED)
                continue
            try:
                handler = self.registry.get(env.name)
            except UnknownTaskError as exc:
                settler.dead_unrun(d, Reason.UNKNOWN_TASK, str(exc), env)
                continue
            apply_result_options(env, handler.options)
            renew_now = False
            if env.unset_options and apply_handler_options(env, handler):
                d.visibility_timeout = env.visibility_timeout
                renew_now = True
            if handler.options.queue is not None and handler.options.queue != env.queue:
                self.warn_misrouted(env, handler)
            if env.expires_at is not None and env.expires_at < now:
                settler.finish_unrun(d, env, TaskState.REVOKED, Reason.EXPIRED)
                continue
            if d.limit is None and self.route(d, env, handler):
                continue
            if poison_after is not None and d.delivery_count > poison_after:
                settler.dead_unrun(d, Reason.POISON, f"delivered {d.delivery_count} times without finishing", env)
                continue
            if signals.task_received.receivers:
                signals.task_received.send(self.sender, envelope=env, delivery=d)
            accepted.append((d, env, handler, renew_now))
        if accepted:
            self.engine.submit_many(self.state.admit(accepted))   # one lock, one engine wake-up per batch

    def route(self, d: Delivery, env: Any, handler: Any) -> bool:
        """Send a delivery without a limit whose handler has a global one into its lane
        instead of running it (True); False: run it (no global limit)."""
        resolver = limit_resolver(handler.name, handler.options)
        if resolver is None:
            return False
        try:
            limit = resolver(env.args, env.headers)
        except InvalidTaskOptionsError as exc:
            # a producer with the registry would have refused it at enqueue
            self.settler.dead_unrun(d, Reason.BAD_ARGUMENTS, f"its limit's key cannot be made: {exc}", env)
            return True
        self.settler.broker_call(self.broker.route_limited, d, limit)
        self.state.count("routed_limited")
        return True

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
        backend = self.backend
        if backend is not None and now - self._revoked_checked >= REVOKE_REFRESH:
            try:
                revoked = backend.revoked()
                if self.signer is not None:
                    if self._revocation_check is None:
                        from ..revocation import RevocationCheck
                        self._revocation_check = RevocationCheck(self.signer)
                    revoked = self._revocation_check.honoured(backend, revoked)
                self._revoked_cache = revoked
                self._revoked_checked = now
            except StemError as exc:
                log.warning("could not read revocations (%s); using the last known set", exc)
        return self._revoked_cache
