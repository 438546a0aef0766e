"""How finished outcomes travel from the engine to the settle thread: in batches.

A settle round trip (client and server) costs about the same for 2 outcomes
as for 20, so settling each outcome as it lands spends most of the
supervisor's CPU on per-call overhead.  The engine reports into an
``Outbox`` on the main loop; the main loop, which wakes for every result
anyway, calls ``flush`` after each turn, and the outbox hands what it holds
to the settle thread as one list when that is worth a round trip:

* it holds every unsettled job's outcome (nothing more is coming), or
* half the prefetch window (the fetcher's refill threshold), or
* the slots a waiting fetcher needs, or
* the oldest outcome has waited ``linger`` seconds (5 ms), or
* the worker is stopping.

Holding costs the settle thread no wake-ups: it blocks on the queue of
batches and is woken once per batch.  The price is a slightly wider
window for at-least-once duplicates: a worker killed with -9 may have a few
more finished but unsettled tasks, which run again elsewhere.
"""

from __future__ import annotations

import collections
import queue
from typing import Any

__all__ = ["Outbox", "SETTLE_LINGER", "MAX_BATCH"]

SETTLE_LINGER = 0.005
MAX_BATCH = 512
IDLE_WAIT = 0.05   # how long the main loop may sleep when nothing is held


class Outbox:
    def __init__(self, linger: float = SETTLE_LINGER):
        self.linger = linger
        self._items: collections.deque = collections.deque()   # append/popleft: safe from any thread
        self._batches: queue.SimpleQueue = queue.SimpleQueue()
        self._flush_at: float | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)

    def flush(self, now: float, *, unsettled: int, refill_at: int, room: int | None = None,
              force: bool = False) -> float:
        """Hand the held outcomes on as one batch, or keep holding them (see the module
        docstring).  ``room`` is the free prefetch slots when the fetcher waits for some,
        else None.  Returns how long the caller may sleep before the next look."""
        n = len(self._items)
        if not n:
            return IDLE_WAIT
        if self._flush_at is None:
            self._flush_at = now + self.linger
        if not (force or now >= self._flush_at or n >= min(unsettled, refill_at)
                or (room is not None and room + n >= refill_at)):
            return min(IDLE_WAIT, self._flush_at - now)
        pop = self._items.popleft
        self._batches.put([pop() for _ in range(n)])
        self._flush_at = None
        return IDLE_WAIT

    def get(self, timeout: float) -> list:
        """For the settle thread: the next batch and any queued behind it (up to MAX_BATCH
        outcomes), or [] after ``timeout`` seconds."""
        try:
            batch = self._batches.get(timeout=timeout)
        except queue.Empty:
            return []
        try:
            while len(batch) < MAX_BATCH:
                batch += self._batches.get_nowait()
        except queue.Empty:
            pass
        return batch

    def empty(self) -> bool:
        """Nothing held and nothing handed on but not yet taken."""
        return not self._items and self._batches.empty()
