"""The in-memory broker: a real adapter for one process (tests, demos, embedding).

Same semantics as the networked brokers (leases, redelivery, delays,
priorities, delivery counts for the consumer's poison cap, DLQ), held in heaps under one condition variable, so
``consume`` sleeps until a message is due instead of polling.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections import OrderedDict
from typing import Sequence

from .. import _checks as checks
from .base import (DEFAULT_MAX_DELIVERIES, DEFAULT_VISIBILITY_TIMEOUT, Broker, DeadLetter, Delivery, Keyed,
                   Message, QueueStats, check_consume, check_keyed, validate_queue_name)

__all__ = ["InMemoryBroker"]


class _Record:
    __slots__ = ("task_id", "queue", "frame", "priority", "visibility_timeout", "delivery_count", "seq",
                 "key", "ttl", "linger")

    def __init__(self, task_id, queue, frame, priority, visibility_timeout, seq, key=None, ttl=0.0, linger=0.0):
        self.task_id = task_id
        self.queue = queue
        self.frame = frame
        self.priority = priority
        self.visibility_timeout = visibility_timeout
        self.delivery_count = 0
        self.seq = seq
        self.key = key
        self.ttl = ttl
        self.linger = linger

    def successor(self, frame: bytes, seq: int) -> "_Record":
        """The record a retry publishes in its place: a new attempt under the same key."""
        return _Record(self.task_id, self.queue, bytes(frame), self.priority, self.visibility_timeout, seq,
                       self.key, self.ttl, self.linger)


class _Queue:
    __slots__ = ("ready", "delayed", "dead", "keys", "dead_keys")

    def __init__(self):
        self.ready: list[tuple[int, int, _Record]] = []        # (-priority, seq, rec)
        self.delayed: list[tuple[float, int, _Record]] = []    # (not_before, seq, rec)
        self.dead: OrderedDict[str, DeadLetter] = OrderedDict()
        self.keys: dict[str, tuple[str, float]] = {}           # key -> (owner task id, expires at)
        self.dead_keys: dict[str, tuple[float, float]] = {}     # DLQ entry id -> (ttl, linger) of its key


class InMemoryBroker(Broker):
    def __init__(self, *, default_visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
                 max_deliveries: int = DEFAULT_MAX_DELIVERIES, url: str = "memory://"):
        self.url = url
        self.default_visibility_timeout = checks.seconds("default_visibility_timeout", default_visibility_timeout)
        self.max_deliveries = checks.integer("max_deliveries", max_deliveries)
        self._cond = threading.Condition(threading.Lock())
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        self._receipts = itertools.count(1)
        self._in_flight: dict[int, tuple[_Record, float]] = {}   # receipt -> (record, deadline)
        self._leases: list[tuple[float, int]] = []               # (deadline, receipt), lazily pruned
        self._closed = False

    @classmethod
    def from_url(cls, url: str = "memory://", **kwargs) -> "InMemoryBroker":
        return cls(url=url, **kwargs)

    # -- helpers (call with the lock held) --------------------------------------
    def _q(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            validate_queue_name(name)
            q = self._queues[name] = _Queue()
        return q

    def _push(self, rec: _Record, not_before: float | None, now: float) -> None:
        q = self._q(rec.queue)
        if not_before is not None and not_before > now:
            heapq.heappush(q.delayed, (not_before, rec.seq, rec))
        else:
            heapq.heappush(q.ready, (-rec.priority, rec.seq, rec))

    def _promote(self, now: float) -> None:
        for q in self._queues.values():
            while q.delayed and q.delayed[0][0] <= now:
                _, _, rec = heapq.heappop(q.delayed)
                heapq.heappush(q.ready, (-rec.priority, rec.seq, rec))
        while self._leases and self._leases[0][0] <= now:
            deadline, receipt = heapq.heappop(self._leases)
            entry = self._in_flight.get(receipt)
            if entry is not None and entry[1] <= now:
                del self._in_flight[receipt]
                rec = entry[0]
                heapq.heappush(self._q(rec.queue).ready, (-rec.priority, rec.seq, rec))

    def _next_wakeup(self) -> float | None:
        times = [q.delayed[0][0] for q in self._queues.values() if q.delayed]
        if self._leases:
            times.append(self._leases[0][0])
        return min(times) if times else None

    def _dead(self, rec: _Record, reason: str, now: float) -> None:
        entry_id = uuid.uuid4().hex
        q = self._q(rec.queue)
        q.dead[entry_id] = DeadLetter(entry_id, rec.task_id, rec.queue, reason, now, rec.frame, rec.key)
        if rec.key is not None:
            q.dead_keys[entry_id] = (rec.ttl, rec.linger)
        self._release(rec, now)

    def _holder(self, q: _Queue, key: str, now: float) -> str | None:
        held = q.keys.get(key)
        if held is None:
            return None
        if held[1] <= now:
            del q.keys[key]
            return None
        return held[0]

    def _release(self, rec: _Record, now: float) -> None:
        """The terminal settle's release: owner-checked; a lingering key stays ``linger`` more."""
        if rec.key is None:
            return
        q = self._q(rec.queue)
        if self._holder(q, rec.key, now) != rec.task_id:
            return
        if rec.linger > 0:
            q.keys[rec.key] = (rec.task_id, now + rec.linger)
        else:
            del q.keys[rec.key]

    # -- publishing ---------------------------------------------------------------
    def publish(self, message: Message) -> None:
        self.publish_many((message,))

    def publish_many(self, messages: Sequence[Message]) -> None:
        now = time.time()
        with self._cond:
            for m in messages:
                rec = _Record(m.task_id, m.queue, bytes(m.frame), m.priority,
                              m.visibility_timeout or self.default_visibility_timeout, next(self._seq))
                self._push(rec, m.not_before, now)
            self._cond.notify_all()

    def publish_keyed(self, items: Sequence[Keyed]) -> list[str | None]:
        items = check_keyed(items)
        now = time.time()
        out: list[str | None] = []
        with self._cond:
            for key, m, ttl, linger in ((i.key, i.message, i.ttl, i.linger) for i in items):
                q = self._q(m.queue)
                holder = self._holder(q, key, now)
                if holder is not None:
                    out.append(holder)
                    continue
                rec = _Record(m.task_id, m.queue, bytes(m.frame), m.priority,
                              m.visibility_timeout or self.default_visibility_timeout, next(self._seq),
                              key, ttl, linger)
                self._push(rec, m.not_before, now)
                q.keys[key] = (m.task_id, now + ttl)       # after the push: a failed one claims nothing
                out.append(None)
            self._cond.notify_all()
        return out

    def release_key(self, queue: str, key: str, owner: str) -> bool:
        now = time.time()
        with self._cond:
            q = self._q(queue)
            if self._holder(q, key, now) != owner:
                return False
            del q.keys[key]
            return True

    def key_owner(self, queue: str, key: str) -> str | None:
        with self._cond:
            return self._holder(self._q(queue), key, time.time())

    # -- consuming ----------------------------------------------------------------
    def consume(self, queues: Sequence[str], max_count: int, timeout: float,
                *, consumer: str = "") -> list[Delivery]:
        queues = check_consume(queues, max_count)
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            for name in queues:
                self._q(name)
            while True:
                now = time.time()
                self._promote(now)
                out = self._take(queues, max_count, now)
                if out or self._closed:
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return out
                wake = self._next_wakeup()
                if wake is not None:
                    remaining = min(remaining, max(wake - now, 0.001))
                self._cond.wait(remaining)

    def _take(self, queues: Sequence[str], max_count: int, now: float) -> list[Delivery]:
        out: list[Delivery] = []
        lanes = [self._queues[n].ready for n in queues]
        while len(out) < max_count:
            best = None
            for lane in lanes:
                if lane and (best is None or lane[0][:2] < best[0][:2]):
                    best = lane
            if best is None:
                break
            _, _, rec = heapq.heappop(best)
            rec.delivery_count += 1   # past max_deliveries too: the consumer dead-letters it
            receipt = next(self._receipts)
            lease_end = now + rec.visibility_timeout
            self._in_flight[receipt] = (rec, lease_end)
            heapq.heappush(self._leases, (lease_end, receipt))
            out.append(Delivery(rec.queue, rec.task_id, rec.frame, receipt, rec.delivery_count,
                                rec.visibility_timeout, now, rec.key))
        return out

    # -- settling -----------------------------------------------------------------
    def _settle(self, delivery: Delivery) -> _Record | None:
        entry = self._in_flight.pop(delivery.receipt, None)
        return None if entry is None else entry[0]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        now = time.time()
        with self._cond:
            for d in deliveries:
                entry = self._in_flight.pop(d.receipt, None)
                if entry is not None:
                    self._release(entry[0], now)

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        now = time.time()
        with self._cond:
            rec = self._settle(delivery)
            if rec is None:
                return
            if requeue:
                self._push(rec, None, now)
                self._cond.notify_all()
            else:
                self._dead(rec, "rejected", now)

    def retry(self, delivery: Delivery, frame: bytes, not_before: float | None) -> None:
        now = time.time()
        with self._cond:
            old = self._settle(delivery)
            if old is None:
                return
            self._push(old.successor(frame, next(self._seq)), not_before, now)
            self._cond.notify_all()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        with self._cond:
            rec = self._settle(delivery)
            if rec is not None:
                self._dead(rec, reason, time.time())

    def extend(self, deliveries: Sequence[Delivery], visibility_timeout: float | None = None) -> None:
        now = time.time()
        with self._cond:
            for d in deliveries:
                entry = self._in_flight.get(d.receipt)
                if entry is None:
                    continue
                lease_end = now + (visibility_timeout or entry[0].visibility_timeout)
                self._in_flight[d.receipt] = (entry[0], lease_end)
                heapq.heappush(self._leases, (lease_end, d.receipt))

    # -- dead letters and admin ---------------------------------------------------
    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        with self._cond:
            return list(itertools.islice(self._q(queue).dead.values(), max(limit, 0)))

    def replay(self, queue: str, ids: Sequence[str] | None = None) -> int:
        now = time.time()
        with self._cond:
            q = self._q(queue)
            entries = list(q.dead) if ids is None else [i for i in ids if i in q.dead]
            moved = 0
            for entry_id in entries:
                dl = q.dead[entry_id]
                ttl, linger = q.dead_keys.get(entry_id, (0.0, 0.0))
                if dl.key is not None:
                    holder = self._holder(q, dl.key, now)
                    if holder is not None and holder != dl.task_id:
                        continue                      # another task holds the key: stays dead
                    q.keys[dl.key] = (dl.task_id, now + ttl)
                del q.dead[entry_id]
                q.dead_keys.pop(entry_id, None)
                rec = _Record(dl.task_id, queue, dl.frame, 0, self.default_visibility_timeout, next(self._seq),
                              dl.key, ttl, linger)
                self._push(rec, None, now)
                moved += 1
            if moved:
                self._cond.notify_all()
            return moved

    def purge(self, queue: str) -> int:
        with self._cond:
            q = self._q(queue)
            n = len(q.ready) + len(q.delayed)
            now = time.time()
            for *_, rec in q.ready + q.delayed:
                self._release(rec, now)
            q.ready.clear()
            q.delayed.clear()
            return n

    def purge_dead_letters(self, queue: str) -> int:
        with self._cond:
            q = self._q(queue)
            n = len(q.dead)
            q.dead.clear()
            q.dead_keys.clear()
            return n

    def delete_queue(self, queue: str) -> None:
        validate_queue_name(queue)
        with self._cond:
            self._queues.pop(queue, None)
            for receipt in [r for r, (rec, _) in self._in_flight.items() if rec.queue == queue]:
                del self._in_flight[receipt]       # its entry in _leases is skipped when popped

    def stats(self, queue: str) -> QueueStats:
        with self._cond:
            self._promote(time.time())
            q = self._q(queue)
            in_flight = sum(1 for rec, _ in self._in_flight.values() if rec.queue == queue)
            return QueueStats(queue, len(q.ready), in_flight, len(q.delayed), len(q.dead))

    def queues(self) -> list[str]:
        with self._cond:
            return sorted(self._queues)

    @property
    def closed(self) -> bool:
        """True once ``close`` was called (``from_url`` then makes a new one for the name)."""
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
