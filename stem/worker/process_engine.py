"""The supervisor's process pool: ``concurrency`` isolated children fed through shared-memory rings.

The Worker's main thread turns the pool (``poll``): it hands jobs from the
backlog to children with a free slot (so an idle child never waits behind a
busy one), reads outcomes from every child's ring with one ``poll()``,
watches exits (reported by the zygote, by ``spawn`` sentinels, or, once
the zygote died, by the orphaned children's pidfds), recycles children
(``max-tasks``, ``max-memory``) and replaces crashed or killed ones (from a
new zygote when the first one died: see ``stem.worker.zygote``).
No thread of its own: one fewer thread fighting for the GIL on the hot path.
The fetcher thread only calls ``submit`` (which wakes ``poll``).  Once the
children are up, the thread that turns the pool yields the CPU to them
(``SCHED_BATCH`` on Linux, until the pool stops; see ``stem.worker.sched``).

The backlog and how it reaches the children (free slots, then offers to busy
ones) are ``stem.worker.dispatch``.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import signal
import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

from ..results import Reason
from ..errors import WorkerError, WorkerShutdown
from ..signals import signals
from ..task import TaskOptions, TaskRegistry
from .child import child_main, spawn_entry
from .protocol import (ChildExit, Enqueue, Fatal, Heartbeat, Progress, Ready, Result, Stop, decode_from_child,
                       encode_message)
from .dispatch import ChildState, Dispatcher
from .engine import Engine, EngineHooks, Job
from .execution import ERROR, Outcome
from .channel import Channel, ChannelPoller
from .sched import restore, yield_to_children
from .keeper import ZygoteKeeper, exited_pidfds, signal_pidfd, wait_pidfds
from .zygote import ZygoteGone

__all__ = ["ProcessEngine", "PoolState", "ChildState", "ChildSlot"]

log = logging.getLogger("stem.worker.process_engine")

_encode = encode_message
_STOP = encode_message(Stop())

CHANNEL_CAPACITY = 1 << 20
STARTUP_TIMEOUT = 60.0
MEMORY_CHECK_INTERVAL = 1.0
MAX_STARTUP_FAILURES = 3
EXIT_CHECK_INTERVAL = 0.05


class PoolState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class ChildSlot:
    """The supervisor's side of one child process: its channel, state and running jobs
    (the child's own side is ``stem.worker.child.ChildProcess``)."""

    __slots__ = ("pid", "channel", "state", "running", "offers", "tasks_done", "rss", "started_at", "ready_at",
                 "recycle_reason", "process", "fatal", "last_memory_check", "forked_ns", "pidfd")

    def __init__(self, pid: int, channel: Channel, process: Any = None, pidfd: int | None = None):
        self.pid = pid
        self.pidfd = pidfd              # from the zygote (Linux); closed, under the lock, when it exits
        self.channel = channel
        self.state = ChildState.STARTING
        self.running: dict[int, Job] = {}
        self.offers: dict[int, Job] = {}   # claim slot -> job offered, not claimed yet (as far as we saw)
        self.tasks_done = 0
        self.rss = 0
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.recycle_reason: str | None = None
        self.process = process          # multiprocessing.Process under spawn
        self.fatal: str | None = None
        self.last_memory_check = time.monotonic()
        self.forked_ns = 0

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, "state": self.state.value, "rss": self.rss or _rss(self.pid),
                "tasks_done": self.tasks_done,
                "running": len(self.running), "offered": len(self.offers), "started_at": self.started_at}


class ProcessEngine(Engine):
    """``concurrency`` child processes, each fed through its own channel (see the module docstring)."""

    def __init__(self, *, registry: TaskRegistry, registry_ref: str | None = None, concurrency: int,
                 hooks: EngineHooks, worker_id: str, child_concurrency: int = 1,
                 max_tasks_per_child: int | None = None, max_memory_per_child: int | None = None,
                 max_crash_redeliveries: int = 3, start_method: str | None = None, yield_cpu: bool = True,
                 can_sign: bool = True, backend_recipe: Any = None, broker_recipe: Any = None,
                 signer: Any = None):
        self.registry = registry
        self.registry_ref = registry_ref   # "module:attribute": how a fresh interpreter loads the registry
        self.concurrency = concurrency
        self.child_concurrency = child_concurrency
        self.max_tasks = max_tasks_per_child
        self.max_memory = max_memory_per_child
        self.max_crash_redeliveries = max_crash_redeliveries
        self.yield_cpu = yield_cpu
        self.hooks = hooks
        self.start_method = start_method or ("fork" if hasattr(os, "fork") else "spawn")
        if self.start_method not in ("fork", "spawn"):
            raise WorkerError(f"start_method must be 'fork' or 'spawn', got {self.start_method!r}")
        self.state = PoolState.CREATED
        self._lock = threading.RLock()
        self._children: dict[int, ChildSlot] = {}
        self._children_version = 0     # bumped (under the lock) whenever _children changes
        self._poll_set: _PollSet | None = None
        self._dispatcher = Dispatcher(self)
        self._crashes: dict[str, int] = {}
        self._enqueue_failures: dict[str, str] = {}   # task id -> why a child task it enqueued was not
        self._keeper: ZygoteKeeper | None = None    # with start_method "fork"
        self._owed = 0                  # children to fork once a new zygote is ready
        self._adopted: dict[int, ChildSlot] = {}   # children of a dead zygote: exits seen on their pidfds
        self._report: Callable[[Job, Outcome], None] | None = None
        self._wake_r = self._wake_w = -1   # the wake-up pipe: opened by start(), closed by stop()
        self._startup_failures = 0
        self._last_exit_check = 0.0
        self._replacements = 0
        self._replace_ms: deque[float] = deque(maxlen=64)
        self._error: str | None = None
        self._yielding_tid: int | None = None
        self._params = {"measure_rss": self.max_memory is not None, "child_concurrency": self.child_concurrency,
                        "supervisor_pid": os.getpid(), "worker_id": worker_id,
                        # a verify-only worker (public keys only) cannot sign what its tasks enqueue
                        "can_sign": can_sign,
                        # where a chord callback's child reads its members' results (stem.canvas)
                        "backend_recipe": backend_recipe,
                        # what a task's ctx.producer() publishes with (workflow activations: stem.workflows)
                        "broker_recipe": broker_recipe, "signer": signer}

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, report: Callable[[Job, Outcome], None]) -> None:
        if self.state is not PoolState.CREATED:
            raise WorkerError(f"this process engine was started already ({self.state.value})")
        self._report = report
        self.state = PoolState.STARTING
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if self.start_method == "fork":
            self._keeper = ZygoteKeeper(functools.partial(child_main, registry=self.registry),
                                        self.registry_ref or self.registry,
                                        startup_timeout=STARTUP_TIMEOUT,
                                        normal_policy=lambda: bool(self._params.get("normal_policy")))
            self._keeper.start()
        try:
            for _ in range(self.concurrency):
                self._spawn_child()
            self._wait_ready()
        except BaseException:
            self._teardown(1.0)
            self.state = PoolState.FAILED
            raise
        self.state = PoolState.RUNNING
        self._dispatcher.wanted = True
        self._yielding_tid = yield_to_children() if self.yield_cpu else None
        if self._yielding_tid is not None:
            self._params["normal_policy"] = True   # spawned children do not inherit the yielding

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            self._poll_once(0.05)
            with self._lock:
                children = list(self._children.values())
                failed = [c for c in children if c.state is ChildState.DEAD]
                if failed or self._error:
                    reason = self._error or failed[0].fatal or "exited during startup"
                    raise WorkerError(f"worker children failed to start: {reason}")
                if len(children) >= self.concurrency and all(c.state is ChildState.READY for c in children):
                    return
            if time.monotonic() > deadline:
                raise WorkerError(f"worker children did not start within {STARTUP_TIMEOUT}s")

    def _spawn_child(self) -> ChildSlot:
        t0 = time.perf_counter_ns()
        channel = Channel.create(CHANNEL_CAPACITY)
        pidfd = None
        try:
            if self._keeper is not None:
                pid, pidfd = self._keeper.fork(channel.handle, self._params)
                process = None
            else:
                import multiprocessing
                ctx = multiprocessing.get_context("spawn")
                process = ctx.Process(target=spawn_entry, args=(channel.handle, self._params,
                                                                        self.registry_ref or self.registry),
                                      daemon=True, name="stem-child")
                process.start()
                pid = process.pid
        except BaseException:
            channel.close()
            raise
        child = ChildSlot(pid, channel, process, pidfd)
        child.forked_ns = t0
        with self._lock:
            self._children[pid] = child
            self._children_version += 1
        signals.worker_child_init.send(self.hooks.sender, worker=self.hooks.sender, pid=pid)
        return child

    def stop(self, timeout: float) -> None:
        with self._lock:
            if self.state in (PoolState.STOPPED, PoolState.CREATED):
                return
            self.state = PoolState.STOPPING
            for child in self._children.values():
                if child.state in (ChildState.READY, ChildState.STARTING, ChildState.DRAINING):
                    self._dispatcher.take_back(child)
                    self._stop_child(child)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._children:
                    break
            self._poll_once(0.05)
        self._teardown(1.0)

    def _teardown(self, timeout: float) -> None:
        self.state = PoolState.STOPPED
        restore(self._yielding_tid)
        self._yielding_tid = None
        with self._lock:
            children = list(self._children.values())
            self._children.clear()
            self._children_version += 1
            for child in children:
                _signal_child(child, signal.SIGKILL)
            adopted = [c.pidfd for c in children if c.pid in self._adopted and c.pidfd is not None]
            self._adopted.clear()
        for child in children:
            if child.process is not None:
                child.process.join(timeout)
        wait_pidfds(adopted, timeout)   # not ours to reap: just see them gone
        if self._keeper is not None:
            self._keeper.stop(timeout)
        for child in children:
            child.channel.close()
            _close_pidfd(child)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # -- the Worker's side -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.submit_many([job])

    def submit_many(self, jobs: list[Job]) -> None:
        with self._lock:
            self._dispatcher.backlog.extend(jobs)
            self._dispatcher.wanted = True
        self._wake()

    def take_backlog(self, predicate=None) -> list[Job]:
        """The backlog's jobs, and the offers the children have not claimed yet."""
        with self._lock:
            return self._dispatcher.take(self._children.values(), predicate)

    def resize(self, delta: int) -> None:
        """Grow by forking children now; shrink by draining the idlest children (no replacement):
        ones still starting first (a grow just before), then idle ones, busy ones last (they
        exit after their running tasks)."""
        with self._lock:
            self.concurrency += delta
            self._dispatcher.wanted = True
            if delta > 0:
                for _ in range(delta):
                    self._add_child()
                return
            live = sorted((c for c in self._children.values() if c.state in (ChildState.READY, ChildState.STARTING)),
                          key=lambda c: (len(c.running), c.state is ChildState.READY))
            for child in live[:-delta]:
                child.state = ChildState.DRAINING
                child.recycle_reason = "shrink"
                self._dispatcher.take_back(child)
                if not child.running:
                    self._stop_child(child)
        self._wake()

    def running(self) -> list[Job]:
        with self._lock:
            for c in self._children.values():
                if c.offers:
                    self._dispatcher.settled(c)
            return [j for c in self._children.values() for j in c.running.values()]

    def interrupt(self, job: Job, exc_type: type[BaseException]) -> None:
        """Soft limits run in the child itself; a soft shutdown is SIGUSR2."""
        if exc_type is not WorkerShutdown:
            job.interrupted = True
            return
        with self._lock:
            child = job.slot
            if child is not None and job.seq in child.running:
                job.interrupted = True
                _signal_child(child, signal.SIGUSR2)

    def kill(self, job: Job, reason: str) -> bool:
        with self._lock:
            child = job.slot
            if child is None or job.seq not in child.running:
                return False
            self._dispatcher.take_back(child)   # claimed meanwhile: it joins the others below
            del child.running[job.seq]
            others = list(child.running.values())
            child.running.clear()
            child.state = ChildState.KILLED
            child.recycle_reason = reason
            _signal_child(child, signal.SIGKILL)
        for other in others:  # other coroutines of the same child die with it
            self._report(other, _crashed(other, "child killed while running another task"))
        self._wake()
        return True

    @property
    def error(self) -> str | None:
        """Why the pool asked the worker to stop (hard), if it did: children that cannot
        start, a dead zygote that cannot be replaced."""
        return self._error

    def info(self) -> dict[str, Any]:
        with self._lock:
            keeper = self._keeper
            return {"engine": "process", "start_method": self.start_method, "pool_state": self.state.value,
                    "zygote_pid": keeper.pid if keeper is not None else None,
                    "zygote_deaths": keeper.deaths if keeper is not None else 0,
                    "children": [c.info() for c in self._children.values()], "backlog": len(self._dispatcher.backlog),
                    "offers": self._dispatcher.offers, "offers_made": self._dispatcher.offers_made,
                    "offers_withdrawn": self._dispatcher.offers_withdrawn,
                    "child_replacements": self._replacements,
                    "child_replace_ms": (sorted(self._replace_ms)[len(self._replace_ms) // 2]
                                         if self._replace_ms else None)}

    # -- the pool thread ---------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def poll(self, timeout: float) -> bool:
        """One turn of the pool, on the Worker's main thread: hand out the backlog,
        sleep until a child writes (or ``submit`` wakes us), read every ring,
        collect exits.  Outcomes go to ``report`` synchronously."""
        if self.state is PoolState.STOPPED:
            return False
        if self._dispatcher.wanted:
            self._dispatch()
        self._poll_once(timeout)
        if self._dispatcher.wanted:
            self._dispatch()
        if self.max_memory is not None:
            self._check_memory()
        return True

    def _current_poll_set(self) -> "_PollSet":
        """The children to watch and one poller over their doorbells, the wake-up pipe and
        the exit sources (zygote socket, spawn sentinels); rebuilt only when a child comes or goes."""
        ps = self._poll_set
        if ps is not None and ps.version == self._children_version:
            return ps
        with self._lock:
            version = self._children_version
            children = [c for c in self._children.values() if c.state is not ChildState.DEAD]
            adopted = [c.pidfd for c in children if c.pid in self._adopted]
            zygote_fd = self._keeper.fileno() if self._keeper is not None else None
        fds = [self._wake_r] if self._wake_r >= 0 else []
        if zygote_fd is not None:
            fds.append(zygote_fd)
        fds += [c.process.sentinel for c in children if c.process is not None]
        fds += adopted
        poller = ChannelPoller([c.channel for c in children], fds, tags=children)
        ps = self._poll_set = _PollSet(version, children, poller)
        return ps

    def _poll_once(self, timeout: float) -> None:
        """Read every child with pending results; sleep on all doorbells only when none has any.

        Exits are looked at when the zygote's socket or a sentinel said so, and at least
        every EXIT_CHECK_INTERVAL while results keep flowing (then nobody sleeps in poll)."""
        ps = self._current_poll_set()
        ready, fired = ps.poller.wait(timeout)
        exit_hint = False
        for fd in fired:
            if fd == self._wake_r:
                _drain_pipe(fd)
            else:
                exit_hint = True
        for c in ready:
            self._read(c)
        now = time.monotonic()
        if exit_hint or now - self._last_exit_check >= EXIT_CHECK_INTERVAL:
            self._last_exit_check = now
            self._collect_exits(ps.children)
        if self._dispatcher.unannounced:   # before the outcomes read above reach the settle thread
            self._dispatcher.announce()

    def _read(self, child: ChildSlot) -> None:
        results = []
        for raw in child.channel.recv_many(1024):
            msg = decode_from_child(raw)
            kind = type(msg)
            if kind is Result:
                results.append(msg)
            elif kind is Ready:
                with self._lock:
                    if child.state is ChildState.STARTING:
                        child.state = ChildState.READY
                        self._dispatcher.wanted = True
                    child.ready_at = time.time()
                    self._startup_failures = 0
                    if child.forked_ns:
                        self._replace_ms.append((time.perf_counter_ns() - child.forked_ns) / 1e6)
                        child.forked_ns = 0
            elif kind is Heartbeat:
                self.hooks.heartbeat(msg.task_id)
            elif kind is Progress:
                self.hooks.progress(msg.task_id, msg.fraction, msg.data)
            elif kind is Enqueue:
                self._enqueue_for_child(msg)
            elif kind is Fatal:
                child.fatal = msg.message
                log.error("child %d could not start: %s", child.pid, msg.message)
        if results:
            self._on_results(child, results)

    def _on_results(self, child: ChildSlot, results: list[Result]) -> None:
        """Free the slots of ``results`` (one lock for the batch), then report them."""
        done = []
        with self._lock:
            if child.offers:
                self._dispatcher.settled(child)   # the child claims its next offer before it reports
            running = child.running
            for r in results:
                job = running.pop(r.seq, None)
                if job is not None:
                    done.append((job, r.outcome))
                if r.rss:
                    child.rss = r.rss
            child.tasks_done += len(results)
            self._dispatcher.wanted = True
            if child.state is ChildState.READY:
                if self.max_tasks is not None and child.tasks_done >= self.max_tasks:
                    self._recycle(child, "max-tasks")
                elif self.max_memory is not None and child.rss > self.max_memory:
                    self._recycle(child, "max-memory")
            elif child.state is ChildState.DRAINING and not running:
                self._stop_child(child)
        crashes = self._crashes
        report = self._report
        failures = self._enqueue_failures
        for job, outcome in done:
            if crashes:
                crashes.pop(job.envelope.id, None)
            if failures:
                failed = failures.pop(job.envelope.id, None)
                if failed is not None and outcome.kind != ERROR:
                    outcome = Outcome.failed(job.envelope.id, Reason.ENQUEUE_FAILED, failed, "EnqueueError",
                                             started_at=outcome.started_at, finished_at=outcome.finished_at)
            report(job, outcome)

    def _recycle(self, child: ChildSlot, reason: str) -> None:
        """Stop giving ``child`` work; it exits after its running tasks, a new child takes the slot now."""
        child.state = ChildState.DRAINING
        child.recycle_reason = reason
        self._dispatcher.take_back(child)
        if not child.running:
            self._stop_child(child)
        if self.state is PoolState.RUNNING:
            self._replace()

    def _replace(self) -> None:
        try:
            self._add_child()
            self._replacements += 1
        except WorkerError as exc:
            log.error("could not start a replacement child: %s", exc)
            self._error = str(exc)
            self.hooks.stop("hard")

    def _add_child(self) -> None:
        """Start a child now, or once the new zygote is ready (the first one died)."""
        if self._keeper is not None and not self._keeper.ready:
            with self._lock:
                self._owed += 1
            return
        try:
            self._spawn_child()
        except ZygoteGone:   # _collect_exits hears of it too, and starts a new one
            with self._lock:
                self._owed += 1

    def _collect_exits(self, children: list[ChildSlot]) -> None:
        exited: list[tuple[int, int | None]] = []
        status = None
        if self._keeper is not None:
            exited, status = self._keeper.events()
        for c in children:
            if c.process is not None and c.process.exitcode is not None and c.state is not ChildState.DEAD:
                exited.append((c.pid, c.process.exitcode))
        if self._adopted:
            with self._lock:
                adopted = {c.pidfd: c.pid for c in self._adopted.values()}
            exited += [(adopted[fd], None) for fd in exited_pidfds(list(adopted))]
        for pid, code in exited:
            self._on_exit(pid, code)
        if status == "gone":
            self._zygote_gone()
        elif status == "ready":
            self._zygote_ready()
        elif status == "late":
            reason = self._keeper.late()
            with self._lock:
                self._children_version += 1   # stop polling its socket
            self._give_up(reason)

    # -- when the zygote dies (why this way: stem.worker.zygote) -------------------------------
    def _zygote_gone(self) -> None:
        """Keep the dead zygote's children (their pidfds tell their exits from now on) and
        start a new zygote for the next ones; or, when that cannot work, stop the worker."""
        with self._lock:
            live = [c for c in self._children.values() if c.state is not ChildState.DEAD and c.process is None]
            blind = [c for c in live if c.pidfd is None]
            self._adopted.update((c.pid, c) for c in live if c.pidfd is not None)
            self._children_version += 1
        for c in blind:   # no pidfd to see their exits by: kill them while they are known alive
            with self._lock:
                _signal_child(c, signal.SIGKILL)
            self._on_exit(c.pid, -signal.SIGKILL)
        stopping = self.state not in (PoolState.STARTING, PoolState.RUNNING) or self._error is not None
        try:
            pid, code = self._keeper.bury()
            if stopping:
                log.warning("the zygote process (pid %s) exited (code %s) while the worker stops", pid, code)
                return
            if blind:
                raise WorkerError(f"the zygote process (pid {pid}) died (exit code {code}); without pidfds "
                                  f"(Linux 5.3+) its children cannot be watched, so {len(blind)} were killed")
            zygote = self._keeper.succeed()
        except WorkerError as exc:
            if not stopping:
                self._give_up(str(exc))
            return
        log.error("the zygote process (pid %s) died (exit code %s); its %d children keep running, "
                  "a new zygote (pid %s) starts the next ones", pid, code, len(live) - len(blind), zygote.pid)
        with self._lock:
            self._children_version += 1   # poll the new zygote's socket

    def _zygote_ready(self) -> None:
        with self._lock:
            owed, self._owed = self._owed, 0
        log.info("the new zygote process (pid %s) is ready; starting %d children", self._keeper.pid, owed)
        if self.state in (PoolState.STARTING, PoolState.RUNNING):
            for _ in range(owed):
                self._replace()

    def _give_up(self, reason: str) -> None:
        """Stop the worker (hard: running tasks are killed and requeued) with ``reason``."""
        self._error = reason
        log.error("%s; stopping the worker", reason)
        self.hooks.stop("hard")

    def _on_exit(self, pid: int, code: int | None) -> None:
        """``code`` None: unknown (an orphan of a dead zygote)."""
        with self._lock:
            child = self._children.get(pid)
            if child is None or child.state is ChildState.DEAD:
                return
            previous = child.state
            self._dispatcher.take_back(child)   # unclaimed: it never ran; claimed: running below
            child.state = ChildState.DEAD
            del self._children[pid]
            self._adopted.pop(pid, None)
            self._children_version += 1
        self._drain_late_results(child)   # what it finished before dying is not an orphan
        with self._lock:
            orphans = list(child.running.values())
            child.running.clear()
            _close_pidfd(child)
        child.channel.close()
        # an exit code lost with the zygote: a child that held no task exited when asked, if asked
        stopped = code == ChildExit.OK or (code is None and not orphans)
        if previous is ChildState.KILLED:
            reason = child.recycle_reason or "killed"
        elif previous is ChildState.DRAINING and stopped:
            reason = child.recycle_reason or "recycled"
        elif self.state is not PoolState.RUNNING and stopped:
            reason = "shutdown"
        elif code == ChildExit.STARTUP_FAILED or previous is ChildState.STARTING:
            reason = "startup-failed"
        else:
            reason = "crash"
        if reason != "shutdown":
            log.log(logging.WARNING if reason in ("crash", "startup-failed") else logging.INFO,
                    "child %d exited (%s, code %s)", pid, reason,
                    "unknown: its zygote died" if code is None else code)
        signals.worker_child_shutdown.send(self.hooks.sender, worker=self.hooks.sender, pid=pid, reason=reason,
                                           exitcode=code)
        for job in orphans:
            self._report(job, self._crash_outcome(job, code))
        if self.state is not PoolState.RUNNING:
            if reason == "startup-failed":
                self._error = child.fatal or f"child exited with code {code} before it was ready"
            return
        if reason == "startup-failed":
            self._startup_failures += 1
            if self._startup_failures >= MAX_STARTUP_FAILURES:
                self._error = child.fatal or f"children keep failing to start (exit code {code})"
                log.error("children keep failing to start; stopping the worker: %s", self._error)
                self.hooks.stop("hard")
                return
        if previous is not ChildState.DRAINING and self._error is None:
            self._replace()   # (a drained child was replaced when it was recycled)

    def _drain_late_results(self, child: ChildSlot) -> None:
        """Results the child wrote before dying still count (a child reports a task after
        it claimed its next offer, which may be what kills it)."""
        try:
            if child.channel.pending_bytes():
                self._read(child)
        except Exception:  # noqa: BLE001 - a torn segment: the orphans are reported as crashed
            pass

    def _crash_outcome(self, job: Job, code: int) -> Outcome:
        task_id = job.envelope.id
        crashes = self._crashes.get(task_id, 0) + 1
        self._crashes[task_id] = crashes
        if len(self._crashes) > 10_000:
            self._crashes.pop(next(iter(self._crashes)))
        if crashes >= self.max_crash_redeliveries:
            return _crashed(job, f"crashed its child {crashes} times ({_exit_text(code)}); dead-lettered as poison",
                            reason=Reason.POISON)
        return _crashed(job, f"the child running it died ({_exit_text(code)})")

    def _enqueue_for_child(self, msg: Enqueue) -> None:
        """Publish a task a running task enqueued (``ctx.enqueue``).  The child got its id
        at once; if it cannot be published, the task that asked fails (its Result follows
        this message on the same ring, ``_on_results``): never an id for nothing."""
        new_id, name, args, opts, parent_id, root_id = (msg.new_id, msg.name, msg.args, msg.options,
                                                        msg.parent_id, msg.root_id)
        try:
            options = TaskOptions(**opts) if opts else None
            parent = SimpleNamespace(id=parent_id, root_id=root_id or parent_id)
            self.hooks.enqueue(name, args, options, new_id, parent)
        except Exception as exc:  # noqa: BLE001 - any failure fails the parent, with the reason
            log.error("could not enqueue child task %s (%s) for task %s: %s", new_id, name, parent_id, exc)
            self._enqueue_failures[parent_id] = (f"its child task {name!r} ({new_id}) could not be enqueued: "
                                                 f"{type(exc).__name__}: {exc}")

    # -- dispatch -------------------------------------------------------------------------
    def _dispatch(self) -> None:
        with self._lock:
            if self.state is not PoolState.RUNNING:
                return
            started = self._dispatcher.dispatch(self._children.values())
            expired = self._dispatcher.take_expired() if self._dispatcher.expired else None
        if expired:
            for job in expired:   # never sent to a child: they end REVOKED, expired
                self._report(job, Outcome.expired(job.envelope.id, job.envelope.expires_at))
        if started and signals.task_prerun.receivers:
            for job in started:
                signals.task_prerun.send(self.hooks.sender, envelope=job.envelope, context=None)

    def _stop_child(self, child: ChildSlot) -> None:
        try:
            child.channel.send(_STOP)
        except Exception:  # noqa: BLE001 - a closed channel: the child is gone anyway
            pass

    def _check_memory(self) -> None:
        if self.max_memory is None:
            return
        now = time.monotonic()
        with self._lock:
            busy = [c for c in self._children.values() if c.state is ChildState.READY and c.running
                    and now - c.last_memory_check >= MEMORY_CHECK_INTERVAL]
        if not busy:
            return
        import psutil
        for c in busy:
            c.last_memory_check = now
            try:
                c.rss = psutil.Process(c.pid).memory_info().rss
            except psutil.Error:
                continue
            if c.rss > self.max_memory:
                with self._lock:
                    if c.state is ChildState.READY:
                        log.info("child %d is over max_memory_per_child mid-task (%d bytes); recycling after it",
                                 c.pid, c.rss)
                        self._recycle(c, "max-memory")


class _PollSet(NamedTuple):
    version: int                 # ProcessEngine._children_version it was built from
    children: list[ChildSlot]
    poller: ChannelPoller        # their channels (tagged with the child), wake pipe, exit sources


def _exit_text(code: int | None) -> str:
    """A child's exit as words; None: an orphan of a dead zygote, whose exit code nobody saw."""
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def _crashed(job: Job, message: str, reason: str = Reason.CHILD_CRASHED) -> Outcome:
    return Outcome.failed(job.envelope.id, reason, message, "ChildCrashed", started_at=job.started_at)


_rss_samples: dict[int, tuple[float, int]] = {}


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` (0 if gone), for reports when no memory limit measures it;
    sampled at most once per MEMORY_CHECK_INTERVAL, so polling ``stats()`` stays cheap."""
    now = time.monotonic()
    sample = _rss_samples.get(pid)
    if sample is not None and now - sample[0] < MEMORY_CHECK_INTERVAL:
        return sample[1]
    import psutil
    try:
        rss = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        rss = 0
    if len(_rss_samples) > 1024:
        _rss_samples.clear()
    _rss_samples[pid] = (now, rss)
    return rss


def _drain_pipe(fd: int) -> None:
    """One read: more than 4 KiB of wake-ups left over just make the next poll return."""
    try:
        os.read(fd, 4096)
    except OSError:
        pass


def _signal_child(child: ChildSlot, sig: int) -> None:
    """Under the pool's lock (which guards ``child.pidfd``): signal that very process, through
    its pidfd when it has one (once reaped, its pid may name another process)."""
    if child.pidfd is not None:
        signal_pidfd(child.pidfd, sig)
    elif child.state is not ChildState.DEAD:
        try:
            os.kill(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _close_pidfd(child: ChildSlot) -> None:
    """Under the pool's lock."""
    if child.pidfd is not None:
        try:
            os.close(child.pidfd)
        except OSError:
            pass
        child.pidfd = None
