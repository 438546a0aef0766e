"""The in-memory broker: a real adapter for one process (tests, demos, embedding).

Same semantics as the networked brokers (leases, redelivery, delays,
priorities, delivery counts for the consumer's poison cap, DLQ), held in heaps under one condition variable, so
``consume`` sleeps until a message is due instead of polling.

Limits (see "Limits" in ``stem.brokers.base``): a limited message waits in its queue's lane (a
heap per ``lane_of(limit)``), never in ``ready``.  Each queue schedules its lanes in one heap of
(eligible at, turn, lane): a lane leased from gets a new turn (round robin), a throttled lane is
scheduled at its next token time, a lane blocked by its concurrency key at that key's earliest
slot deadline (and again at once when a settle frees one of the key's slots).  Stale heap
entries are skipped lazily.  A queue without lanes pays one dict test per consume.
"""

from __future__ import annotations

import heapq
import itertools
import operator
import threading
import time
import uuid
from collections import OrderedDict
from typing import Sequence

from .. import _checks as checks
from .base import (DEFAULT_MAX_DELIVERIES, DEFAULT_VISIBILITY_TIMEOUT, Broker, DeadLetter, Delivery, Held, Keyed,
                   LaneStats, Limit, Message, QueueStats, check_consume, check_keyed, check_limit, lane_of,
                   validate_queue_name)

__all__ = ["InMemoryBroker"]


class _Record:
    __slots__ = ("task_id", "queue", "frame", "priority", "visibility_timeout", "delivery_count", "seq",
                 "key", "ttl", "linger", "limit")

    def __init__(self, task_id, queue, frame, priority, visibility_timeout, seq, key=None, ttl=0.0, linger=0.0,
                 limit=None):
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
        self.limit = limit

    def successor(self, frame: bytes, seq: int) -> "_Record":
        """The record a retry publishes in its place: a new attempt under the same key."""
        return _Record(self.task_id, self.queue, bytes(frame), self.priority, self.visibility_timeout, seq,
                       self.key, self.ttl, self.linger, self.limit)


_INF = float("inf")
_LIMIT_OF = operator.itemgetter(6)          # Message.limit
# a lease may start when the bucket's TAT is this much past the burst allowance (float rounding:
# epoch seconds have a resolution of about 2.4e-7), and a blocked lane is scheduled at least
# this much after now (so one consume never tries it twice)
_EPSILON = 1e-6


class _Lane:
    """The limited messages of one (rate key, concurrency key) pair of a queue."""
    __slots__ = ("name", "rate_key", "concurrency_key", "heap", "due", "turn")

    def __init__(self, name: str, limit: Limit):
        self.name = name
        self.rate_key = limit.rate_key
        self.concurrency_key = limit.concurrency_key
        self.heap: list[tuple[int, int, _Record]] = []         # (-priority, seq, rec)
        self.due = 0.0        # when it is next worth trying (its entry in _Queue.sched)
        self.turn = 0


class _Queue:
    __slots__ = ("ready", "delayed", "dead", "keys", "dead_keys", "dead_limits",
                 "lanes", "sched", "buckets", "slots", "waiting_on", "throttled", "held")

    def __init__(self):
        self.ready: list[tuple[int, int, _Record]] = []        # (-priority, seq, rec)
        self.delayed: list[tuple[float, int, _Record]] = []    # (not_before, seq, rec)
        self.dead: OrderedDict[str, DeadLetter] = OrderedDict()
        self.keys: dict[str, tuple[str, float]] = {}           # key -> (owner task id, expires at)
        self.dead_keys: dict[str, tuple[float, float]] = {}     # DLQ entry id -> (ttl, linger) of its key
        self.dead_limits: dict[str, Limit] = {}                # DLQ entry id -> the limit it had
        self.lanes: dict[str, _Lane] = {}
        self.sched: list[tuple[float, int, str]] = []          # (due, turn, lane name), lazily pruned
        self.buckets: dict[str, float] = {}                    # rate key -> TAT (epoch seconds)
        # concurrency key -> receipt -> (lease deadline, (rate key, concurrency key) of its lane)
        self.slots: dict[str, dict[int, tuple[float, tuple[str | None, str | None]]]] = {}
        self.waiting_on: dict[str, set[str]] = {}              # concurrency key -> lanes blocked by it
        self.throttled = 0                                     # messages in lanes
        self.held: OrderedDict[str, Held] = OrderedDict()      # purge_hold's holding area, by entry id


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
        self._turns = itertools.count(1)

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
        elif rec.limit is None:
            heapq.heappush(q.ready, (-rec.priority, rec.seq, rec))
        else:
            self._to_lane(q, rec, now)

    def _to_lane(self, q: _Queue, rec: _Record, now: float) -> None:
        """Put a due limited message into its lane; a lane scheduled later is tried again now
        (the message may carry another rate, or be the lane's first)."""
        name = lane_of(rec.limit)
        lane = q.lanes.get(name)
        if lane is None:
            lane = q.lanes[name] = _Lane(name, rec.limit)
            lane.due = _INF
        heapq.heappush(lane.heap, (-rec.priority, rec.seq, rec))
        q.throttled += 1
        if lane.due > now:
            self._schedule(q, lane, now)

    def _schedule(self, q: _Queue, lane: _Lane, due: float) -> None:
        lane.due = due
        lane.turn = next(self._turns)
        heapq.heappush(q.sched, (due, lane.turn, lane.name))

    def _free_slot(self, rec: _Record, receipt: int, now: float) -> None:
        """A settle or an expiry frees the delivery's slot: lanes waiting on its key are due now."""
        limit = rec.limit
        if limit is None or limit.concurrency_key is None:
            return
        q = self._queues.get(rec.queue)
        if q is None:
            return                                      # the queue was deleted meanwhile
        key = limit.concurrency_key
        held = q.slots.get(key)
        if held is not None and held.pop(receipt, None) is not None and not held:
            del q.slots[key]
        waiting = q.waiting_on.pop(key, None)
        if waiting:
            for name in waiting:
                lane = q.lanes.get(name)
                if lane is not None and lane.due > now:
                    self._schedule(q, lane, now)

    def _promote(self, now: float) -> None:
        for q in self._queues.values():
            while q.delayed and q.delayed[0][0] <= now:
                _, _, rec = heapq.heappop(q.delayed)
                if rec.limit is None:
                    heapq.heappush(q.ready, (-rec.priority, rec.seq, rec))
                else:
                    self._to_lane(q, rec, now)
        while self._leases and self._leases[0][0] <= now:
            deadline, receipt = heapq.heappop(self._leases)
            entry = self._in_flight.get(receipt)
            if entry is not None and entry[1] <= now:
                del self._in_flight[receipt]
                rec = entry[0]
                self._free_slot(rec, receipt, now)
                self._push(rec, None, now)              # back to its lane when it has a limit

    def _next_wakeup(self, queues: Sequence[str]) -> float | None:
        times = [q.delayed[0][0] for q in self._queues.values() if q.delayed]
        if self._leases:
            times.append(self._leases[0][0])
        for name in queues:
            q = self._queues.get(name)
            if q is not None and q.sched:
                due = self._next_due(q)
                if due is not None:
                    times.append(due)
        return min(times) if times else None

    @staticmethod
    def _next_due(q: _Queue) -> float | None:
        """The earliest valid schedule entry of ``q`` (stale ones dropped)."""
        sched, lanes = q.sched, q.lanes
        while sched:
            due, turn, name = sched[0]
            lane = lanes.get(name)
            if lane is not None and lane.turn == turn:
                return due
            heapq.heappop(sched)
        return None

    def _dead(self, rec: _Record, reason: str, now: float) -> None:
        entry_id = uuid.uuid4().hex
        q = self._q(rec.queue)
        q.dead[entry_id] = DeadLetter(entry_id, rec.task_id, rec.queue, reason, now, rec.frame, rec.key)
        if rec.key is not None:
            q.dead_keys[entry_id] = (rec.ttl, rec.linger)
        if rec.limit is not None:
            q.dead_limits[entry_id] = rec.limit
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
        limits = list(map(_LIMIT_OF, messages))         # C speed: the unlimited path pays ~10 ns a message
        if limits.count(None) != len(limits):
            for limit in limits:
                if limit is not None:
                    check_limit(limit)                  # every one before any is stored
        now = time.time()
        with self._cond:
            for m, limit in zip(messages, limits):
                rec = _Record(m.task_id, m.queue, bytes(m.frame), m.priority,
                              m.visibility_timeout or self.default_visibility_timeout, next(self._seq))
                if limit is not None:
                    rec.limit = limit
                self._push(rec, m.not_before, now)
            self._cond.notify_all()

    def publish_keyed(self, items: Sequence[Keyed]) -> list[str | None]:
        items = check_keyed(items)
        for item in items:
            if item.message.limit is not None:
                check_limit(item.message.limit)
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
                              key, ttl, linger, m.limit)
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
                wake = self._next_wakeup(queues)
                if wake is not None:
                    remaining = min(remaining, max(wake - now, 0.001))
                self._cond.wait(remaining)

    def _take(self, queues: Sequence[str], max_count: int, now: float) -> list[Delivery]:
        out: list[Delivery] = []
        for n in queues:
            q = self._queues[n]
            if q.sched and len(out) < max_count:
                self._take_limited(q, max_count, now, out)
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

    def _take_limited(self, q: _Queue, max_count: int, now: float, out: list[Delivery]) -> None:
        """Lease from ``q``'s due lanes, one message per lane per turn, as far as tokens and
        slots allow; a lane that cannot lease now is scheduled for when it may."""
        sched, lanes = q.sched, q.lanes
        while sched and len(out) < max_count:
            due, turn, name = sched[0]
            if due > now:
                break
            heapq.heappop(sched)
            lane = lanes.get(name)
            if lane is None or lane.turn != turn:
                continue                                 # stale entry
            limit = lane.heap[0][2].limit                # each lease uses its own message's limit
            ckey = limit.concurrency_key
            if ckey is not None:
                held = q.slots.get(ckey)
                if held:
                    for receipt in [r for r, (deadline, _) in held.items() if deadline <= now]:
                        del held[receipt]                # expired: no longer live
                    if len(held) >= limit.concurrency:
                        q.waiting_on.setdefault(ckey, set()).add(name)
                        self._schedule(q, lane, max(min(d for d, _ in held.values()), now + _EPSILON))
                        continue
            rkey = limit.rate_key
            if rkey is not None:
                tat = q.buckets.get(rkey, now)
                if tat < now:
                    tat = now
                allowance = (limit.burst - 1) / limit.rate
                if tat - now > allowance + _EPSILON:
                    self._schedule(q, lane, max(tat - allowance, now + _EPSILON))
                    continue
                q.buckets[rkey] = tat + 1.0 / limit.rate
            _, _, rec = heapq.heappop(lane.heap)
            q.throttled -= 1
            rec.delivery_count += 1
            receipt = next(self._receipts)
            lease_end = now + rec.visibility_timeout
            self._in_flight[receipt] = (rec, lease_end)
            heapq.heappush(self._leases, (lease_end, receipt))
            if ckey is not None:
                q.slots.setdefault(ckey, {})[receipt] = (lease_end, (rkey, ckey))
            out.append(Delivery(rec.queue, rec.task_id, rec.frame, receipt, rec.delivery_count,
                                rec.visibility_timeout, now, rec.key, limit))
            if lane.heap:
                self._schedule(q, lane, now)             # a later turn
            else:
                del lanes[name]
                if ckey is not None:
                    waiting = q.waiting_on.get(ckey)
                    if waiting is not None:
                        waiting.discard(name)
                        if not waiting:
                            del q.waiting_on[ckey]
        if not lanes:
            sched.clear()
        self._prune_buckets(q, now)

    @staticmethod
    def _prune_buckets(q: _Queue, now: float) -> None:
        """An idle bucket (TAT passed) is the same as no bucket: drop it, so keys used once do
        not pile up.  Cheap: only while there are few, or now and then."""
        buckets = q.buckets
        if len(buckets) > 64:
            for key in [k for k, tat in buckets.items() if tat <= now]:
                del buckets[key]

    # -- settling -----------------------------------------------------------------
    def _settle(self, delivery: Delivery) -> _Record | None:
        receipt = delivery.receipt
        entry = self._in_flight.pop(receipt, None)
        if entry is None:
            return None
        rec = entry[0]
        if rec.limit is not None:
            self._free_slot(rec, receipt, time.time())
        return rec

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        now = time.time()
        with self._cond:
            freed = False
            for d in deliveries:
                entry = self._in_flight.pop(d.receipt, None)
                if entry is not None:
                    rec = entry[0]
                    self._release(rec, now)
                    if rec.limit is not None:
                        self._free_slot(rec, d.receipt, now)
                        freed = True
            if freed:
                self._cond.notify_all()

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        now = time.time()
        with self._cond:
            rec = self._settle(delivery)
            if rec is None:
                return
            if requeue:
                self._push(rec, None, now)
            else:
                self._dead(rec, "rejected", now)
            self._cond.notify_all()

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
                if rec.limit is not None:
                    self._cond.notify_all()

    def extend(self, deliveries: Sequence[Delivery], visibility_timeout: float | None = None) -> None:
        now = time.time()
        with self._cond:
            for d in deliveries:
                entry = self._in_flight.get(d.receipt)
                if entry is None:
                    continue
                rec = entry[0]
                lease_end = now + (visibility_timeout or rec.visibility_timeout)
                self._in_flight[d.receipt] = (rec, lease_end)
                heapq.heappush(self._leases, (lease_end, d.receipt))
                if rec.limit is not None and rec.limit.concurrency_key is not None:
                    held = self._queues[rec.queue].slots.get(rec.limit.concurrency_key)
                    if held is not None and d.receipt in held:
                        held[d.receipt] = (lease_end, held[d.receipt][1])

    def route_limited(self, delivery: Delivery, limit: Limit) -> None:
        check_limit(limit)
        now = time.time()
        with self._cond:
            rec = self._settle(delivery)
            if rec is None:
                return
            rec.limit = limit
            rec.delivery_count -= 1                      # routing is not a delivery
            self._push(rec, None, now)
            self._cond.notify_all()

    def lane_stats(self, queue: str, limit: int = 100) -> list[LaneStats]:
        now = time.time()
        with self._cond:
            self._promote(now)
            q = self._q(queue)
            running: dict[str, int] = {}
            pairs: dict[tuple[str | None, str | None], int] = {}
            for ckey, held in q.slots.items():
                for deadline, pair in held.values():
                    if deadline > now:
                        running[ckey] = running.get(ckey, 0) + 1
                        pairs.setdefault(pair, 0)
            for lane in q.lanes.values():
                pairs[(lane.rate_key, lane.concurrency_key)] = len(lane.heap)
            out = [LaneStats(queue, rkey, ckey, waiting, 0 if ckey is None else running.get(ckey, 0))
                   for (rkey, ckey), waiting in pairs.items()]
            out.sort(key=lambda s: (-s.waiting, s.rate_key or "", s.concurrency_key or ""))
            return out[:max(limit, 0)]

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
                limit = q.dead_limits.get(entry_id)
                if dl.key is not None:
                    holder = self._holder(q, dl.key, now)
                    if holder is not None and holder != dl.task_id:
                        continue                      # another task holds the key: stays dead
                    q.keys[dl.key] = (dl.task_id, now + ttl)
                del q.dead[entry_id]
                q.dead_keys.pop(entry_id, None)
                q.dead_limits.pop(entry_id, None)
                rec = _Record(dl.task_id, queue, dl.frame, 0, self.default_visibility_timeout, next(self._seq),
                              dl.key, ttl, linger, limit)
                self._push(rec, None, now)
                moved += 1
            if moved:
                self._cond.notify_all()
            return moved

    def _drop_waiting(self, q: _Queue) -> list[_Record]:
        """Remove every ready, delayed and lane message of ``q`` and release their keys (under the lock)."""
        recs = [rec for *_, rec in q.ready + q.delayed]
        recs += [entry[-1] for lane in q.lanes.values() for entry in lane.heap]
        now = time.time()
        for rec in recs:
            self._release(rec, now)
        q.ready.clear()
        q.delayed.clear()
        q.lanes.clear()
        q.sched.clear()
        q.waiting_on.clear()
        q.throttled = 0
        return recs

    def purge(self, queue: str) -> int:
        with self._cond:
            return len(self._drop_waiting(self._q(queue)))

    def purge_hold(self, queue: str) -> int:
        with self._cond:
            q = self._q(queue)
            recs = self._drop_waiting(q)
            for rec in sorted(recs, key=lambda r: r.seq):
                entry_id = str(next(self._seq))
                q.held[entry_id] = Held(entry_id, rec.task_id, rec.frame)
            return len(recs)

    def purge_held(self, queue: str, limit: int = 1000) -> list[Held]:
        checks.integer("limit", limit)
        with self._cond:
            return list(itertools.islice(self._q(queue).held.values(), limit))

    def purge_drop(self, queue: str, ids: Sequence[str]) -> int:
        with self._cond:
            held = self._q(queue).held
            return sum(held.pop(entry_id, None) is not None for entry_id in ids)

    def purge_dead_letters(self, queue: str) -> int:
        with self._cond:
            q = self._q(queue)
            n = len(q.dead)
            q.dead.clear()
            q.dead_keys.clear()
            q.dead_limits.clear()
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
            return QueueStats(queue, len(q.ready), in_flight, len(q.delayed), len(q.dead), q.throttled)

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
