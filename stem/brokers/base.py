"""The ``Broker`` protocol: what every adapter (memory, sqlite, redis, postgres) promises.

A broker moves opaque frames (see ``stem.envelope``); it never decodes a
signed body.  What it may read is the unsigned delivery header
(``stem.envelope.read_header``), but everything it needs is passed in
``Message``.

Delivery semantics, identical on every adapter (``tests/contract`` proves it):

* **At least once.**  ``consume`` leases each delivery for the message's
  ``visibility_timeout`` (or the broker default).  A delivery that is neither
  acked, retried, dead-lettered nor extended before its lease expires is
  delivered again, to any consumer, with ``delivery_count`` + 1.
* **Leases renew in place.**  ``extend`` pushes the lease deadline out; it never
  creates a second copy of the message.
* **Poison cap.**  ``consume`` never buries a message: one whose
  ``delivery_count`` passed ``max_deliveries`` (its leases kept expiring) is
  leased and returned like any other, and the consumer must dead-letter it
  with reason ``max-deliveries`` without running it.  The worker
  (``stem.worker.fetch``) stores the task's DEAD status first, then calls
  ``dead_letter``: a crash in between only delivers it once more, whereas a
  broker that buried it itself would leave the status PENDING for good.
* **Nothing blocks the queue.**  A message the consumer cannot read (a
  garbage frame, a row or entry written by hand) is delivered like any other,
  for the consumer to dead-letter with reason ``decode-error``; it never keeps
  the messages after it from being delivered.  What an adapter cannot hand
  over at all (a Redis entry without a task id) it dead-letters itself, with
  reason ``decode-error``, keeping whatever fields it has.
* **Atomic settle.**  ``retry`` (schedule the new frame + remove the old
  delivery) and ``dead_letter`` (copy to DLQ + remove) are each one atomic
  step: a crash in between can duplicate a task, never lose it.  Settling a
  delivery whose lease expired and that was delivered again returns normally;
  it may settle the message for both copies (the price of at-least-once is a
  task that ran twice, never one that is lost).
* **Order.**  Within one queue, higher ``priority`` first, then
  first-published first, among messages that are due (``not_before`` <= now).
  Across the queues of one ``consume`` call no order is promised (Redis keeps
  each queue in its own cluster slot and takes them in turn).
* **Delayed messages** (``not_before`` in the future) stay in the broker, not
  in worker memory, and become deliverable when due.
"""

from __future__ import annotations

import abc
import operator
import time
from typing import Any, NamedTuple, Sequence

from .. import _checks as checks
from ..errors import ConfigurationError

__all__ = ["Broker", "Message", "Delivery", "DeadLetter", "QueueStats", "validate_queue_name",
           "check_frame_batch", "check_consume", "DEFAULT_VISIBILITY_TIMEOUT", "DEFAULT_MAX_DELIVERIES"]

DEFAULT_VISIBILITY_TIMEOUT = 30.0
DEFAULT_MAX_DELIVERIES = 5


def validate_queue_name(name: str) -> str:
    return checks.queue_name(name)


def check_consume(queues: Sequence[str], max_count: int) -> list[str]:
    """``consume``'s arguments: the queue names (checked, each once, in order), and a
    ``max_count`` that is an integer >= 1."""
    checks.integer("max_count", max_count)
    names = list(dict.fromkeys(validate_queue_name(q) for q in queues))
    if not names:
        raise ConfigurationError("consume needs at least one queue")
    return names


def check_frame_batch(task_ids: Sequence[str], frames: Sequence[bytes]) -> int:
    """``publish_frames``' arguments must pair up; returns how many messages they make."""
    n = len(task_ids)
    if len(frames) != n:
        raise ConfigurationError(f"publish_frames got {n} task ids for {len(frames)} frames")
    return n


class Message(NamedTuple):
    """One frame to publish."""
    task_id: str
    queue: str
    frame: bytes
    priority: int = 0
    not_before: float | None = None          # epoch seconds; None or past = deliverable now
    visibility_timeout: float | None = None  # seconds; None = the broker default


class Delivery:
    """One leased copy of a message.  ``receipt`` is the adapter's own handle."""

    __slots__ = ("queue", "task_id", "frame", "receipt", "delivery_count", "visibility_timeout",
                 "leased_at")

    def __init__(self, queue: str, task_id: str, frame: bytes, receipt: Any,
                 delivery_count: int = 1, visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
                 leased_at: float | None = None):
        self.queue = queue
        self.task_id = task_id
        self.frame = frame
        self.receipt = receipt
        self.delivery_count = delivery_count
        self.visibility_timeout = visibility_timeout
        self.leased_at = time.time() if leased_at is None else leased_at

    def __repr__(self) -> str:
        return (f"Delivery(queue={self.queue!r}, task_id={self.task_id!r}, "
                f"delivery_count={self.delivery_count}, receipt={self.receipt!r})")


class DeadLetter(NamedTuple):
    id: str              # the DLQ entry's id (for replay)
    task_id: str
    queue: str
    reason: str
    failed_at: float
    frame: bytes


class QueueStats(NamedTuple):
    queue: str
    ready: int       # deliverable now
    in_flight: int   # leased, not yet settled
    delayed: int     # not_before in the future
    dead: int        # in the dead-letter queue


class Broker(abc.ABC):
    """Base class of every broker.  Adapters are safe to share between threads."""

    url: str = ""
    default_visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    _store: Any = None

    #: The store this broker keeps its queues in (a ``stem.stores.base.Store``), or None (the
    #: memory broker): a result backend in the same store stores results and acks in one round
    #: trip or transaction (``ResultBackend.shares_store_with``).  Read-only; its getter is C
    #: (no Python frame), as it is read on every settle round trip.
    store = property(operator.attrgetter("_store"))

    @abc.abstractmethod
    def publish(self, message: Message) -> None:
        """Store one message durably (as durable as the adapter is) before returning."""

    def publish_many(self, messages: Sequence[Message]) -> None:
        """Store a batch in one round trip where the adapter allows it."""
        for m in messages:
            self.publish(m)

    def publish_frames(self, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                       priority: int = 0, visibility_timeout: float | None = None) -> None:
        """Store a batch of messages ready now that share queue, priority and visibility
        timeout (``enqueue_many`` of one task name), in one round trip where the adapter
        allows it.  Adapters may override it to skip the per-message ``Message`` objects."""
        check_frame_batch(task_ids, frames)
        self.publish_many([Message(t, queue, f, priority, None, visibility_timeout)
                           for t, f in zip(task_ids, frames)])

    @abc.abstractmethod
    def consume(self, queues: Sequence[str], max_count: int, timeout: float,
                *, consumer: str = "") -> list[Delivery]:
        """Lease up to ``max_count`` due messages from ``queues``.

        Waits up to ``timeout`` seconds for the first one (without busy
        polling where the adapter can block), then returns what is there.
        Returns [] on timeout.  ``consumer`` names the worker for adapters that
        track owners (Redis consumer groups).  Deliveries past ``max_deliveries``
        come back too (see "Poison cap"): check ``delivery_count`` first.
        """

    @abc.abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove settled deliveries for good (batched)."""

    def ack_and_consume(self, deliveries: Sequence[Delivery], queues: Sequence[str], max_count: int,
                        *, consumer: str = "") -> list[Delivery] | None:
        """``ack``, then lease up to ``max_count`` deliveries from ``queues`` (as ``consume``
        with no wait would), in one round trip where the adapter can: a worker without
        results refills its prefetch window with the round trip that acks.  Tried once,
        never retried (a retry might lease twice); on an error nothing of it is left to
        the caller, who acks the usual way.  The default does nothing and returns None:
        the worker then never asks again."""
        return None

    @abc.abstractmethod
    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        """Give a delivery back: ``requeue`` makes it deliverable again at once
        (its delivery count is kept, so the poison cap still applies);
        ``requeue=False`` dead-letters it with reason ``rejected``."""

    @abc.abstractmethod
    def retry(self, delivery: Delivery, frame: bytes, not_before: float | None) -> None:
        """Atomically replace ``delivery`` with ``frame`` due at ``not_before``.

        The new copy is a fresh message (delivery count 1): a retry is a new
        attempt, not a redelivery."""

    @abc.abstractmethod
    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Atomically copy the delivery's frame to the queue's DLQ with ``reason`` and remove it."""

    @abc.abstractmethod
    def extend(self, deliveries: Sequence[Delivery], visibility_timeout: float | None = None) -> None:
        """Renew leases: each lease now ends ``visibility_timeout`` (default: the
        delivery's own) seconds from now.  Never creates a second copy."""

    @abc.abstractmethod
    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Oldest first."""

    @abc.abstractmethod
    def replay(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Move DLQ entries (all when ``ids`` is None) back to the queue, due now,
        with a fresh delivery count.  Returns how many moved."""

    @abc.abstractmethod
    def purge(self, queue: str) -> int:
        """Drop every ready and delayed message of ``queue`` (not in-flight ones). Returns the count."""

    @abc.abstractmethod
    def purge_dead_letters(self, queue: str) -> int:
        """Drop the queue's DLQ. Returns the count."""

    @abc.abstractmethod
    def delete_queue(self, queue: str) -> None:
        """Drop ``queue`` for good: its messages in every state (ready, delayed, in flight),
        its dead letters, every key or row the adapter keeps for it, and its name in
        ``queues()``.  Idempotent.  For queues nobody uses any more, such as the control
        plane's one-off reply queues: a delivery of it still held settles as a no-op, and a
        later publish or consume starts the queue afresh (a consumer blocked on it at that
        moment may see an error once, then carries on)."""

    @abc.abstractmethod
    def stats(self, queue: str) -> QueueStats:
        """Counts without scanning every key or row (O(1) or index-backed)."""

    @abc.abstractmethod
    def queues(self) -> list[str]:
        """Names of the queues this broker has seen (published to or consumed from)."""

    def close(self) -> None:
        """Release connections.  Safe to call twice."""

    def ping(self) -> None:
        """Raise ``BrokerConnectionError`` when the broker cannot be reached."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
