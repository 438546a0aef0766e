"""``Worker``: consume, dispatch to an engine, settle (store result, then ack).

Threads: a *fetcher* leases deliveries (never more than ``concurrency`` times
the prefetch window unsettled: ``stem.worker.window``), verifies and decodes
them and hands jobs to the engine; the *main loop* turns the engine, renews leases, enforces time
limits and publishes heartbeats; outcomes are settled in batches (results
stored, then acked; retries and dead letters) by a *settle thread* with the
process engine, else on the main loop.  When the fetcher waits for room that a
settle batch frees, that settle round trip leases the refill too where the
backend (or, without results, the broker) can: Redis, one pipeline; the
fetcher then does not wake for it (see ``stem.worker.fetch``).  The engine
runs the handlers (threads or child processes).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any, Sequence

from ..backends import ResultBackend
from ..backends import from_url as backend_from_url
from ..brokers import Broker
from ..brokers import from_url as broker_from_url
from ..errors import ConfigurationError, SoftTimeLimitExceeded, StemError, WorkerError, WorkerShutdown
from ..results import TaskState
from ..retry import ExponentialJitterRetryStrategy, RetryStrategy
from ..signals import signals
from ..task import TaskContext, TaskRegistry, load_registry
from ..brokers.base import validate_queue_name
from .engine import Engine, Job
from .fetch import FETCH_BLOCK_SECONDS, Fetcher
from .execution import ERROR, Outcome
from .lifecycle import ShutdownMode, WorkerLifecycleConfig, install_signal_handlers
from .outbox import MAX_BATCH, Outbox
from .progress import STARTED_AFTER, StatusBoard
from .settle import Settler
from .window import DEFAULT_MAX_MULTIPLIER, PrefetchWindow

__all__ = ["Worker"]

log = logging.getLogger("stem.worker")

# A heartbeat outlives a few missed beats even when the interval is short (busy machines).
HEARTBEAT_MIN_TTL = 5.0


class _Runtime:
    """What a running task's ``ctx`` calls back into (inline engine: same process)."""

    def __init__(self, worker: "Worker"):
        self.worker = worker

    def heartbeat(self, task_id: str) -> None:
        self.worker._heartbeat_requests.put(task_id)

    def progress(self, task_id: str, fraction: float, data: Any) -> None:
        self.worker._progress(task_id, fraction, data)

    def enqueue(self, name, args, options, parent) -> str:
        return self.worker._producer().enqueue(name, args, options=options, parent=parent)


class Worker:
    """Runs registered tasks from ``queues`` (see DESIGN.md, "Worker engine")."""

    def __init__(self, broker: Broker | str, backend: ResultBackend | str | None = None,
                 registry: TaskRegistry | None = None, queues: Sequence[str] | None = None,
                 concurrency: int | None = None, prefetch_multiplier: int = 4, signer: Any = None,
                 retry_strategy: RetryStrategy | None = None, lifecycle: WorkerLifecycleConfig | None = None,
                 *, isolation: str = "process", heartbeat_interval: float = 10.0, worker_id: str | None = None,
                 store_results: bool = True, max_crash_redeliveries: int = 3, start_method: str | None = None,
                 child_concurrency: int = 1, engine: Engine | None = None, control: bool = True,
                 yield_cpu: bool = True, max_prefetch_multiplier: int | None = None):
        self.registry_ref = registry if isinstance(registry, str) else None
        if isinstance(registry, str):
            registry = load_registry(registry)
        if registry is None or not isinstance(registry, TaskRegistry):
            raise ConfigurationError(f"Worker needs a TaskRegistry (or its 'module:attribute' path), got {registry!r}")
        self.broker = broker_from_url(broker) if isinstance(broker, str) else broker
        if not isinstance(self.broker, Broker):
            raise ConfigurationError(f"broker must be a Broker or a URL, got {broker!r}")
        self.backend = backend_from_url(backend) if isinstance(backend, str) else backend
        if self.backend is not None and not isinstance(self.backend, ResultBackend):
            raise ConfigurationError(f"backend must be a ResultBackend, a URL or None, got {backend!r}")
        self.registry = registry
        self.queues = [validate_queue_name(q) for q in (queues or ["default"])]
        if not self.queues:
            raise ConfigurationError("Worker needs at least one queue")
        concurrency = (os.cpu_count() or 1) if concurrency is None else concurrency
        for name, value in (("concurrency", concurrency), ("prefetch_multiplier", prefetch_multiplier),
                            ("child_concurrency", child_concurrency),
                            ("max_crash_redeliveries", max_crash_redeliveries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
        if max_prefetch_multiplier is None:
            max_prefetch_multiplier = max(DEFAULT_MAX_MULTIPLIER, prefetch_multiplier)
        elif (isinstance(max_prefetch_multiplier, bool) or not isinstance(max_prefetch_multiplier, int)
              or max_prefetch_multiplier < prefetch_multiplier):
            raise ConfigurationError(f"max_prefetch_multiplier must be an integer >= prefetch_multiplier "
                                     f"({prefetch_multiplier}), got {max_prefetch_multiplier!r}")
        if not heartbeat_interval > 0:
            raise ConfigurationError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval!r}")
        if retry_strategy is not None and not isinstance(retry_strategy, RetryStrategy):
            raise ConfigurationError(f"retry_strategy must be a RetryStrategy, got {retry_strategy!r}")
        if lifecycle is not None and not isinstance(lifecycle, WorkerLifecycleConfig):
            raise ConfigurationError(f"lifecycle must be a WorkerLifecycleConfig, got {lifecycle!r}")
        if not isinstance(yield_cpu, bool):
            raise ConfigurationError(f"yield_cpu must be True or False, got {yield_cpu!r}")
        if isolation not in ("inline", "process"):
            raise ConfigurationError(f"isolation must be 'process' or 'inline', got {isolation!r}")
        self.concurrency = concurrency
        self._window = PrefetchWindow(prefetch_multiplier, max_prefetch_multiplier)
        self.prefetch_limit = 0
        self._set_prefetch_limit()   # and _refill_at
        self.signer = signer
        self.retry_strategy = retry_strategy or ExponentialJitterRetryStrategy(base=0.5, max=60.0)
        self.lifecycle = lifecycle or WorkerLifecycleConfig()
        self.isolation = isolation
        self.heartbeat_interval = float(heartbeat_interval)
        self.hostname = socket.gethostname()
        self.id = worker_id or f"{self.hostname}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.store_results = store_results and self.backend is not None
        self.max_crash_redeliveries = max_crash_redeliveries
        self.start_method = start_method
        self.child_concurrency = child_concurrency
        # the process pool's thread runs under SCHED_BATCH (stem.worker.sched): more throughput on
        # busy machines, 1.5-2.5 ms more latency at p90 when the children keep every CPU busy
        self.yield_cpu = yield_cpu
        self.control_enabled = control
        self._engine = engine or self._make_engine()

        self._done: queue.SimpleQueue = queue.SimpleQueue()   # outcomes, when the main loop settles
        self._outbox: Outbox | None = None                      # outcomes, when a settle thread does
        self._heartbeat_requests: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._jobs: dict[int, Job] = {}          # every unsettled delivery this worker holds
        self._seq = 0
        self._stop_mode: ShutdownMode | None = None
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._started = threading.Event()
        self._burst = False
        self._paused: set[str] = set()
        self._control = None
        self._combined_settle = self.store_results
        self._settle_thread: threading.Thread | None = None
        self._settle_stop = threading.Event()
        self._revoked: set[str] = set()
        self._thread: threading.Thread | None = None
        self._fetch_thread: threading.Thread | None = None
        self._started_at = time.time()
        self._counters = dict(received=0, processed=0, succeeded=0, failed=0, retried=0, revoked=0,
                              dead_lettered=0, broker_reconnects=0)
        self._stem = None
        self._error: BaseException | None = None
        self._runtime = _Runtime(self)
        self._board = StatusBoard(self.backend, self.id) if self.store_results else None
        self._settler = Settler(self)
        self._fetcher = Fetcher(self)

    # -- engine -------------------------------------------------------------------
    def _make_engine(self) -> Engine:
        if self.isolation == "inline":
            from .inline import InlineEngine
            return InlineEngine(self.concurrency, self._context, worker_id=self.id)
        from .process_engine import ProcessEngine
        return ProcessEngine(self)

    def _context(self, job: Job) -> TaskContext:
        env = job.envelope
        return TaskContext(env.id, env.name, env.attempt, env.meta, env.headers, env.queue, env.max_retries,
                           env.root_id, self._runtime)

    def _producer(self):
        if self._stem is None:
            from ..producer import Stem
            self._stem = Stem(self.broker, self.backend, self.registry, self.signer)
        return self._stem

    # -- running --------------------------------------------------------------------
    def start(self, *, burst: bool = False) -> None:
        """Run until shut down (or, with ``burst``, until the queues are empty)."""
        restore = None
        if self.lifecycle.install_signal_handlers and threading.current_thread() is threading.main_thread():
            restore = install_signal_handlers(self.shutdown_nowait)
        try:
            self._run(burst)
        finally:
            if restore is not None:
                restore()

    def run_in_background(self, *, burst: bool = False) -> "Worker":
        """Start in a daemon thread (for embedding and tests); returns once ready."""
        if self._thread is not None:
            raise ConfigurationError("this worker was already started")
        self._thread = threading.Thread(target=self._run_guarded, args=(burst,), name=f"stem-worker-{self.id}",
                                        daemon=True)
        self._thread.start()
        while not self._started.wait(0.05):
            if self._stopped.is_set():
                break
        if self._error is not None:
            raise self._error
        return self

    def _run_guarded(self, burst: bool) -> None:
        try:
            self._run(burst)
        except BaseException as exc:  # surfaced by run_in_background / join
            self._error = exc
            log.exception("worker %s crashed", self.id)
            self._started.set()
            self._stopped.set()

    @property
    def error(self) -> BaseException | None:
        """What stopped a worker run in the background other than a shutdown request (the
        engine giving up, a crash); ``start()`` raises it instead."""
        return self._error

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to stop; True if it did."""
        stopped = self._stopped.wait(timeout)
        if self._thread is not None and stopped:
            self._thread.join(timeout)
        return stopped

    def shutdown_nowait(self, mode: ShutdownMode | str = ShutdownMode.WARM) -> None:
        mode = ShutdownMode(mode)
        with self._lock:
            if self._stop_mode is None or mode.rank > self._stop_mode.rank:
                self._stop_mode = mode
            self._lock.notify_all()
        self._stop_requested.set()

    def shutdown(self, mode: ShutdownMode | str = ShutdownMode.WARM, *, wait: bool = True,
                 timeout: float | None = None) -> bool:
        """Stop the worker (see ``ShutdownMode``).  Returns True once stopped (when waiting)."""
        self.shutdown_nowait(mode)
        if not wait or not self._started.is_set():
            return self._stopped.is_set() or not self._started.is_set()
        if timeout is None:
            timeout = self.lifecycle.soft_grace_period + self.lifecycle.force_shutdown_after + 5.0
        return self.join(timeout)

    def pause(self, queue_name: str) -> None:
        """Stop fetching from ``queue_name``; returns once no fetch still includes it."""
        with self._lock:
            self._paused.add(queue_name)
            fetcher = self._fetcher
            generation = fetcher.generation
            self._lock.wait_for(lambda: not fetcher.consuming or fetcher.generation > generation
                                or self._stop_requested.is_set(), timeout=FETCH_BLOCK_SECONDS * 4 + 1.0)

    def resume(self, queue_name: str) -> None:
        with self._lock:
            self._paused.discard(queue_name)
            self._lock.notify_all()

    def revoke_local(self, task_ids: Sequence[str]) -> None:
        with self._lock:
            self._revoked.update(task_ids)

    def _run(self, burst: bool) -> None:
        self._burst = burst
        self._started_at = time.time()
        signals.worker_init.send(self, worker=self)
        self._engine.start(self._report)
        if self.backend is not None and self.control_enabled:
            from ..control import ControlServer
            self._control = ControlServer(self)
            self._control.start()
        self._publish_heartbeat()  # visible (and controllable) before the first task runs
        self._fetch_thread = threading.Thread(target=self._fetcher.run, name="stem-fetcher", daemon=True)
        self._fetch_thread.start()
        self._started.set()
        signals.worker_ready.send(self, worker=self)
        if log.isEnabledFor(logging.INFO):
            from .. import __version__
            from ..redact import mask_url
            names = self.registry.names()
            log.info("stem %s worker %s ready: broker=%s backend=%s queues=%s concurrency=%d engine=%s "
                     "tasks (%d): %s", __version__, self.id, mask_url(self.broker.url or type(self.broker).__name__),
                     mask_url(self.backend.url or type(self.backend).__name__) if self.store_results else "none",
                     ",".join(self.queues), self.concurrency, self.isolation, len(names),
                     ", ".join(names[:50]) + (" ..." if len(names) > 50 else ""))
        try:
            self._main_loop()
        finally:
            self._stopped.set()
            signals.worker_shutdown.send(self, worker=self)
            log.info("worker %s stopped", self.id)
        error = getattr(self._engine, "error", None)
        if error:   # the engine gave up (children or zygotes keep dying): not a clean stop
            raise WorkerError(f"worker {self.id} stopped: {error}")

    def _report(self, job: Job, outcome: Outcome) -> None:
        outbox = self._outbox
        if outbox is not None:
            outbox.put((job, outcome))   # the main loop hands them to the settle thread in batches
        else:
            self._done.put((job, outcome))

    def _flush_outbox(self, now: float, force: bool = False) -> float:
        jobs = len(self._jobs)
        room = self.prefetch_limit - jobs if self._fetcher.waiting else None
        return self._outbox.flush(now, unsettled=jobs, refill_at=self._refill_at, room=room, force=force)

    def _main_loop(self) -> None:
        last_housekeeping = 0.0
        last_heartbeat = time.monotonic()
        stop_started: float | None = None
        hard_started: float | None = None
        settle_thread = None
        if self._engine.poll(0.0):
            # The engine turns on this thread; settling (a broker round trip) gets its own, so
            # finished children get their next task while results are being stored, and
            # outcomes pile up into bigger batches while one settle is in flight.
            self._outbox = Outbox()
            while not self._done.empty():
                self._outbox.put(self._done.get_nowait())
            settle_thread = threading.Thread(target=self._settle_loop, name="stem-settle", daemon=True)
            settle_thread.start()
        self._settle_thread = settle_thread
        wait = 0.05
        while True:
            if settle_thread is not None:
                self._engine.poll(wait)
                wait = self._flush_outbox(time.monotonic(), self._stop_requested.is_set())
            else:
                batch = self._drain_done(0.05)
                if batch:
                    self._settler.settle(batch)
            now = time.monotonic()
            if now - last_housekeeping >= 0.1:
                last_housekeeping = now
                self._enforce_time_limits(now)
                self._renew_leases(now)
                self._note_long_running()
                self._engine.tick()
            if settle_thread is None and self._board is not None:
                self._board.flush(now)
            if now - last_heartbeat >= self.heartbeat_interval:
                last_heartbeat = now
                self._publish_heartbeat()
            if self._stop_requested.is_set():
                mode = self._stop_mode or ShutdownMode.WARM
                if stop_started is None:
                    stop_started = now
                    self._begin_shutdown(mode)
                if mode is ShutdownMode.HARD or now - stop_started >= self.lifecycle.soft_grace_period:
                    if hard_started is None:
                        hard_started = now
                        self._hard_stop()
                if self._settled_all() or (hard_started is not None and
                                           now - hard_started >= self.lifecycle.force_shutdown_after):
                    break
                if mode is ShutdownMode.SOFT and not getattr(self, "_soft_sent", False):
                    self._soft_sent = True
                    for job in self._engine.running():
                        self._engine.interrupt(job, WorkerShutdown)
        self._finish_shutdown()

    def _settle_loop(self) -> None:
        outbox = self._outbox
        board = self._board
        while True:
            batch = outbox.get(0.05)
            if board is not None:
                board.flush(time.monotonic())
            if batch:
                try:
                    self._settler.settle(batch)
                except Exception:  # noqa: BLE001 - never lose the settle thread; leases bring tasks back
                    log.exception("settling %d outcomes failed", len(batch))
            elif self._settle_stop.is_set():
                if outbox.empty():
                    return
                outbox.flush(time.monotonic(), unsettled=0, refill_at=1, force=True)   # late reports

    def _drain_done(self, timeout: float) -> list[tuple[Job, Outcome]]:
        try:
            first = self._done.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        get = self._done.get_nowait
        try:
            while len(batch) < MAX_BATCH:
                batch.append(get())
        except queue.Empty:
            pass
        return batch

    def _forget(self, jobs: list[Job], wake: bool = True) -> None:
        if self._board is not None:
            self._board.forget([j.envelope.id for j in jobs])
        with self._lock:
            for j in jobs:
                j.settled = True
                self._jobs.pop(j.seq, None)
            # Wake a waiting fetcher only once a batch worth of room is free: waking another
            # thread of this process for every settled task costs more than the task.
            if wake and self._fetcher.waiting and self.prefetch_limit - len(self._jobs) >= self._refill_at:
                self._lock.notify_all()

    def _enforce_time_limits(self, now: float) -> None:
        for job in self._engine.running():
            if job.hard_deadline is not None and now >= job.hard_deadline and not job.settled:
                log.warning("task %s passed its hard time limit; killing it", job.envelope.id)
                self._engine.kill(job, "hard-time-limit")
                limit = job.envelope.hard_time_limit
                self._report(job, Outcome(job.envelope.id, ERROR, None,
                                          f"hard time limit of {limit}s exceeded", "TimeLimitExceeded", None,
                                          "hard-time-limit", None, job.started_at or time.time(), time.time()))
                job.hard_deadline = None
            elif job.soft_deadline is not None and now >= job.soft_deadline and not job.interrupted:
                self._engine.interrupt(job, SoftTimeLimitExceeded)

    def _renew_leases(self, now: float) -> None:
        urgent = set()
        try:
            while True:
                urgent.add(self._heartbeat_requests.get_nowait())
        except queue.Empty:
            pass
        with self._lock:
            due = [j for j in self._jobs.values()
                   if j.envelope.id in urgent or now - j.extended_at >= j.delivery.visibility_timeout / 3.0]
        if not due:
            return
        for j in due:
            j.extended_at = now
        try:
            self.broker.extend([j.delivery for j in due])
        except StemError as exc:
            log.warning("could not renew %d leases (%s)", len(due), exc)

    def _progress(self, task_id: str, fraction: float, data: Any) -> None:
        """``ctx.progress()``: renew the lease now, note the status for the next flush."""
        self._heartbeat_requests.put(task_id)
        if self._board is None:
            return
        with self._lock:
            job = next((j for j in self._jobs.values() if j.envelope.id == task_id), None)
        if job is not None:
            self._board.progress(job.envelope, job.started_at, fraction, data)

    def _note_long_running(self) -> None:
        """Tasks running for STARTED_AFTER seconds get a RUNNING status (short ones none)."""
        if self._board is None:
            return
        started_before = time.time() - STARTED_AFTER
        for job in self._engine.running():
            if not job.noted_running and job.started_at is not None and job.started_at <= started_before:
                job.noted_running = True
                self._board.started(job.envelope, job.started_at)

    def _publish_heartbeat(self) -> None:
        data = self.stats()
        if self.backend is not None:
            try:
                self.backend.put_heartbeat(self.id, data, ttl=max(self.heartbeat_interval * 3, HEARTBEAT_MIN_TTL))
            except StemError as exc:
                log.warning("could not publish heartbeat (%s)", exc)
        if signals.worker_heartbeat.receivers:
            signals.worker_heartbeat.send(self, worker=self, heartbeat=data)

    def stats(self) -> dict[str, Any]:
        """A snapshot: the same data the heartbeat carries."""
        with self._lock:
            in_flight = len(self._jobs)
        running = self._engine.running()
        return {
            "id": self.id, "host": self.hostname, "pid": os.getpid(), "queues": list(self.queues),
            "concurrency": self.concurrency, "prefetch_limit": self.prefetch_limit, "isolation": self.isolation,
            "in_flight": in_flight, "running": len(running), "paused": sorted(self._paused),
            "heartbeat_interval": self.heartbeat_interval,
            **self._counters, "uptime": time.time() - self._started_at, **self._engine.info(),
        }

    def inspect(self) -> dict[str, Any]:
        """Running and reserved tasks (for the control plane)."""
        running = {j.seq: j for j in self._engine.running()}
        with self._lock:
            jobs = list(self._jobs.values())
        def row(j: Job) -> dict[str, Any]:
            return {"id": j.envelope.id, "name": j.envelope.name, "queue": j.envelope.queue,
                    "attempt": j.envelope.attempt, "started_at": j.started_at,
                    "pid": getattr(j.slot, "pid", None)}
        return {"running": [row(j) for j in jobs if j.seq in running],
                "reserved": [row(j) for j in jobs if j.seq not in running],
                "revoked": sorted(self._revoked)}

    # -- control plane ----------------------------------------------------------------
    def control(self, command: str, args: dict[str, Any]) -> Any:
        """Serve one control command (called by the control thread): the handlers are the
        table ``stem.control.WORKER_COMMANDS``."""
        from ..control import serve_command
        return serve_command(self, command, args)

    @property
    def paused_queues(self) -> list[str]:
        """The queues ``pause`` stopped on this worker, sorted."""
        with self._lock:
            return sorted(self._paused)

    def revoke(self, task_ids: Sequence[str], *, terminate: bool = False) -> dict[str, Any]:
        """Skip these tasks here: reserved ones at once, running ones too with ``terminate``."""
        ids = set(task_ids)
        self.revoke_local(ids)
        reserved = self._engine.take_backlog(lambda job: job.envelope.id in ids)
        for job in reserved:
            self._settler.finish_unrun(job.delivery, job.envelope, TaskState.REVOKED, "revoked")
        self._forget(reserved)
        terminated = []
        if terminate:
            for job in self._engine.running():
                if job.envelope.id in ids:
                    self._engine.kill(job, "revoked")
                    terminated.append(job.envelope.id)
                    self._report(job, Outcome(job.envelope.id, ERROR, None, "revoked while running (terminated)",
                                              "Revoked", None, "revoked", None, job.started_at or time.time(),
                                              time.time()))
        return {"revoked": sorted(ids), "reserved_dropped": [j.envelope.id for j in reserved],
                "terminated": terminated}

    def resize(self, delta: int) -> int:
        """Grow or shrink the pool by ``delta`` slots (never below 1); returns the new concurrency."""
        with self._lock:
            new = max(1, self.concurrency + delta)
            delta = new - self.concurrency
            if delta:
                self._engine.resize(delta)
                self.concurrency = new
                self._set_prefetch_limit()
                self._lock.notify_all()   # also for a narrower window: the engine's slots changed
            return self.concurrency

    @property
    def prefetch_multiplier(self) -> int:
        """The fewest tasks per child the prefetch window holds (its floor)."""
        return self._window.floor

    @property
    def max_prefetch_multiplier(self) -> int:
        """The most tasks per child the prefetch window widens to (its cap)."""
        return self._window.cap

    def _observe_run_times(self, batch: list[tuple[Job, Outcome]]) -> None:
        """Before settling ``batch``: let the prefetch window follow its run times (a wider
        window wakes the fetcher; a narrower one only makes it wait longer)."""
        if self._window.observe(batch):
            with self._lock:
                if self._set_prefetch_limit():
                    self._lock.notify_all()

    def _set_prefetch_limit(self) -> bool:
        """Under the lock: the window for the current concurrency, and the free slots at which
        the fetcher refills (half of it; at once when nothing is held).  True when it grew."""
        limit = self.concurrency * self._window.per_child
        wider = limit > self.prefetch_limit
        self.prefetch_limit = limit
        self._refill_at = max(1, limit // 2)
        return wider

    # -- shutdown -------------------------------------------------------------------
    def _begin_shutdown(self, mode: ShutdownMode) -> None:
        signals.worker_stopping.send(self, worker=self, mode=mode)
        log.info("worker %s: %s shutdown", self.id, mode.value)
        with self._lock:
            self._lock.notify_all()
        if self._fetch_thread is not None:
            self._fetch_thread.join(5.0)
        with self._lock:   # a refill started before the stop: its deliveries join the backlog first
            self._lock.wait_for(lambda: not self._fetcher.refilling, timeout=5.0)
        self._requeue(self._engine.take_backlog())

    def _requeue(self, jobs: list[Job]) -> None:
        for job in jobs:
            if not job.settled:
                self._settler.broker_call(self.broker.nack, job.delivery, requeue=True)
        self._forget(jobs)

    def _hard_stop(self) -> None:
        log.warning("worker %s: hard shutdown, requeueing %d in-flight deliveries", self.id, len(self._jobs))
        self._requeue(self._engine.take_backlog())
        running = self._engine.running()
        for job in running:
            self._engine.kill(job, "shutdown")
        self._requeue(running)

    def _settled_all(self) -> bool:
        if self._settle_thread is not None:
            with self._lock:
                return not self._jobs
        batch = self._drain_done(0.0)
        if batch:
            self._settler.settle(batch)
        with self._lock:
            return not self._jobs

    def _finish_shutdown(self) -> None:
        if self._control is not None:
            self._control.stop()
        if self._settle_thread is not None:
            self._flush_outbox(time.monotonic(), force=True)
            self._settle_stop.set()
            self._settle_thread.join(self.lifecycle.force_shutdown_after)
        self._engine.stop(self.lifecycle.force_shutdown_after)
        if self.backend is not None:
            try:
                self.backend.remove_heartbeat(self.id)
            except StemError:
                pass

    def __repr__(self) -> str:
        return f"<Worker {self.id} queues={self.queues} concurrency={self.concurrency}>"
