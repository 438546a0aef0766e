"""The prefetch window: how many unsettled deliveries a worker leases at once.

A refill is leased once half the window has finished, in a settle round trip
that takes about a millisecond.  With tasks of microseconds a window of
``prefetch_multiplier`` (4) tasks per child empties long before the refill
lands, and the children wait (``benchmarks/README.md``, "the prefetch window").
A wide window has its price with long tasks: a worker holds tasks that other
workers could start.

So the window follows the tasks' run times: it holds about
``WORK_PER_CHILD`` seconds of work per child, never fewer than
``prefetch_multiplier`` tasks per child nor more than
``max_prefetch_multiplier``.  What a worker holds beyond its floor is then a
few milliseconds of work, however long the tasks are.  Each settle batch
sets it again from that batch's mean run time (when that moves it by half
again or more), so it narrows as soon as the tasks get longer.
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["PrefetchWindow", "WORK_PER_CHILD", "DEFAULT_MAX_MULTIPLIER"]

#: seconds of work a widened window holds per child
WORK_PER_CHILD = 0.01
#: the widest window per child unless the worker says otherwise (``max_prefetch_multiplier``)
DEFAULT_MAX_MULTIPLIER = 64


class PrefetchWindow:
    """Tasks per child the fetcher may hold, between ``floor`` and ``cap``."""

    __slots__ = ("floor", "cap", "per_child")

    def __init__(self, floor: int, cap: int):
        self.floor = floor
        self.cap = cap
        self.per_child = floor

    def observe(self, outcomes: Iterable[tuple[Any, Any]]) -> bool:
        """Set the window from the run times of a settle batch's ``(job, outcome)`` pairs
        (outcomes of tasks that never ran carry no start and are skipped).  True when
        ``per_child`` changed."""
        if self.cap == self.floor:
            return False
        total = 0.0
        n = 0
        for _, out in outcomes:
            started = out.started_at
            if started > 0 and out.finished_at >= started:
                total += out.finished_at - started
                n += 1
        if not n:
            return False
        mean = total / n
        if mean * self.cap <= WORK_PER_CHILD:
            per_child = self.cap
        else:
            per_child = max(self.floor, round(WORK_PER_CHILD / mean))
        current = self.per_child
        # Run times jitter from batch to batch: move only on a change of half again or more
        # (each move costs the fetcher a wake-up when the window grows).
        if per_child * 2 < current * 3 and current * 2 < per_child * 3:
            return False
        self.per_child = per_child
        return True
