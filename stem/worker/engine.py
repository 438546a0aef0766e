"""What the Worker needs from an execution engine (threads now, child processes next).

The Worker owns the broker and the backend; an engine only runs jobs and
reports each ``Outcome`` through ``report(job, outcome)``.  Jobs wait in the
engine's backlog until a slot is free, so a busy slot never starves an idle one.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable

from ..redact import shown_args
from ..results import MAX_CHILDREN
from ..task import TaskHandler

if TYPE_CHECKING:
    from ..brokers.base import Delivery
    from ..envelope import Envelope
    from .execution import Outcome

__all__ = ["Job", "Engine", "EngineHooks", "RateLimiter", "take_matching"]

_UNSET: Any = object()


def take_matching(backlog, predicate: "Callable[[Job], bool] | None") -> list["Job"]:
    """Remove and return the jobs of ``backlog`` (a deque) matching ``predicate`` (all when None)."""
    if predicate is None:
        jobs = list(backlog)
        backlog.clear()
        return jobs
    jobs = [j for j in backlog if predicate(j)]
    for j in jobs:
        backlog.remove(j)
    return jobs


@dataclasses.dataclass(frozen=True)
class EngineHooks:
    """What an engine calls back into; the Worker supplies them (an engine never holds it)."""

    heartbeat: Callable[[str], None]              # a task asked for its lease to be renewed now
    progress: Callable[[str, float, Any], None]   # ctx.progress() of a running task
    enqueue: Callable[..., str]                   # ctx.enqueue() in a child: (name, args, options, task_id, parent)
    stop: Callable[[str], None]                   # the engine cannot go on: request this shutdown mode
    sender: Any = None                            # what the engine's signals are sent from


class Job:
    """One delivery on its way through the worker."""

    __slots__ = ("seq", "delivery", "envelope", "handler", "received_at", "started_at", "extended_at",
                 "soft_deadline", "hard_deadline", "interrupted", "settled", "slot", "thread_ident", "noted_running",
                 "key_released", "children", "_shown")

    def __init__(self, seq: int, delivery: "Delivery", envelope: "Envelope", handler: TaskHandler):
        self.seq = seq
        self.delivery = delivery
        self.envelope = envelope
        self.handler = handler
        self.received_at = time.monotonic()
        self.extended_at = self.received_at
        self.started_at: float | None = None       # epoch seconds, set when a slot starts it
        self.soft_deadline: float | None = None    # monotonic
        self.hard_deadline: float | None = None    # monotonic
        self.interrupted = False
        self.settled = False
        self.slot: Any = None
        self.thread_ident: int | None = None
        self.noted_running = False   # a RUNNING status was noted for it (stem.worker.progress)
        self.key_released = False    # its unique key was handed to be released at its start
        self.children: list[str] | None = None   # ids of the tasks it enqueued (ctx.enqueue), the first MAX_CHILDREN
        self._shown: Any = _UNSET

    def shown_args(self) -> dict[str, Any] | None:
        """Its arguments as its statuses keep them (``stem.redact.shown_args`` under its
        handler's ``redact``), worked out once: a RUNNING and a terminal status share it."""
        shown = self._shown
        if shown is _UNSET:
            shown = self._shown = shown_args(self.envelope.args, self.handler.options.redact,
                                             size_hint=len(self.delivery.frame))
        return shown

    def add_child(self, task_id: str) -> None:
        """A task it enqueued (``ctx.enqueue``), for its statuses' ``children``."""
        children = self.children
        if children is None:
            self.children = [task_id]
        elif len(children) < MAX_CHILDREN:
            children.append(task_id)

    def mark_started(self) -> None:
        self.started_at = time.time()
        now = time.monotonic()
        env = self.envelope
        if env.soft_time_limit:
            self.soft_deadline = now + env.soft_time_limit
        if env.hard_time_limit:
            self.hard_deadline = now + env.hard_time_limit


class RateLimiter:
    """Token bucket per task name: ``rate`` tasks per second, bursts of up to max(1, rate).  Only for
    ``TaskOptions(rate_scope="worker")``: a global rate limit (the default) is the broker's, which
    never leases a throttled task (``stem.limits``)."""

    __slots__ = ("rate", "capacity", "tokens", "updated")

    def __init__(self, rate: float):
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def wait_time(self, now: float) -> float:
        """0 if a token is available now (and takes it), else seconds until one is."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Engine(abc.ABC):
    """Runs jobs.  All methods are called from the Worker's threads."""

    concurrency: int

    @abc.abstractmethod
    def start(self, report: Callable[[Job, "Outcome"], None]) -> None:
        """Start the slots; every finished job is passed to ``report`` exactly once."""

    @abc.abstractmethod
    def submit(self, job: Job) -> None:
        """Queue a job for the next free slot; never blocks."""

    def submit_many(self, jobs: list[Job]) -> None:
        """Queue a batch (engines override this to wake their slots once)."""
        for job in jobs:
            self.submit(job)

    @abc.abstractmethod
    def take_backlog(self, predicate: Callable[[Job], bool] | None = None) -> list[Job]:
        """Remove and return the jobs that have not started (all, or those matching ``predicate``)."""

    @abc.abstractmethod
    def resize(self, delta: int) -> None:
        """Add (``delta`` > 0) or retire (< 0) slots; retiring slots finish their task first."""

    @abc.abstractmethod
    def running(self) -> list[Job]:
        """Jobs that have started and not yet reported."""

    @abc.abstractmethod
    def interrupt(self, job: Job, exc_type: type[BaseException]) -> None:
        """Ask a running job to stop by raising ``exc_type`` inside it."""

    @abc.abstractmethod
    def kill(self, job: Job, reason: str) -> bool:
        """Stop a running job now (hard time limit, revoke --terminate, hard
        shutdown).  True when it really stopped; the engine then never reports it."""

    @abc.abstractmethod
    def stop(self, timeout: float) -> None:
        """Release the slots (after running jobs finished or were killed)."""

    def poll(self, timeout: float) -> bool:
        """Engines without threads of their own do their work here, on the
        Worker's main thread, sleeping up to ``timeout``; True if they did (the
        Worker then does not block on its outcome queue)."""
        return False

    def tick(self) -> None:
        """Periodic housekeeping from the Worker's main loop (recycling, health)."""

    def info(self) -> dict[str, Any]:
        return {}
