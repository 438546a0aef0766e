"""The supervisor yields the CPU to its children (Linux ``SCHED_BATCH``).

The thread that turns the process pool sleeps and wakes once per result or
so.  Under the default policy each wake-up may preempt whatever runs on that
CPU -- a child in the middle of a task, or the Redis server answering one --
so on a machine with few cores the supervisor's bookkeeping delays the work
it exists to feed.  ``SCHED_BATCH`` keeps the thread's fair share of the CPU
(same nice level) but gives up wake-up preemption: it runs when a CPU frees
or at the next scheduler tick, and by then it usually finds several results
to handle in one turn.  Nothing the pool does needs sub-millisecond reaction
while every CPU is busy; when a CPU is idle the thread runs at once anyway.
On the peers benchmark it gave more tasks per second for less CPU in that
thread (benchmarks/README.md).

The price is latency when the children keep every CPU busy: the thread then
waits for a scheduler tick, so results and next tasks move up to a tick
later (``benchmarks/cpu_latency.py`` measures it; figures in benchmarks/README.md).  ``Worker(yield_cpu=False)``
(``stem worker --no-yield-cpu``) keeps the default policy.

Only a thread under the default policy is switched (a worker started under
``chrt`` keeps what it was given), threads it starts afterwards inherit the
policy (the settle, fetcher and control threads: supervisor bookkeeping too), and the switch is
undone when the pool stops, since a library user's thread is theirs.
Children started from a yielding thread (``start_method="spawn"``) go back
to the default policy first thing (``normal_policy``).  Where the call is
missing or refused (not Linux, a seccomp filter) nothing changes.
"""

from __future__ import annotations

import logging
import os
import threading

__all__ = ["yield_to_children", "restore", "normal_policy"]

log = logging.getLogger("stem.worker.process_engine")

_BATCH = getattr(os, "SCHED_BATCH", None)
_OTHER = getattr(os, "SCHED_OTHER", None)


def yield_to_children() -> int | None:
    """Switch the calling thread to ``SCHED_BATCH``; its native id when switched, else None."""
    if _BATCH is None or not hasattr(os, "sched_setscheduler"):
        return None
    try:
        if os.sched_getscheduler(0) != _OTHER:
            return None
        os.sched_setscheduler(0, _BATCH, os.sched_param(0))
    except OSError as exc:
        log.debug("the supervisor thread keeps its scheduling policy: %s", exc)
        return None
    return threading.get_native_id()


def restore(tid: int | None) -> None:
    """Undo ``yield_to_children`` for thread ``tid`` (from any thread; gone threads are fine)."""
    if tid is None:
        return
    try:
        if os.sched_getscheduler(tid) == _BATCH:
            os.sched_setscheduler(tid, _OTHER, os.sched_param(0))
    except OSError:
        pass


def normal_policy() -> None:
    """In a child: leave ``SCHED_BATCH`` inherited from a yielding supervisor thread."""
    if _BATCH is None:
        return
    try:
        if os.sched_getscheduler(0) == _BATCH:
            os.sched_setscheduler(0, _OTHER, os.sched_param(0))
    except OSError:
        pass
