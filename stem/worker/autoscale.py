"""Autoscaling: the pool grows under a sustained backlog and shrinks when it has slack.

``Worker(..., autoscale=(8, 2))`` (``stem worker --autoscale 8,2``, Celery's
``MAX,MIN``) or ``autoscale=WorkerAutoscaleConfig(...)`` for the timings.

The main loop samples the pool on each housekeeping turn (``HOUSEKEEPING_EVERY``,
0.1 s): its slots, how many of them run nothing, and how many held deliveries
wait for a slot (prefetched, offered, in the engine's backlog).  Nothing else
is measured: the counts are already there.

- **Grow** by ``scale_up_step`` children once no slot was free for
  ``grow_after`` seconds and the deliveries waiting over the last ``grow_after``
  seconds averaged at least ``backlog_per_child`` per child; never more children than deliveries waited
  on average, never above ``max_concurrency``, never past the memory headroom
  (what the machine has available, less a reserve of ``MEMORY_RESERVE`` of its
  RAM, must hold the new children at the size of the current ones, or at
  ``max_memory_per_child`` when it is set).  The worker sees a backlog only in
  what it has leased beyond its running tasks, so this needs a prefetch window
  of two tasks per child or more.
- **Shrink** by one child once at least one slot was free at every sample for
  ``keep_alive`` seconds (the pool never had all its slots busy: one fewer
  would have run the same tasks), then by one more every ``cooldown`` while a
  slot stays free, never below ``min_concurrency``.  The engine retires an idle
  child through its recycle path (``ProcessEngine.resize``: it is drained, its
  offers taken back, and it exits; a thread of the inline engine leaves when it
  next looks for work): a running task is never killed nor redelivered.
- **No oscillation**: the grow and shrink conditions exclude each other (all
  slots busy the whole window against a free slot the whole keep-alive
  period), and after any change, ``cooldown`` seconds pass before the next.
  A manual resize (``pool_grow``/``pool_shrink``) counts as a change and
  restarts both windows; the bounds still hold for the autoscaler's own steps.

Every resize goes through ``WorkerState.resize``, which sets the prefetch limit
for the new size.  ``AutoscalePolicy`` is pure logic (an injectable clock and
memory check, so tests drive it sample by sample); ``Autoscaler`` feeds it from
the worker's state and engine and applies what it decides.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable, NamedTuple

from .. import _checks as checks
from ..errors import ConfigurationError

__all__ = ["WorkerAutoscaleConfig", "AutoscalePolicy", "Autoscaler", "Sample", "Decision", "MEMORY_RESERVE",
           "autoscale_config"]

log = logging.getLogger("stem.worker.autoscale")

#: the share of the machine's RAM a grow always leaves available
MEMORY_RESERVE = 0.1


@dataclasses.dataclass(frozen=True)
class WorkerAutoscaleConfig:
    """Bounds and timings of autoscaling (seconds); ``(max, min)`` as in Celery's ``--autoscale``."""

    max_concurrency: int
    min_concurrency: int = 1
    scale_up_step: int = 1          # children added per grow (at most as many as deliveries waited)
    backlog_per_child: float = 1.0  # mean deliveries waiting per child over the window that grows
    grow_after: float = 1.0         # how long every slot must stay busy before a grow
    keep_alive: float = 30.0        # how long a slot must stay free before the first shrink
    cooldown: float = 2.0           # after any change, before the next

    def __post_init__(self) -> None:
        checks.integer("autoscale min_concurrency", self.min_concurrency)
        checks.integer("autoscale max_concurrency", self.max_concurrency)
        if self.max_concurrency < self.min_concurrency:
            raise ConfigurationError(f"autoscale needs max_concurrency >= min_concurrency, got max "
                                     f"{self.max_concurrency} and min {self.min_concurrency} (Celery order: MAX,MIN)")
        checks.integer("autoscale scale_up_step", self.scale_up_step)
        checks.seconds("autoscale backlog_per_child", self.backlog_per_child)
        checks.seconds("autoscale grow_after", self.grow_after)
        checks.seconds("autoscale keep_alive", self.keep_alive)
        checks.seconds("autoscale cooldown", self.cooldown, inclusive=True)

    def check_window(self, prefetch_multiplier: int) -> None:
        """The worker sees its backlog only in the deliveries it holds beyond its running ones,
        on average about ``(0.75 * prefetch_multiplier - 1)`` per child (it refills at half its
        window): refuse a ``backlog_per_child`` the window cannot show."""
        most = (prefetch_multiplier - 1) / 2
        if self.backlog_per_child > most:
            fix = (f"lower backlog_per_child to {most:g} or less, or " if most > 0 else "")
            raise ConfigurationError(
                f"autoscale cannot see a backlog of {self.backlog_per_child:g} per child with "
                f"prefetch_multiplier {prefetch_multiplier}: the worker sees its backlog in the tasks it leases "
                f"beyond the running ones; {fix}raise prefetch_multiplier to "
                f"{math.ceil(2 * self.backlog_per_child + 1)} or more")


def autoscale_config(value: Any) -> WorkerAutoscaleConfig | None:
    """``Worker(autoscale=...)``: None, a ``(max, min)`` pair or a ``WorkerAutoscaleConfig``."""
    if value is None or isinstance(value, WorkerAutoscaleConfig):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return WorkerAutoscaleConfig(max_concurrency=value[0], min_concurrency=value[1])
    raise ConfigurationError(f"autoscale must be (max, min), e.g. (8, 2), or a WorkerAutoscaleConfig, got {value!r}")


class Sample(NamedTuple):
    """The pool at one housekeeping turn."""

    concurrency: int   # the pool's slots
    free: int          # slots that run nothing
    waiting: int       # held deliveries no slot runs yet


class Decision(NamedTuple):
    delta: int         # children to add (> 0) or retire (< 0)
    reason: str


class AutoscalePolicy:
    """Decides from samples (see the module docstring).  Not thread-safe: ``Autoscaler`` locks.

    ``headroom(n)`` says how many of ``n`` new children the memory can hold."""

    def __init__(self, config: WorkerAutoscaleConfig, *, clock: Callable[[], float] = time.monotonic,
                 headroom: Callable[[int], int] | None = None):
        self.config = config
        self._clock = clock
        self._headroom = headroom or (lambda n: n)
        self._busy_since: float | None = None   # since when no slot was free
        self._window: deque[tuple[float, int]] = deque()   # (when, waiting) of the last grow_after seconds
        self._waiting_sum = 0
        self._free_since: float | None = None   # since when a slot was free at every sample
        self._changed_at: float | None = None
        self.held_back: str | None = None        # why the pool does not grow though its backlog calls for it

    def decide(self, sample: Sample) -> Decision | None:
        """Take one sample; a resize to apply now, or None."""
        now = self._clock()
        cfg = self.config
        window = self._window
        if sample.free > 0:
            self._busy_since = None
            window.clear()
            self._waiting_sum = 0
            self.held_back = None
            if self._free_since is None:
                self._free_since = now
        else:
            self._free_since = None
            if self._busy_since is None:
                self._busy_since = now
            window.append((now, sample.waiting))
            self._waiting_sum += sample.waiting
            while window[0][0] < now - cfg.grow_after:   # a long busy spell without a backlog is forgotten
                self._waiting_sum -= window.popleft()[1]
        if self._changed_at is not None and now - self._changed_at < cfg.cooldown:
            return None
        c = sample.concurrency
        if self._busy_since is not None and now - self._busy_since >= cfg.grow_after and c < cfg.max_concurrency:
            mean = self._waiting_sum / len(window)
            if mean >= cfg.backlog_per_child * c:
                want = min(cfg.scale_up_step, cfg.max_concurrency - c, math.ceil(mean))
                n = min(want, self._headroom(want))
                reason = f"{mean / c:.1f} waiting per child for {now - self._busy_since:.1f}s"
                if n <= 0:
                    if self.held_back is None:
                        log.warning("autoscale: the backlog calls for more children, but the memory "
                                    "headroom holds none (%s)", reason)
                    self.held_back = "memory"
                    self._changed_at = now   # look again after a cooldown, not on every turn
                    return None
                self.held_back = None
                return Decision(n, reason)
        if (self._free_since is not None and now - self._free_since >= cfg.keep_alive
                and c > cfg.min_concurrency):
            return Decision(-1, f"a slot free for {now - self._free_since:.1f}s")
        return None

    def resized(self, delta: int, *, manual: bool = False) -> None:
        """A resize happened (``delta`` children): the cooldown starts, the backlog window
        restarts; a grow or a manual resize restarts the keep-alive period too (after one of
        the policy's shrinks, a slot still free at the next samples retires the next child)."""
        self._changed_at = self._clock()
        self._busy_since = None
        self._window.clear()
        self._waiting_sum = 0
        if delta > 0 or manual:
            self._free_since = None


class Autoscaler:
    """Feeds the policy from the worker's state and engine on the main loop's housekeeping
    turn, applies its decisions through ``resize``, and keeps what ``stats()`` shows."""

    def __init__(self, config: WorkerAutoscaleConfig, *, concurrency: Callable[[], int],
                 slots_per_child: int, held: Callable[[], int], running: Callable[[], int],
                 resize: Callable[[int], int], child_rss: Callable[[], list[int]],
                 max_memory_per_child: int | None = None, clock: Callable[[], float] = time.monotonic,
                 memory: Callable[[], tuple[int, int]] | None = None):
        self.config = config
        self._concurrency = concurrency
        self._slots_per_child = slots_per_child
        self._held = held
        self._running = running
        self._resize = resize
        self._child_rss = child_rss
        self._max_memory_per_child = max_memory_per_child
        self._memory = memory or _virtual_memory
        self._lock = threading.Lock()
        self.policy = AutoscalePolicy(config, clock=clock, headroom=self.headroom)
        self._last: dict[str, Any] = {}
        self._grown = self._shrunk = 0

    def headroom(self, n: int) -> int:
        """How many of ``n`` new children fit in the available memory, less the reserve."""
        sizes = self._child_rss()
        need = self._max_memory_per_child or (sum(sizes) // len(sizes) if sizes else 0)
        available, total = self._memory()
        spare = available - MEMORY_RESERVE * total
        if spare <= 0:
            return 0
        return n if need <= 0 else min(n, int(spare // need))

    def tick(self) -> None:
        """One sample, and the resize it calls for (the main loop, between engine turns: no
        task reaches an idle child between the sample and the shrink)."""
        with self._lock:
            c = self._concurrency()
            held, running = self._held(), self._running()
            sample = Sample(c, max(0, c * self._slots_per_child - running), max(0, held - running))
            decision = self.policy.decide(sample)
            if decision is None:
                return
            new = self._resize(decision.delta)
            if new == c:
                return
            self.policy.resized(new - c)
            self._note("grow" if new > c else "shrink", c, new, decision.reason)
        log.info("autoscale: %s from %d to %d children (%s)", self._last["last"], c, new, decision.reason)

    def resize(self, delta: int) -> int:
        """A manual resize (the control plane): applied, noted, and both windows restart."""
        with self._lock:
            c = self._concurrency()
            new = self._resize(delta)
            if new != c:
                self.policy.resized(new - c, manual=True)
                self._note("grow" if new > c else "shrink", c, new, "manual")
            return new

    def _note(self, direction: str, before: int, after: int, reason: str) -> None:
        if reason != "manual":
            if after > before:
                self._grown += 1
            else:
                self._shrunk += 1
        self._last = {"last": direction, "at": time.time(), "from": before, "to": after, "reason": reason}

    def info(self) -> dict[str, Any]:
        """What ``stats()`` carries under ``autoscale``."""
        cfg = self.config
        with self._lock:
            return {"min": cfg.min_concurrency, "max": cfg.max_concurrency, "last": None, "at": None,
                    **self._last, "grows": self._grown, "shrinks": self._shrunk,
                    "held_back": self.policy.held_back}


def _virtual_memory() -> tuple[int, int]:
    import psutil
    vm = psutil.virtual_memory()
    return vm.available, vm.total
