"""``Worker``: the composition of the worker's parts, its main loop and its public API.

The parts (``docs/design.md``, "The worker"): the shared state
(``stem.worker.state``), the fetcher thread (``fetch``), the settler
(``settle``; on a thread of its own with the process engine), the engine
that runs handlers (``process_engine``: child processes; ``inline``:
threads), the running-status board (``progress``) and the control server
(``stem.control``).  Each receives what it uses; none holds the Worker.

The main loop (the thread that calls ``start``) turns the process engine,
hands outcomes to the settle thread in batches (``outbox``), and does the
housekeeping: time limits, lease renewals, RUNNING notes, heartbeats,
autoscaling (``autoscale``), and the shutdown sequence (``lifecycle``).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any, Callable, Sequence

from .. import _checks as checks
from ..backends import ResultBackend
from ..backends import from_url as backend_from_url
from ..brokers import Broker
from ..brokers import from_url as broker_from_url
from ..errors import ConfigurationError, SoftTimeLimitExceeded, StemError, WorkerError, WorkerShutdown
from ..results import Reason, TaskState
from ..retry import ExponentialJitterRetryStrategy, RetryStrategy
from ..signals import signals
from ..task import TaskContext, TaskOptions, TaskRegistry, load_registry
from .engine import Engine, EngineHooks, Job
from .execution import Outcome
from .fetch import FETCH_BLOCK_SECONDS, Fetcher
from .autoscale import Autoscaler, WorkerAutoscaleConfig, autoscale_config
from .lifecycle import ShutdownMode, WorkerLifecycleConfig, install_signal_handlers
from .outbox import MAX_BATCH, Outbox
from .progress import STARTED_AFTER, StatusBoard
from .settle import Settler
from .state import WorkerState
from .window import DEFAULT_MAX_MULTIPLIER, PrefetchWindow

__all__ = ["Worker"]

log = logging.getLogger("stem.worker")

# A heartbeat outlives a few missed beats even when the interval is short (busy machines).
HEARTBEAT_MIN_TTL = 5.0
# How often the main loop looks at time limits, leases and long-running tasks.
HOUSEKEEPING_EVERY = 0.1


class _Runtime:
    """What a running task's ``ctx`` calls back into (inline engine: same process)."""

    def __init__(self, worker: "Worker"):
        self._worker = worker

    def heartbeat(self, task_id: str) -> None:
        self._worker._renew_soon(task_id)

    def progress(self, task_id: str, fraction: float, data: Any) -> None:
        self._worker._progress(task_id, fraction, data)

    def enqueue(self, name, args, options, parent) -> str:
        task_id = self._worker._producer().enqueue(name, args, options=options, parent=parent)
        self._worker._note_child(parent.id, task_id)
        return task_id

    def group_results(self, group_id: str):
        from ..canvas import GroupResults
        return GroupResults(self._worker.backend, group_id)

    def producer(self):
        return self._worker._plain_producer()


class Worker:
    """Runs registered tasks from ``queues`` (DESIGN.md, "Worker engine"; README, "Semantics")."""

    def __init__(self, broker: Broker | str, backend: ResultBackend | str | None = None,
                 registry: TaskRegistry | str | None = None, *, queues: Sequence[str] | None = None,
                 concurrency: int | None = None, prefetch_multiplier: int = checks.DEFAULT_PREFETCH_MULTIPLIER,
                 max_prefetch_multiplier: int | None = None, signer: Any = None,
                 retry_strategy: RetryStrategy | None = None, lifecycle: WorkerLifecycleConfig | None = None,
                 isolation: str = "process", heartbeat_interval: float = 10.0, worker_id: str | None = None,
                 store_results: bool = True, max_crash_redeliveries: int = 3, start_method: str | None = None,
                 child_concurrency: int = 1, engine: Engine | None = None, control: bool = True,
                 yield_cpu: bool = True, autoscale: tuple[int, int] | WorkerAutoscaleConfig | None = None,
                 beat: bool = False, completion_grace: float = 60.0):
        self.registry_ref = registry if isinstance(registry, str) else None
        if isinstance(registry, str):
            registry = load_registry(registry)
        if not isinstance(registry, TaskRegistry):
            raise ConfigurationError(f"Worker needs a TaskRegistry (or its 'module:attribute' path), got {registry!r}")
        self.broker = broker_from_url(broker) if isinstance(broker, str) else broker
        if not isinstance(self.broker, Broker):
            raise ConfigurationError(f"broker must be a Broker or a URL, got {broker!r}")
        self.backend = backend_from_url(backend) if isinstance(backend, str) else backend
        if self.backend is not None and not isinstance(self.backend, ResultBackend):
            raise ConfigurationError(f"backend must be a ResultBackend, a URL or None, got {backend!r}")
        self.registry = registry
        self.queues = [checks.queue_name(q) for q in (queues or [checks.DEFAULT_QUEUE])]
        self.autoscale = autoscale_config(autoscale)
        if concurrency is None:
            concurrency = self.autoscale.min_concurrency if self.autoscale else (os.cpu_count() or 1)
        concurrency = checks.integer("concurrency", concurrency)
        checks.integer("prefetch_multiplier", prefetch_multiplier)
        if self.autoscale is not None:
            lo, hi = self.autoscale.min_concurrency, self.autoscale.max_concurrency
            if not lo <= concurrency <= hi:
                raise ConfigurationError(f"concurrency {concurrency} is outside autoscale's range {lo}..{hi}: "
                                         "leave concurrency out (the pool starts at the minimum) or give one "
                                         "within the range")
            self.autoscale.check_window(prefetch_multiplier)
        if max_prefetch_multiplier is None:
            max_prefetch_multiplier = max(DEFAULT_MAX_MULTIPLIER, prefetch_multiplier)
        elif (isinstance(max_prefetch_multiplier, bool) or not isinstance(max_prefetch_multiplier, int)
              or max_prefetch_multiplier < prefetch_multiplier):
            raise ConfigurationError(f"max_prefetch_multiplier must be an integer >= prefetch_multiplier "
                                     f"({prefetch_multiplier}), got {max_prefetch_multiplier!r}")
        self.child_concurrency = checks.integer("child_concurrency", child_concurrency)
        self.max_crash_redeliveries = checks.integer("max_crash_redeliveries", max_crash_redeliveries)
        self.heartbeat_interval = checks.seconds("heartbeat_interval", heartbeat_interval)
        # a group member's ack may go before its group's completion ran (Runner.record_and_ack):
        # a completion noted that long ago and not done is run by the heartbeat's sweep
        self.completion_grace = checks.seconds("completion_grace", completion_grace)
        if retry_strategy is not None and not isinstance(retry_strategy, RetryStrategy):
            raise ConfigurationError(f"retry_strategy must be a RetryStrategy, got {retry_strategy!r}")
        if lifecycle is not None and not isinstance(lifecycle, WorkerLifecycleConfig):
            raise ConfigurationError(f"lifecycle must be a WorkerLifecycleConfig, got {lifecycle!r}")
        # the process pool's thread runs under SCHED_BATCH (stem.worker.sched) unless told not to
        self.yield_cpu = checks.flag("yield_cpu", yield_cpu)
        if isolation not in ("inline", "process"):
            raise ConfigurationError(f"isolation must be 'process' or 'inline', got {isolation!r}")
        self.isolation = isolation
        self.signer = signer
        self.retry_strategy = retry_strategy or ExponentialJitterRetryStrategy(base=0.5, max=60.0)
        self.lifecycle = lifecycle or WorkerLifecycleConfig()
        self.hostname = socket.gethostname()
        self.id = worker_id or f"{self.hostname}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.store_results = store_results and self.backend is not None
        # beat: a Scheduler thread firing the registry's schedules (and the stored ones) while the
        # worker runs; safe on every worker, since each run is published once however many fire it
        self.beat = checks.flag("beat", beat)
        if self.beat and self.backend is None:
            raise ConfigurationError("beat=True needs a result backend: the scheduler keeps each schedule's "
                                     "record there")
        self._scheduler = None
        self.start_method = start_method
        self.control_enabled = control

        self._state = WorkerState(queues=self.queues, concurrency=concurrency,
                                  window=PrefetchWindow(prefetch_multiplier, max_prefetch_multiplier))
        self._renewals: queue.SimpleQueue = queue.SimpleQueue()   # task ids whose lease is renewed now
        self._done: queue.SimpleQueue = queue.SimpleQueue()        # outcomes, when the main loop settles
        self._key_releases: queue.SimpleQueue = queue.SimpleQueue()  # started jobs whose key goes (settle thread)
        self._outbox: Outbox | None = None                           # outcomes, when a settle thread does
        self._board = StatusBoard(self.backend, self.id) if self.store_results else None
        self._engine = engine or self._make_engine(concurrency)
        self._settler = Settler(state=self._state, broker=self.broker, backend=self.backend, worker_id=self.id,
                                store_results=self.store_results, retry_strategy=self.retry_strategy,
                                board=self._board, sender=self, registry=self.registry,
                                canvas=self._canvas_runner if self.store_results else None,
                                workflows=self._call_notifier if self.store_results else None,
                                take_in=lambda leased, paused, settled: self._fetcher.take_refill(
                                    leased, paused, settled))
        self._fetcher = Fetcher(state=self._state, broker=self.broker, backend=self.backend, signer=signer,
                                registry=registry, engine=self._engine, settler=self._settler, consumer=self.id,
                                isolation=isolation, max_crash_redeliveries=self.max_crash_redeliveries,
                                sender=self)
        self._autoscaler = self._make_autoscaler() if self.autoscale is not None else None
        self._control = None
        self._stem = None
        self._plain = None
        self._runner = None
        self._notifier = None
        self._wf_sweeper = None
        self._stopped = threading.Event()
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self._fetch_thread: threading.Thread | None = None
        self._settle_thread: threading.Thread | None = None
        self._settle_stop = threading.Event()
        self._soft_sent = False
        self._started_at = time.time()
        self._error: BaseException | None = None

    # -- the parts ----------------------------------------------------------------------
    def _make_engine(self, concurrency: int) -> Engine:
        if self.isolation == "inline":
            from .inline import InlineEngine
            runtime = _Runtime(self)

            def context(job: Job) -> TaskContext:
                env = job.envelope
                return TaskContext(env.id, env.name, env.attempt, env.meta, env.headers, env.queue, env.max_retries,
                                   env.root_id, runtime, env.canvas)

            return InlineEngine(concurrency, context, worker_id=self.id)
        from .process_engine import ProcessEngine
        hooks = EngineHooks(heartbeat=self._renew_soon, progress=self._progress, enqueue=self._enqueue_for_child,
                            stop=self.shutdown_nowait, sender=self)
        return ProcessEngine(registry=self.registry, registry_ref=self.registry_ref, concurrency=concurrency,
                             hooks=hooks, worker_id=self.id, child_concurrency=self.child_concurrency,
                             max_tasks_per_child=self.lifecycle.max_tasks_per_child,
                             max_memory_per_child=self.lifecycle.max_memory_per_child,
                             max_crash_redeliveries=self.max_crash_redeliveries, start_method=self.start_method,
                             yield_cpu=self.yield_cpu,
                             can_sign=self.signer is None or bool(getattr(self.signer, "can_sign", True)),
                             backend_recipe=self.backend.reopen_recipe() if self.backend is not None else None,
                             broker_recipe=self.broker.reopen_recipe(), signer=self.signer)

    def _make_autoscaler(self) -> Autoscaler:
        engine, state = self._engine, self._state

        def child_rss() -> list[int]:
            return [int(c.get("rss") or 0) for c in engine.info().get("children") or ()]

        return Autoscaler(self.autoscale, concurrency=lambda: state.concurrency,
                          slots_per_child=getattr(engine, "child_concurrency", 1), held=state.held,
                          running=lambda: len(engine.running()),
                          resize=lambda delta: state.resize(delta, engine.resize), child_rss=child_rss,
                          max_memory_per_child=self.lifecycle.max_memory_per_child)

    def _producer(self):
        """The producer that publishes what tasks enqueue (made on first use)."""
        if self._stem is None:
            from ..producer import Stem
            self._stem = Stem(self.broker, self.backend, self.registry, self.signer)
        return self._stem

    def _plain_producer(self):
        """A producer without the registry (made on first use), for what the worker publishes
        on others' behalf: canvas callbacks and next steps, workflow wake-ups and called
        tasks, which may run on workers with other handlers."""
        if self._plain is None:
            from ..producer import Stem
            self._plain = Stem(self.broker, self.backend, None, self.signer)
        return self._plain

    def _canvas_runner(self):
        """What carries canvases on (``stem.canvas.Runner``), made on first use."""
        if self._runner is None:
            from ..canvas import Runner
            self._runner = Runner(self._plain_producer(), revoke_here=self.revoke,
                                  completion_grace=self.completion_grace)
        return self._runner

    def _call_notifier(self):
        """What tells a workflow run that a task it called ended (``stem.workflows.wake``), made
        on first use: any worker may run a called task, whatever its registry."""
        if self._notifier is None:
            from ..workflows.store import open_store
            from ..workflows.wake import CallNotifier
            store = None

            def store_of():
                nonlocal store
                if store is None:
                    store = open_store(self.backend)
                return store

            self._notifier = CallNotifier(store=store_of, producer=self._plain_producer())
        return self._notifier

    def _start_workflow_sweeper(self) -> None:
        """A registry with workflows (``stem.workflows.Workflows``) gets its sweeper here."""
        from ..workflows.wake import ACTIVATE
        if self.backend is None or ACTIVATE not in self.registry:
            return
        workflows = getattr(self.registry.get(ACTIVATE), "workflows", None)
        if workflows is None:
            return
        self._wf_sweeper = workflows.sweeper(self._plain_producer()).start()

    def _sweep_groups(self) -> None:
        """Once a heartbeat: end the groups their producers left unsealed past their deadline,
        and run the group completions noted and never done (each backend marks a group once,
        a completion runs idempotently).  One sweep failing does not skip the other."""
        n = _sweep(lambda: self._canvas_runner().sweep(), "unsealed groups")
        if n:
            log.warning("%d group(s) were never sealed by their producer: ended FAILED creation-interrupted", n)
        n = _sweep(lambda: self._canvas_runner().sweep_completions(), "noted group completions")
        if n:
            log.warning("ran %d group completion(s) noted more than %.0fs ago and never done (their worker "
                        "stopped after acking the last member, or is that slow)", n, self.completion_grace)

    def _enqueue_for_child(self, name: str, args: Any, options: TaskOptions | None, task_id: str, parent: Any) -> str:
        task_id = self._producer().enqueue_child(name, args, options=options, task_id=task_id, parent=parent)
        self._note_child(parent.id, task_id)
        return task_id

    def _note_child(self, parent_id: str, task_id: str) -> None:
        """A running task enqueued ``task_id``: its statuses list it (``TaskStatus.children``).
        Called before the task's outcome can be settled (the child's ENQUEUE comes before its
        RESULT on the same ring; the inline thread enqueues before it returns)."""
        job = self._state.job_for(parent_id)
        if job is not None:
            job.add_child(task_id)

    def _renew_soon(self, task_id: str) -> None:
        """A task asked (heartbeat, progress) for its lease to be renewed at the next turn."""
        self._renewals.put(task_id)

    def _progress(self, task_id: str, fraction: float, data: Any) -> None:
        """``ctx.progress()``: renew the lease now, note the status for the next flush."""
        self._renewals.put(task_id)
        if self._board is None:
            return
        job = self._state.job_for(task_id)
        if job is not None:
            self._board.progress(job.envelope, job.started_at, fraction, data, args=job.shown_args(),
                                 children=job.children)

    # -- running --------------------------------------------------------------------
    def start(self, *, burst: bool = False) -> None:
        """Run until shut down (or, with ``burst``, until the queues are empty).  Raises
        ``WorkerError`` when the worker could not go on (children keep failing)."""
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
        self._state.request_stop(ShutdownMode(mode))

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
        self._state.pause(queue_name, timeout=FETCH_BLOCK_SECONDS * 4 + 1.0)

    def resume(self, queue_name: str) -> None:
        self._state.resume(queue_name)

    @property
    def paused_queues(self) -> list[str]:
        """The queues ``pause`` stopped on this worker, sorted."""
        return self._state.paused()

    def revoke_local(self, task_ids: Sequence[str]) -> None:
        self._state.revoke_local(task_ids)

    @property
    def concurrency(self) -> int:
        return self._state.concurrency

    @property
    def prefetch_limit(self) -> int:
        """How many unsettled deliveries this worker may hold now (concurrency x the window)."""
        return self._state.prefetch_limit

    @property
    def prefetch_multiplier(self) -> int:
        """The fewest tasks per child the prefetch window holds (its floor)."""
        return self._state.window.floor

    @property
    def max_prefetch_multiplier(self) -> int:
        """The most tasks per child the prefetch window widens to (its cap)."""
        return self._state.window.cap

    def _run(self, burst: bool) -> None:
        self._started_at = time.time()
        signals.worker_init.send(self, worker=self)
        self._engine.start(self._report)
        if self.backend is not None and self.control_enabled:
            from ..control import ControlServer
            self._control = ControlServer(broker=self.broker, backend=self.backend, signer=self.signer, target=self)
            self._control.start()
        self._publish_heartbeat()  # visible (and controllable) before the first task runs
        self._start_workflow_sweeper()
        on_idle = (lambda: self.shutdown_nowait(ShutdownMode.WARM)) if burst else None
        self._fetch_thread = threading.Thread(target=self._fetcher.run, args=(on_idle,), name="stem-fetcher",
                                              daemon=True)
        self._fetch_thread.start()
        if self.beat:
            from ..scheduler import Scheduler
            self._scheduler = Scheduler(self._producer(), self.registry.schedules, scheduler_id=f"{self.id}:beat",
                                        heartbeat_interval=self.heartbeat_interval).run_in_background()
        self._started.set()
        signals.worker_ready.send(self, worker=self)
        self._log_ready()
        try:
            self._main_loop()
        finally:
            if self._scheduler is not None:   # also when the main loop died
                self._scheduler.stop_nowait()
            if self._wf_sweeper is not None:
                self._wf_sweeper.stop(0.0)
            self._stopped.set()
            signals.worker_shutdown.send(self, worker=self)
            log.info("worker %s stopped", self.id)
        error = getattr(self._engine, "error", None)
        if error:   # the engine gave up (children or zygotes keep dying): not a clean stop
            raise WorkerError(f"worker {self.id} stopped: {error}")

    def _log_ready(self) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        from .. import __version__
        from ..redact import mask_url
        names = self.registry.names()
        log.info("stem %s worker %s ready: broker=%s backend=%s queues=%s concurrency=%d engine=%s tasks (%d): %s",
                 __version__, self.id, mask_url(self.broker.url or type(self.broker).__name__),
                 mask_url(self.backend.url or type(self.backend).__name__) if self.store_results else "none",
                 ",".join(self.queues), self.concurrency, self.isolation, len(names),
                 ", ".join(names[:50]) + (" ..." if len(names) > 50 else ""))

    def _report(self, job: Job, outcome: Outcome) -> None:
        outbox = self._outbox
        if outbox is not None:
            outbox.put((job, outcome))   # the main loop hands them to the settle thread in batches
        else:
            self._done.put((job, outcome))

    def _flush_outbox(self, now: float, force: bool = False) -> float:
        held, room = self._state.room_if_waiting()
        return self._outbox.flush(now, unsettled=held, refill_at=self._state.refill_at, room=room, force=force)

    def _main_loop(self) -> None:
        state = self._state
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
                wait = self._flush_outbox(time.monotonic(), state.stopping())
            else:
                batch = self._drain_done(0.05)
                if batch:
                    self._settler.settle(batch)
            now = time.monotonic()
            if now - last_housekeeping >= HOUSEKEEPING_EVERY:
                last_housekeeping = now
                self._enforce_time_limits(now)
                self._renew_leases(now)
                self._note_long_running()
                self._release_started_keys(settle_thread is not None)
                self._engine.tick()
                if self._autoscaler is not None and not state.stopping():
                    self._autoscaler.tick()
            if settle_thread is None and self._board is not None:
                self._board.flush(now)
            if now - last_heartbeat >= self.heartbeat_interval:
                last_heartbeat = now
                self._publish_heartbeat()
            if state.stopping():
                mode = state.stop_mode or ShutdownMode.WARM
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
                if mode is ShutdownMode.SOFT and not self._soft_sent:
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
            if not self._key_releases.empty():
                self._settler.release_keys(self._take_key_releases())
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

    # -- housekeeping ---------------------------------------------------------------------
    def _enforce_time_limits(self, now: float) -> None:
        for job in self._engine.running():
            if job.hard_deadline is not None and now >= job.hard_deadline and not job.settled:
                log.warning("task %s passed its hard time limit; killing it", job.envelope.id)
                self._engine.kill(job, Reason.HARD_TIME_LIMIT)
                limit = job.envelope.hard_time_limit
                self._report(job, Outcome.failed(job.envelope.id, Reason.HARD_TIME_LIMIT,
                                                 f"hard time limit of {limit}s exceeded", "TimeLimitExceeded",
                                                 started_at=job.started_at))
                job.hard_deadline = None
            elif job.soft_deadline is not None and now >= job.soft_deadline and not job.interrupted:
                self._engine.interrupt(job, SoftTimeLimitExceeded)

    def _renew_leases(self, now: float) -> None:
        urgent = set()
        try:
            while True:
                urgent.add(self._renewals.get_nowait())
        except queue.Empty:
            pass
        due = self._state.due_for_renewal(now, urgent)
        if not due:
            return
        try:
            self.broker.extend([j.delivery for j in due])
        except StemError as exc:
            log.warning("could not renew %d leases (%s)", len(due), exc)

    def _note_long_running(self) -> None:
        """Tasks running for STARTED_AFTER seconds get a RUNNING status (short ones none)."""
        if self._board is None:
            return
        started_before = time.time() - STARTED_AFTER
        for job in self._engine.running():
            if not job.noted_running and job.started_at is not None and job.started_at <= started_before:
                job.noted_running = True
                self._board.started(job.envelope, job.started_at, args=job.shown_args(), children=job.children)

    def _release_started_keys(self, on_settle_thread: bool) -> None:
        """Tasks with ``unique_until="started"`` that started since the last look: their keys
        are released off the pool's thread (by the settle thread, batched), once per delivery.
        A task that ends before the next look has its key released by its ack instead."""
        started = [j for j in self._engine.running()
                   if not j.key_released and j.envelope.unique_until == "started" and j.delivery.key is not None]
        if not started:
            return
        for job in started:
            job.key_released = True
        if on_settle_thread:
            self._key_releases.put(started)   # the settle thread looks at least every 50 ms
        else:
            self._settler.release_keys(started)

    def _take_key_releases(self) -> list[Job]:
        jobs: list[Job] = []
        try:
            while True:
                jobs += self._key_releases.get_nowait()
        except queue.Empty:
            return jobs

    def _publish_heartbeat(self) -> None:
        data = self.stats()
        if self.backend is not None:
            try:
                self.backend.put_heartbeat(self.id, data, ttl=max(self.heartbeat_interval * 3, HEARTBEAT_MIN_TTL))
            except StemError as exc:
                log.warning("could not publish heartbeat (%s)", exc)
            if self.store_results:
                self._sweep_groups()
        if signals.worker_heartbeat.receivers:
            signals.worker_heartbeat.send(self, worker=self, heartbeat=data)

    # -- what the control plane asks ------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot: the same data the heartbeat carries."""
        state = self._state
        return {
            "id": self.id, "host": self.hostname, "pid": os.getpid(), "queues": list(self.queues),
            "concurrency": state.concurrency, "prefetch_limit": state.prefetch_limit, "isolation": self.isolation,
            "in_flight": state.held(), "running": len(self._engine.running()), "paused": state.paused(),
            "heartbeat_interval": self.heartbeat_interval,
            "autoscale": self._autoscaler.info() if self._autoscaler is not None else None,
            **state.counters(), "uptime": time.time() - self._started_at, **self._engine.info(),
        }

    def inspect(self) -> dict[str, Any]:
        """Running and reserved tasks, and the queues paused here (for the control plane)."""
        running = {j.seq for j in self._engine.running()}

        def row(j: Job) -> dict[str, Any]:
            return {"id": j.envelope.id, "name": j.envelope.name, "queue": j.envelope.queue,
                    "attempt": j.envelope.attempt, "started_at": j.started_at, "pid": getattr(j.slot, "pid", None)}

        jobs = self._state.jobs()
        return {"running": [row(j) for j in jobs if j.seq in running],
                "reserved": [row(j) for j in jobs if j.seq not in running],
                "revoked": sorted(self._state.revoked_locally()),
                "paused": self.paused_queues}

    def revoke(self, task_ids: Sequence[str], *, terminate: bool = False) -> dict[str, Any]:
        """Skip these tasks here: reserved ones at once, running ones too with ``terminate``."""
        ids = set(task_ids)
        self._state.revoke_local(ids)
        reserved = self._engine.take_backlog(lambda job: job.envelope.id in ids)
        for job in reserved:
            self._settler.finish_unrun(job.delivery, job.envelope, TaskState.REVOKED, Reason.REVOKED)
        self._settler.forget(reserved)
        terminated = []
        if terminate:
            for job in self._engine.running():
                if job.envelope.id in ids:
                    self._engine.kill(job, Reason.REVOKED)
                    terminated.append(job.envelope.id)
                    self._report(job, Outcome.failed(job.envelope.id, Reason.REVOKED,
                                                     "revoked while running (terminated)", "Revoked",
                                                     started_at=job.started_at))
        return {"revoked": sorted(ids), "reserved_dropped": [j.envelope.id for j in reserved],
                "terminated": terminated}

    def resize(self, delta: int) -> int:
        """Grow or shrink the pool by ``delta`` slots (never below 1); returns the new concurrency.
        With autoscale the bounds do not apply here, and the autoscaler's windows restart."""
        if self._autoscaler is not None:
            return self._autoscaler.resize(delta)
        return self._state.resize(delta, self._engine.resize)

    # -- shutdown -------------------------------------------------------------------
    def _begin_shutdown(self, mode: ShutdownMode) -> None:
        signals.worker_stopping.send(self, worker=self, mode=mode)
        log.info("worker %s: %s shutdown", self.id, mode.value)
        if self._scheduler is not None:   # first: a stopping worker publishes no more runs
            self._scheduler.stop(5.0)
        if self._wf_sweeper is not None:
            self._wf_sweeper.stop(5.0)
        self._state.wake_all()
        if self._fetch_thread is not None:
            self._fetch_thread.join(5.0)
        # a refill started before the stop: its deliveries join the backlog first
        self._state.turn.wait_until_handed_back(timeout=5.0)
        self._requeue(self._engine.take_backlog())

    def _requeue(self, jobs: list[Job]) -> None:
        for job in jobs:
            if not job.settled:
                self._settler.broker_call(self.broker.nack, job.delivery, requeue=True)
        self._settler.forget(jobs)

    def _hard_stop(self) -> None:
        log.warning("worker %s: hard shutdown, requeueing %d in-flight deliveries", self.id, self._state.held())
        self._requeue(self._engine.take_backlog())
        running = self._engine.running()
        for job in running:
            self._engine.kill(job, Reason.SHUTDOWN)
        self._requeue(running)

    def _settled_all(self) -> bool:
        if self._settle_thread is None:
            batch = self._drain_done(0.0)
            if batch:
                self._settler.settle(batch)
        return not self._state.held()

    def _finish_shutdown(self) -> None:
        if self.backend is not None:
            try:   # first: a controller that still sees this worker would send into a deleted queue
                self.backend.remove_heartbeat(self.id)
            except StemError:
                pass
        if self._control is not None:
            self._control.stop()
        if self._settle_thread is not None:
            self._flush_outbox(time.monotonic(), force=True)
            self._settle_stop.set()
            self._settle_thread.join(self.lifecycle.force_shutdown_after)
        self._engine.stop(self.lifecycle.force_shutdown_after)

    def __repr__(self) -> str:
        return f"<Worker {self.id} queues={self.queues} concurrency={self.concurrency}>"


def _sweep(run: Callable[[], int], what: str) -> int:
    """One of the heartbeat's sweeps: how many it ended; a failure is logged, never raised
    (it must not stop the heartbeat), and counts as none."""
    try:
        return run()
    except StemError as exc:
        log.warning("could not sweep %s (%s)", what, exc)
    except Exception:  # noqa: BLE001 - never stops the heartbeat
        log.exception("sweeping %s failed", what)
    return 0
