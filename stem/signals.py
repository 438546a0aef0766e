"""Lifecycle signals: hooks that observe publishing, workers and tasks.

Receivers are called ``receiver(sender, **kwargs)``; accept ``**kwargs`` so a
signal that gains an argument in a later version does not break you.
Receivers are strong references (a receiver connected from a closure stays
connected).  A receiver that raises is logged and never breaks the task or the
worker.  Sending a signal nobody listens to costs one attribute check, so the
hot path calls ``if sig.receivers: sig.send(...)``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

__all__ = ["Signal", "signals", "StemSignals"]

log = logging.getLogger("stem.signals")

Receiver = Callable[..., Any]


class Signal:
    __slots__ = ("name", "doc", "receivers")

    def __init__(self, name: str, doc: str = ""):
        self.name = name
        self.doc = doc
        self.receivers: tuple[Receiver, ...] = ()

    def connect(self, receiver: Receiver | None = None):
        """Connect ``receiver``; usable as a decorator. Connecting twice is a no-op."""
        if receiver is None:
            return self.connect
        if not callable(receiver):
            from .errors import ConfigurationError
            raise ConfigurationError(f"signal {self.name}: receiver {receiver!r} is not callable")
        if receiver not in self.receivers:
            self.receivers = self.receivers + (receiver,)
        return receiver

    def disconnect(self, receiver: Receiver) -> bool:
        if receiver in self.receivers:
            self.receivers = tuple(r for r in self.receivers if r is not receiver and r != receiver)
            return True
        return False

    def send(self, sender: Any = None, **kwargs: Any) -> list[tuple[Receiver, Any]]:
        """Call every receiver as ``receiver(sender, **kwargs)``; errors are logged, not raised."""
        out = []
        for receiver in self.receivers:
            try:
                out.append((receiver, receiver(sender, **kwargs)))
            except Exception:
                log.exception("receiver %r of signal %s raised; ignored", receiver, self.name)
        return out

    def __repr__(self) -> str:
        return f"<Signal {self.name} receivers={len(self.receivers)}>"


class StemSignals:
    """The catalog.  Keyword arguments each signal sends are listed in its doc."""

    def __init__(self) -> None:
        s = Signal
        self.before_task_publish = s("before_task_publish", "envelope")
        self.after_task_publish = s("after_task_publish", "envelope")
        self.worker_init = s("worker_init", "worker")
        self.worker_ready = s("worker_ready", "worker")
        self.worker_stopping = s("worker_stopping", "worker, mode")
        self.worker_shutdown = s("worker_shutdown", "worker")
        self.worker_heartbeat = s("worker_heartbeat", "worker, heartbeat")
        self.worker_child_init = s("worker_child_init", "worker, pid")
        self.worker_child_shutdown = s("worker_child_shutdown", "worker, pid, reason, exitcode")
        self.task_received = s("task_received", "envelope, delivery")
        self.task_prerun = s("task_prerun", "envelope, context")
        self.task_postrun = s("task_postrun", "envelope, status, started_at, finished_at")
        self.task_retry = s("task_retry", "envelope, error, delay")
        self.task_succeeded = s("task_succeeded", "envelope, result, runtime")
        self.task_failed = s("task_failed", "envelope, error, reason")
        self.task_revoked = s("task_revoked", "envelope, reason")
        self.task_dead_lettered = s("task_dead_lettered", "task_id, queue, reason")
        self.control_command_received = s("control_command_received", "command, arguments")
        self.control_command_completed = s("control_command_completed", "command, reply")
        # sent by a Scheduler (the sender): a run it published (late: a misfire caught up), and
        # runs it settled without publishing (reason: "misfire", "overlap" or "paused")
        self.schedule_fired = s("schedule_fired", "schedule, fire_time, run_id, late")
        self.schedule_skipped = s("schedule_skipped", "schedule, fire_times, reason")

    def __iter__(self):
        return (v for v in vars(self).values() if isinstance(v, Signal))

    def get(self, name: str) -> Signal:
        sig = getattr(self, name, None)
        if not isinstance(sig, Signal):
            from .errors import ConfigurationError
            raise ConfigurationError(f"unknown signal {name!r}; known: {', '.join(x.name for x in self)}")
        return sig


signals = StemSignals()
