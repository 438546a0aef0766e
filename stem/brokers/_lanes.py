"""The lane-serving step the SQL brokers share (see "Limits" in ``stem.brokers.base``).

Each SQL broker keeps limited messages in a table of their own (``stem_lane_messages`` in
SQLite, ``stem_lane_jobs`` in Postgres), one lane per (queue, rate_key, concurrency_key), and a
row per lane in ``stem_lanes`` scored by ``next_eligible``: the earliest moment something of
the lane may be leased or may change (a token, a slot, a delayed message coming due, a lease
running out).  That score is a *hint that is never late*: a step that could make a lane
leasable earlier (a message entering an idle lane, a settle freeing a slot of its
concurrency key) lowers it; a consume that finds a due lane with nothing to lease raises it
again.  ``blocked`` says the score is a throttle time computed with messages waiting, so
that a message entering that lane leaves it alone (it could not be leased sooner).

``serve`` is the consume's limited part, run inside the adapter's transaction: the due lanes
of the consumed queues, oldest score first, one message per lane per turn, each lease only
if its rate bucket (GCRA) has a token and its concurrency key a free slot at that moment.
The adapter supplies the statements (``LaneOps``); the decisions are made here, once.
"""

from __future__ import annotations

from typing import Any, Sequence

from .base import Delivery

__all__ = ["LaneOps", "serve", "gcra_wait", "LANES_PER_CONSUME"]

#: Due lanes one consume looks at, at most (the rest stay due for the next one).
LANES_PER_CONSUME = 256
_EPS = 1e-6     # epoch seconds as doubles are exact to ~0.24 µs


def gcra_wait(tat: float | None, now: float, rate: float, burst: int) -> tuple[float, float]:
    """(seconds until the bucket has a token -- 0 or less: now --, the TAT after a lease now).
    GCRA: a lease is allowed iff max(TAT, now) - now <= (burst - 1) / rate."""
    base = now if tat is None or tat < now else tat
    return base - now - (burst - 1) / rate, base + 1.0 / rate


class LaneOps:
    """The statements one adapter runs for ``serve``, all inside one transaction."""

    def due_lanes(self, queues: Sequence[str], limit: int) -> tuple[float, list[tuple]]:
        """(now by the database's clock, the due lanes as (queue, lane, rate_key, concurrency_key)
        in serving order: oldest ``next_eligible`` first), locking them where others could
        serve them at the same time (skipping those already locked)."""
        raise NotImplementedError

    def lock_keys(self, queue: str, rate_key: str | None, concurrency_key: str | None) -> bool:
        """Take the bucket and the slots of this lane's keys for the rest of the transaction;
        False (without waiting) when another consume holds one of them."""
        return True

    def promote(self, queue: str, lane: str, now: float) -> None:
        """Delayed messages that came due and leases that ran out: back to waiting in the lane."""
        raise NotImplementedError

    def head(self, queue: str, lane: str, rate_key: str | None, concurrency_key: str | None,
             now: float) -> tuple | None:
        """The lane's best waiting message and what its lease depends on:
        (id, rate, burst, concurrency, bucket TAT or None, live slots, earliest live slot deadline
        or None), or None when nothing waits."""
        raise NotImplementedError

    def lease(self, row_id: Any, queue: str, rate_key: str | None, tat: float | None, now: float) -> Delivery:
        """Lease that message (its slot: the leased row itself) and store the bucket's new TAT."""
        raise NotImplementedError

    def reschedule(self, queue: str, lane: str, next_eligible: float, blocked: bool) -> None:
        raise NotImplementedError

    def idle(self, queue: str, lane: str) -> None:
        """Nothing waits in the lane: score it at its next delayed message or lease deadline, or
        drop it when it holds no message at all."""
        raise NotImplementedError


def serve(ops: LaneOps, queues: Sequence[str], max_count: int) -> tuple[list[Delivery], bool]:
    """Lease up to ``max_count`` messages from the due lanes of ``queues``, round robin.
    Returns (deliveries, whether a lane was skipped because another consume held its keys)."""
    now, lanes = ops.due_lanes(queues, LANES_PER_CONSUME)
    out: list[Delivery] = []
    contended = False
    result: dict[tuple, tuple[str, float]] = {}     # lane -> ("served"|"blocked"|"idle", when)
    active = []
    for lane in lanes:
        queue, name, rate_key, concurrency_key = lane
        if not ops.lock_keys(queue, rate_key, concurrency_key):
            contended = True
            continue
        ops.promote(queue, name, now)
        active.append(lane)
    while active and len(out) < max_count:
        turn = []
        for lane in active:
            if len(out) >= max_count:
                break
            queue, name, rate_key, concurrency_key = lane
            row = ops.head(queue, name, rate_key, concurrency_key, now)
            if row is None:
                result[lane] = ("idle", now)
                continue
            row_id, rate, burst, concurrency, tat, live, first_deadline = row
            until = None
            if concurrency_key is not None and live >= concurrency:
                until = first_deadline if first_deadline is not None else now
            new_tat = None
            if rate_key is not None:
                wait, new_tat = gcra_wait(tat, now, rate, burst)
                if wait > _EPS:
                    until = max(until or now, now + wait)
            if until is not None:
                result[lane] = ("blocked", until)
                continue
            delivery = ops.lease(row_id, queue, rate_key, new_tat, now)
            out.append(delivery)
            # blocked from now on? then say so now, rather than leave the lane due for the next
            # consume to find that out (which would cost the unlimited path its one-statement claim)
            after = None
            if concurrency_key is not None and live + 1 >= concurrency:
                deadline = now + delivery.visibility_timeout
                after = deadline if first_deadline is None else min(first_deadline, deadline)
            if rate_key is not None:
                wait, _ = gcra_wait(new_tat, now, rate, burst)
                if wait > _EPS:
                    after = max(after or now, now + wait)
            if after is not None:
                result[lane] = ("blocked", after)
                continue
            result[lane] = ("served", now)
            turn.append(lane)
        active = turn
    for (queue, name, _, _), (what, when) in result.items():
        if what == "idle":
            ops.idle(queue, name)
        else:
            # served and maybe more to lease: due again, after the lanes not served this time
            ops.reschedule(queue, name, when, what == "blocked")
    return out, contended
