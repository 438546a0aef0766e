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

Keys (``publish_keyed``), the primitive under unique tasks, idempotent ids,
schedules and canvas callbacks; identical on every adapter too:

* **Claim and publish are one step.**  A keyed message is published only if
  its key (scoped to the message's queue) is free, and the key is recorded
  with the message's task id as its owner and ``ttl`` as its longest life, in
  the same Lua script or transaction (memory: under the lock).  There is never
  a key without its message nor a keyed message without its key; a publish
  that fails leaves neither.  A key whose owner republishes (a producer that
  retries after a lost reply) answers with the owner's own id: published once.
* **Release is owner-checked and rides the terminal settle.**  ``ack``,
  ``dead_letter``, ``nack(requeue=False)`` and ``purge`` release the keys of
  the messages they remove, in the same step, and only where the stored owner
  is that message's task id (a key that expired and was claimed by another
  task is left alone).  ``linger`` > 0 keeps the key that many seconds more
  instead of deleting it (an explicit task id stays refused while its result
  lives).  ``retry``, ``nack(requeue=True)``, ``extend`` and lease expiry keep
  the key: the task is not over.  No reaper: a key held by a task that never
  ends (its messages purged by hand, its broker data edited) expires after
  ``ttl``.
* **Replay claims again.**  ``replay`` of a dead letter that had a key claims
  it anew (owner: its task id, the ``ttl`` it was published with); an entry
  whose key another task holds meanwhile stays in the DLQ and is not counted.

Limits (``Message.limit``), rate and concurrency limits enforced before a lease; identical on
every adapter too (``tests/contract/test_limits_contract.py``):

* **Lanes.**  A message with a ``limit`` is stored in its queue's lane for the limit's
  (``rate_key``, ``concurrency_key``) pair (``lane_of``), not with the queue's other ready
  messages; keys are scoped to the queue.  Within a lane: higher priority first, then
  first-published first.  A delayed limited message enters its lane when due.
* **Leased only within the limit.**  ``consume`` leases a lane's message only when its rate
  bucket has a token and its concurrency key has a free slot, at the moment of the lease;
  otherwise the message stays where it is: not leased, not counted as in flight, its
  ``delivery_count`` unchanged (so throttling never brings it nearer the poison cap, and the
  worker never sees it).  ``QueueStats.throttled`` counts the messages in lanes.
* **Rate: GCRA per ``rate_key``.**  ``rate`` leases per second, at most ``burst`` at once
  after an idle spell: over any window of ``w`` seconds at most ``burst + rate * w`` leases
  of one key.  The bucket is one stored "theoretical arrival time" per key, advanced by
  ``1/rate`` per lease; the clock is the broker's (Redis ``TIME``, SQL ``now()``, the
  process's clock for memory), never the worker's.  Messages of one key may carry different
  rates (a deploy changed it): each lease uses its own message's.
* **Concurrency: slots per ``concurrency_key``.**  A lease takes a slot (task id -> lease
  deadline); at most ``concurrency`` live slots per key.  ``ack``, ``dead_letter``, ``nack``
  and ``retry`` free the delivery's slot in the same step; ``extend`` moves its deadline; a
  lease that expires stops holding its slot at its deadline (a killed worker's slots come
  back by themselves), and its message goes back to its lane, to be leased again under the
  limit.
* **Fair and non-blocking.**  Each ``consume`` first serves the due lanes of its queues
  round robin, one message per lane per turn, as far as tokens and slots allow, then the
  queue's unlimited messages: a busy key cannot starve another, and throttled messages
  never delay unlimited ones (they are never read by the unlimited path).
* **Sleeps until the next token.**  A blocking ``consume`` waits at most until the earliest
  moment a throttled lane of its queues gets a token (or a slot's lease deadline), not
  until its whole ``timeout``, and never spins.
* **Settles keep the limit.**  ``retry`` publishes the successor into the same lane (after
  its ``not_before``); ``nack(requeue=True)`` puts the message back into its lane;
  ``replay`` of a limited dead letter puts it back into its lane; ``purge`` drops lane
  messages too (and counts them); ``delete_queue`` drops lanes, buckets and slots.
* **Routing after the fact.**  ``route_limited(delivery, limit)`` moves a leased delivery
  that came without a limit (its producer did not know the task's options) into its lane,
  atomically, keeping its frame (a slot it held is freed): the worker
  does this once instead of running it.  Routing is not a delivery: the next lease of the
  message has the same ``delivery_count`` as the routed delivery had.  ``lane_stats(queue)`` lists the lanes with their waiting and running counts.

Purge with statuses (``stem.purging``), identical on every adapter too:

* **Hold, then record, then drop.**  ``purge_hold`` moves every waiting message of a queue
  (ready, delayed, in lanes; not in flight) into the queue's holding area in one atomic
  step, releasing their keys as ``purge`` does; no consumer ever sees them again.
  ``purge_held`` pages through the holding area, oldest first, and ``purge_drop`` deletes
  entries by id once their REVOKED statuses are stored.  A purge that dies anywhere leaves
  the messages either waiting or held, never gone without a status: running it again
  finishes the job.  ``purge`` (the count alone, no holding area) stays for callers that
  record nothing; ``delete_queue`` drops the holding area too.
"""

from __future__ import annotations

import abc
import operator
import time
from typing import Any, Callable, NamedTuple, Sequence

from .. import _checks as checks
from ..errors import ConfigurationError

__all__ = ["Broker", "Message", "Keyed", "FrameBatch", "frame_messages", "Limit", "LaneStats", "Delivery",
           "DeadLetter", "Held", "QueueStats", "validate_queue_name", "check_frame_batch", "check_consume",
           "check_keyed", "check_limit",
           "lane_of", "DEFAULT_VISIBILITY_TIMEOUT", "DEFAULT_MAX_DELIVERIES", "MAX_KEY_LENGTH"]

DEFAULT_VISIBILITY_TIMEOUT = 30.0
DEFAULT_MAX_DELIVERIES = 5
_INF = float("inf")
#: The longest key ``publish_keyed`` takes (characters).
MAX_KEY_LENGTH = 512


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


def check_keyed(items: Sequence["Keyed"]) -> list["Keyed"]:
    """``publish_keyed``'s argument: Keyed items, each with a non-empty str key of at most
    ``MAX_KEY_LENGTH`` characters, a ``ttl`` > 0 and a ``linger`` >= 0 (seconds)."""
    out = list(items)
    queues: set[str] = set()
    for item in out:
        if type(item) is not Keyed or type(item[0]) is not Message:
            if not isinstance(item, Keyed) or not isinstance(item.message, Message):
                raise ConfigurationError(f"publish_keyed takes Keyed(message, key, ttl) items, got {item!r}")
        message, key, ttl, linger = item
        if type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH:
            raise ConfigurationError(f"a key must be a non-empty string of at most {MAX_KEY_LENGTH} "
                                     f"characters, got {key!r}")
        # the common case (floats in range) without a call per number; the checks say what is wrong
        if not (type(ttl) is float and 0.0 < ttl < _INF):
            checks.seconds("ttl", ttl)
        if not (type(linger) is float and 0.0 <= linger < _INF):
            checks.seconds("linger", linger, inclusive=True)
        queue = message.queue
        if type(queue) is not str:
            validate_queue_name(queue)            # raises: not a name
        queues.add(queue)
    for queue in queues:
        validate_queue_name(queue)
    return out


class Limit(NamedTuple):
    """The limits one message is leased under (see "Limits" above), resolved from the task's
    options and its arguments by the producer (``stem.limits``), or by the worker for a
    producer that did not know the task.  At least one of the two keys is set."""
    rate_key: str | None = None          # the GCRA bucket's key; None: no rate limit
    rate: float = 0.0                    # leases per second (> 0 when rate_key is set)
    burst: int = 1                       # leases at once after an idle spell (>= 1)
    concurrency_key: str | None = None   # the slots' key; None: no concurrency limit
    concurrency: int = 0                 # live leases at most (>= 1 when concurrency_key is set)


def check_limit(limit: Limit) -> Limit:
    """A ``Limit`` as the brokers take it: keys non-empty strings of at most
    ``MAX_KEY_LENGTH`` characters, at least one of them set, and the numbers that go with
    each set key in range."""
    if type(limit) is not Limit:
        raise ConfigurationError(f"a message's limit must be a Limit, got {limit!r}")
    rate_key, rate, burst, concurrency_key, concurrency = limit
    if rate_key is None and concurrency_key is None:
        raise ConfigurationError("a Limit needs a rate_key, a concurrency_key or both")
    for name, key in (("rate_key", rate_key), ("concurrency_key", concurrency_key)):
        if key is not None and (type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH):
            raise ConfigurationError(f"a limit's {name} must be a non-empty string of at most "
                                     f"{MAX_KEY_LENGTH} characters, got {key!r}")
    if rate_key is not None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < _INF:
            raise ConfigurationError(f"a limit's rate must be a number of leases per second > 0, got {rate!r}")
        checks.integer("burst", burst)
    if concurrency_key is not None:
        checks.integer("concurrency", concurrency)
    return limit


def lane_of(limit: Limit) -> str:
    """The name of the lane a limited message waits in: one per (rate_key, concurrency_key)
    pair, unambiguous whatever characters the keys hold."""
    rate_key = "" if limit.rate_key is None else limit.rate_key
    concurrency_key = "" if limit.concurrency_key is None else limit.concurrency_key
    return f"{len(rate_key)}:{rate_key}|{concurrency_key}"


class Message(NamedTuple):
    """One frame to publish."""
    task_id: str
    queue: str
    frame: bytes
    priority: int = 0
    not_before: float | None = None          # epoch seconds; None or past = deliverable now
    visibility_timeout: float | None = None  # seconds; None = the broker default
    limit: Limit | None = None               # leased only within this limit (see "Limits")


class Keyed(NamedTuple):
    """One message to publish only if ``key`` is free in its queue (see "Keys" above)."""
    message: Message
    key: str
    ttl: float               # seconds: the key's longest life, whatever becomes of the task
    linger: float = 0.0      # seconds the key stays after the terminal settle (0: deleted then)


#: ``publish_frames``' arguments as one tuple: (queue, task ids, frames, priority, visibility timeout).
FrameBatch = tuple[str, Sequence[str], Sequence[bytes], int, float | None]


def frame_messages(batches: Sequence[FrameBatch]) -> list[Message]:
    """The ``Message`` of each frame of ``batches``, for a publisher that sends messages only."""
    return [Message(t, queue, f, priority, None, vt)
            for queue, ids, frames, priority, vt in batches for t, f in zip(ids, frames)]


class Delivery:
    """One leased copy of a message.  ``receipt`` is the adapter's own handle; ``key`` the
    key it was published under (``publish_keyed``), or None; ``limit`` the limit it was
    leased under (its concurrency slot is freed when it is settled), or None."""

    __slots__ = ("queue", "task_id", "frame", "receipt", "delivery_count", "visibility_timeout",
                 "leased_at", "key", "limit")

    def __init__(self, queue: str, task_id: str, frame: bytes, receipt: Any,
                 delivery_count: int = 1, visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
                 leased_at: float | None = None, key: str | None = None, limit: Limit | None = None):
        self.queue = queue
        self.task_id = task_id
        self.frame = frame
        self.receipt = receipt
        self.delivery_count = delivery_count
        self.visibility_timeout = visibility_timeout
        self.leased_at = time.time() if leased_at is None else leased_at
        self.key = key
        self.limit = limit

    def __repr__(self) -> str:
        key = "" if self.key is None else f", key={self.key!r}"
        return (f"Delivery(queue={self.queue!r}, task_id={self.task_id!r}, "
                f"delivery_count={self.delivery_count}, receipt={self.receipt!r}{key})")


class DeadLetter(NamedTuple):
    id: str              # the DLQ entry's id (for replay)
    task_id: str
    queue: str
    reason: str
    failed_at: float
    frame: bytes
    key: str | None = None   # the key it was published under; released when it was dead-lettered


class Held(NamedTuple):
    """A message ``purge_hold`` took out of its queue, waiting for its status (``purge_held``)."""
    id: str              # the holding entry's id (for purge_drop)
    task_id: str
    frame: bytes


class QueueStats(NamedTuple):
    queue: str
    ready: int       # deliverable now
    in_flight: int   # leased, not yet settled
    delayed: int     # not_before in the future
    dead: int        # in the dead-letter queue
    throttled: int = 0   # due, waiting in a lane for a token or a slot (see "Limits")


class LaneStats(NamedTuple):
    """One lane of limited messages (``Broker.lane_stats``)."""
    queue: str
    rate_key: str | None
    concurrency_key: str | None
    waiting: int     # messages in the lane, not leased
    running: int     # live concurrency slots of concurrency_key (0 without one)


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

    def reopen_recipe(self) -> tuple[str, dict[str, Any]] | None:
        """``(url, options)`` that open another instance on this same broker from another
        process (``stem.brokers.from_url(url, **options)``), or None when no other process
        can reach it (in-memory).  A worker's children publish through it (``ctx.producer()``)."""
        return None

    @abc.abstractmethod
    def publish(self, message: Message) -> None:
        """Store one message durably (as durable as the adapter is) before returning."""

    def single_publisher(self, queue: str, priority: int,
                         visibility_timeout: float | None) -> tuple[bytes, bytes, Callable[[bytes], bool]] | None:
        """For a producer's single ``enqueue`` of a ready message without a limit or a key:
        ``(head, tail, send)`` when the adapter stores one message as one command the
        producer builds whole -- ``head``, the task id and the frame as RESP bulk strings,
        ``tail`` (``stem.envelope.xadd_template``) -- and ``send(command)`` stores it as
        ``publish`` would and returns True, or returns False, storing nothing, when that
        command is no longer right (then the producer calls ``publish``).  None (the
        default): the producer always calls ``publish``."""
        return None

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
    def publish_keyed(self, items: Sequence[Keyed]) -> list[str | None]:
        """Publish each item only if its key is free in its queue, claiming the key for the
        item's task id (see "Keys"), all in one round trip per queue where the adapter can.

        Returns, in order, None for each item published, or the task id holding the key for
        each item refused (nothing of it was stored).  Items are taken in order, so a key
        twice in one batch publishes the first and answers the second with the first's id.
        An item whose key its own task id already holds answers with that id (it was
        published before: a producer's retry after a lost reply publishes nothing twice)."""

    @abc.abstractmethod
    def release_key(self, queue: str, key: str, owner: str) -> bool:
        """Delete ``key`` of ``queue`` now if ``owner`` holds it (``unique_until="started"``:
        the worker frees the key when the task starts); True if it was deleted.  The message
        keeps its key name, and its terminal settle then finds nothing of its own to release."""

    @abc.abstractmethod
    def key_owner(self, queue: str, key: str) -> str | None:
        """The task id holding ``key`` of ``queue``, or None when the key is free."""

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
    def route_limited(self, delivery: Delivery, limit: Limit) -> None:
        """Move a leased delivery that came without a limit into the lane of ``limit``, in one
        atomic step, keeping its frame; its next lease has the routed delivery's
        ``delivery_count`` (see "Limits": routing after the fact).  ``limit`` is checked
        (``check_limit``) before anything moves.  A delivery already settled (its lease expired
        and it was delivered again) is left alone."""

    @abc.abstractmethod
    def lane_stats(self, queue: str, limit: int = 100) -> list[LaneStats]:
        """Up to ``limit`` lanes of ``queue`` that have waiting messages or running slots,
        the most waiting first."""

    @abc.abstractmethod
    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Oldest first."""

    @abc.abstractmethod
    def replay(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Move DLQ entries (all when ``ids`` is None) back to the queue, due now,
        with a fresh delivery count.  Returns how many moved."""

    @abc.abstractmethod
    def purge(self, queue: str) -> int:
        """Drop every ready and delayed message of ``queue`` (not in-flight ones). Returns the count.
        Records nothing: their statuses stay PENDING (``stem.purging.purge_queue`` ends them
        REVOKED; it is what ``stem purge`` and ``Stem.purge`` run)."""

    @abc.abstractmethod
    def purge_hold(self, queue: str) -> int:
        """Move every ready, delayed and lane message of ``queue`` (not in-flight ones) into its
        holding area, in one atomic step that releases their keys (see "Purge with statuses").
        Returns how many moved (0 when none waited; the holding area may still hold some)."""

    @abc.abstractmethod
    def purge_held(self, queue: str, limit: int = 1000) -> list[Held]:
        """Up to ``limit`` entries of ``queue``'s holding area, oldest first; [] when empty."""

    @abc.abstractmethod
    def purge_drop(self, queue: str, ids: Sequence[str]) -> int:
        """Delete those entries of the holding area (their statuses are stored); unknown ids
        are skipped.  Returns how many were deleted."""

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
