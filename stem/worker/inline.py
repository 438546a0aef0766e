"""The inline engine: handlers run on threads inside the worker process.

For tests, embedding and I/O-bound tasks.  Soft time limits and soft
shutdowns raise inside the task's thread between bytecodes; a thread cannot
be killed, so a hard limit marks the task failed and leaves the thread to
finish (use ``isolation="process"`` when hard limits must really stop work).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from typing import Callable

from ..logs import run_in_task_context
from ..signals import signals
from ..task import TaskContext
from .engine import Engine, Job, RateLimiter, take_matching
from .execution import Outcome, is_expired, outcome_of_exception, run_handler

__all__ = ["InlineEngine"]


def raise_in_thread(ident: int, exc_type: type[BaseException]) -> bool:
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc_type))
    if n > 1:  # should never happen; undo
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
        return False
    return n == 1


class InlineEngine(Engine):
    def __init__(self, concurrency: int, make_context: Callable[[Job], TaskContext], worker_id: str | None = None):
        self.concurrency = concurrency
        self._make_context = make_context
        self.worker_id = worker_id
        self._cond = threading.Condition()
        self._backlog: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._abandoned: set[int] = set()
        self._limiters: dict[str, RateLimiter] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._retire = 0
        self._report: Callable[[Job, Outcome], None] | None = None

    def start(self, report: Callable[[Job, Outcome], None]) -> None:
        self._report = report
        for i in range(self.concurrency):
            t = threading.Thread(target=self._slot, name=f"stem-inline-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, job: Job) -> None:
        self.submit_many([job])

    def submit_many(self, jobs: list[Job]) -> None:
        with self._cond:
            self._backlog.extend(jobs)
            self._cond.notify(len(jobs))

    def _next(self, expired: list[Job]) -> Job | None:
        """Pick the first job whose rate limit allows it (with the lock held).  Jobs past
        their deadline go to ``expired`` instead, and then it returns None at once, for the
        slot to report them; otherwise None means the slot retires."""
        backlog = self._backlog
        while not self._stopping:
            if self._retire:
                self._retire -= 1
                return None
            now, wall = time.monotonic(), time.time()
            wait = None
            i = 0
            while i < len(backlog):
                job = backlog[i]
                if is_expired(job.envelope, wall):
                    del backlog[i]
                    expired.append(job)
                    continue
                options = job.handler.options
                if options.rate_limit is None or options.rate_scope != "worker":   # global: the broker's
                    del backlog[i]
                    return job
                limiter = self._limiters.get(job.handler.name)
                if limiter is None:
                    limiter = self._limiters[job.handler.name] = RateLimiter(job.handler.options.rate_per_second)
                w = limiter.wait_time(now)
                if w == 0.0:
                    del backlog[i]
                    return job
                wait = w if wait is None else min(wait, w)
                if job.envelope.expires_at is not None:   # wake to end it when its deadline passes
                    wait = min(wait, max(0.0, job.envelope.expires_at - wall) + 0.001)
                i += 1
            if expired:
                return None
            self._cond.wait(wait)
        return None

    def _slot(self) -> None:
        me = threading.get_ident()
        while True:
            expired: list[Job] = []
            with self._cond:
                job = self._next(expired)
                if job is not None:
                    job.thread_ident = me
                    job.mark_started()
                    self._running[job.seq] = job
            for late in expired:   # waited in the backlog past their deadline: never run
                self._report(late, Outcome.expired(late.envelope.id, late.envelope.expires_at))
            if job is None:
                if expired:
                    continue
                return
            outcome = run_in_task_context(job.envelope, self.worker_id, self._run, job)
            with self._cond:
                self._running.pop(job.seq, None)
                abandoned = job.seq in self._abandoned
                self._abandoned.discard(job.seq)
            if not abandoned:
                self._report(job, outcome)

    def _run(self, job: Job) -> Outcome:
        env = job.envelope
        if is_expired(env, time.time()):   # as a child checks just before the handler
            return Outcome.expired(env.id, env.expires_at)
        ctx = self._make_context(job)
        try:
            if signals.task_prerun.receivers:
                signals.task_prerun.send(self, envelope=env, context=ctx)
            outcome = run_handler(job.handler, ctx, env.args)
        except BaseException as exc:  # an async exception landing outside the handler
            outcome = outcome_of_exception(exc, time.time(), job.handler, ctx, env.args)
        return outcome

    def take_backlog(self, predicate=None) -> list[Job]:
        with self._cond:
            return take_matching(self._backlog, predicate)

    def resize(self, delta: int) -> None:
        with self._cond:
            if delta > 0:
                for _ in range(delta):
                    t = threading.Thread(target=self._slot, name=f"stem-inline-{len(self._threads)}", daemon=True)
                    t.start()
                    self._threads.append(t)
            else:
                self._retire += -delta
                self._cond.notify_all()
            self.concurrency += delta

    def running(self) -> list[Job]:
        with self._cond:
            return list(self._running.values())

    def interrupt(self, job: Job, exc_type: type[BaseException]) -> None:
        with self._cond:
            if job.seq in self._running and job.thread_ident is not None:
                job.interrupted = True
                raise_in_thread(job.thread_ident, exc_type)

    def kill(self, job: Job, reason: str) -> bool:
        """Threads cannot be killed: the job is abandoned (its report is dropped)
        and asked to stop; returns False because it may still be running."""
        from ..errors import WorkerShutdown
        with self._cond:
            if job.seq not in self._running:
                return False
            self._abandoned.add(job.seq)
            if job.thread_ident is not None:
                raise_in_thread(job.thread_ident, WorkerShutdown)
        return False

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def info(self) -> dict:
        with self._cond:
            self._threads = [t for t in self._threads if t.is_alive()]   # retired by a shrink: gone
            return {"engine": "inline", "threads": len(self._threads), "backlog": len(self._backlog),
                    "running": len(self._running)}
