"""Prometheus metrics, fed from the signals (``pip install 'stem-queue[metrics]'``).

Nothing here runs until :func:`install`: without it no receiver is connected
and the worker pays one attribute check per signal.  ``install()`` connects
receivers to the task signals and registers a collector that reads each
running worker's ``stats()`` when scraped.  Children report through the
supervisor (every outcome, runtime and RSS already reaches it), so there is
one ``/metrics`` per worker process: no per-child servers, no multiprocess
files.

Metrics (``task``, ``queue``, ``reason`` and ``worker`` are labels)::

    stem_tasks_received_total{task,queue}          deliveries accepted for running
    stem_tasks_succeeded_total{task,queue}
    stem_tasks_failed_total{task,queue,reason}     final failures (then in the DLQ)
    stem_tasks_retried_total{task,queue}           attempts that will run again
    stem_tasks_revoked_total{task,queue,reason}    revoked or expired, not run
    stem_tasks_dead_lettered_total{queue,reason}   dropped to the DLQ unrun (bad signature,
                                                   undecodable, unknown task, poison); the
                                                   signal carries no task name
    stem_task_runtime_seconds{task,queue}          histogram, every attempt (handler start to end)
    stem_task_queue_wait_seconds{task,queue}       histogram, enqueued (or due) -> started
    stem_child_recycles_total{reason}              children replaced: max-tasks, max-memory,
                                                   crash, hard-time-limit, ...
    stem_worker_in_flight{worker}                  deliveries held (prefetched + running)
    stem_worker_running{worker}                    tasks running now
    stem_worker_concurrency{worker}
    stem_worker_autoscale_resizes_total{worker,direction}  the autoscaler's grows and shrinks
                                                   (``autoscale``; manual resizes not counted)
    stem_worker_prefetch_limit{worker}
    stem_worker_children{worker}                   child processes (process engine)
    stem_child_rss_bytes{worker,pid}               resident memory of each child
    stem_broker_reconnects_total{worker}           broker outages the worker recovered from
    stem_tasks_routed_limited_total{worker}        deliveries without a limit sent into their lane
                                                   instead of run (``stem.limits``)
    stem_queue_throttled{queue}                    tasks waiting in the broker for a token or a
                                                   slot (read from the broker at scrape time, for
                                                   the queues of the tracked workers)
    stem_lane_waiting{queue,rate_key,concurrency_key}  per limit lane (at most 100 per queue,
    stem_lane_running{queue,rate_key,concurrency_key}  the most waiting first): throttled tasks,
                                                   and live concurrency slots of its key
    stem_schedule_runs_fired_total{schedule}       runs this process's schedulers published
                                                   (``schedule_fired``; a run another scheduler
                                                   published first is not counted)
    stem_schedule_runs_caught_up_total{schedule}   of those, misfires fired late (catch-up)
    stem_schedule_runs_skipped_total{schedule,reason}  runs settled unpublished (``schedule_skipped``):
                                                   misfire, overlap, paused; every scheduler
                                                   counts the runs it skipped itself

Workers are picked up from ``worker_init`` / ``worker_heartbeat`` and dropped at
``worker_shutdown`` (or pass them to :func:`install`).  The registry is a
dedicated ``CollectorRegistry`` (not prometheus_client's global one) unless
you pass one.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterable

from . import _checks as checks
from .errors import ConfigurationError
from .results import TaskState
from .signals import signals

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .worker import Worker

__all__ = ["install", "uninstall", "installed", "start_http_server", "MetricsServer", "StemMetrics",
           "RUNTIME_BUCKETS", "QUEUE_WAIT_BUCKETS"]

_SUCCEEDED = TaskState.SUCCEEDED
RUNTIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                      900.0, 3600.0)


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError("stem.metrics needs prometheus-client: pip install 'stem-queue[metrics]'") from None
    return prometheus_client


class _WorkerCollector:
    """Gauges read from each tracked worker's ``stats()`` at scrape time."""

    def __init__(self) -> None:
        self._workers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def track(self, worker: Any) -> None:
        with self._lock:
            self._workers[worker.id] = worker

    def forget(self, worker: Any) -> None:
        with self._lock:
            self._workers.pop(worker.id, None)

    def describe(self):
        return []   # no descriptions: the registry then does not call collect() at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        g = {name: GaugeMetricFamily(f"stem_worker_{name}", doc, labels=["worker"]) for name, doc in (
            ("in_flight", "Deliveries the worker holds (prefetched and running)."),
            ("running", "Tasks running now."),
            ("concurrency", "Execution slots (threads or child processes)."),
            ("prefetch_limit", "Most unsettled deliveries the worker leases at once."),
            ("children", "Child processes (process engine)."))}
        rss = GaugeMetricFamily("stem_child_rss_bytes", "Resident memory of each child process.",
                                labels=["worker", "pid"])
        reconnects = CounterMetricFamily("stem_broker_reconnects", "Broker outages the worker recovered from.",
                                         labels=["worker"])
        resizes = CounterMetricFamily("stem_worker_autoscale_resizes", "Pool resizes the autoscaler made, by "
                                      "direction (grow, shrink).", labels=["worker", "direction"])
        routed = CounterMetricFamily("stem_tasks_routed_limited", "Deliveries without a limit sent into their "
                                     "limit's lane instead of run.", labels=["worker"])
        throttled = GaugeMetricFamily("stem_queue_throttled", "Tasks waiting in the broker for a rate token or "
                                      "a concurrency slot (never leased, never reserved).", labels=["queue"])
        lane_labels = ["queue", "rate_key", "concurrency_key"]
        waiting = GaugeMetricFamily("stem_lane_waiting", "Throttled tasks per limit lane.", labels=lane_labels)
        running = GaugeMetricFamily("stem_lane_running", "Live concurrency slots of the lane's key.",
                                    labels=lane_labels)
        with self._lock:
            workers = list(self._workers.values())
        self._collect_lanes(workers, throttled, waiting, running)
        for w in workers:
            try:
                s = w.stats()
            except Exception:  # noqa: BLE001 - a worker tearing down: skip it this scrape
                continue
            wid = str(s.get("id", w.id))
            for name, family in g.items():
                if name == "children":
                    family.add_metric([wid], len(s.get("children") or ()))
                elif s.get(name) is not None:
                    family.add_metric([wid], float(s[name]))
            for child in s.get("children") or ():
                rss.add_metric([wid, str(child.get("pid"))], float(child.get("rss") or 0))
            reconnects.add_metric([wid], float(s.get("broker_reconnects", 0)))
            autoscale = s.get("autoscale")
            if autoscale:
                resizes.add_metric([wid, "grow"], float(autoscale.get("grows", 0)))
                resizes.add_metric([wid, "shrink"], float(autoscale.get("shrinks", 0)))
            routed.add_metric([wid], float(s.get("routed_limited", 0)))
        yield from g.values()
        yield from (rss, reconnects, resizes, routed, throttled, waiting, running)

    @staticmethod
    def _collect_lanes(workers: list[Any], throttled: Any, waiting: Any, running: Any) -> None:
        """The throttled counts and lanes of the tracked workers' queues, each queue once (two
        round trips per queue, at scrape time only)."""
        seen: set[str] = set()
        for w in workers:
            broker = getattr(w, "broker", None)
            for queue in getattr(w, "queues", ()) or ():
                if broker is None or queue in seen:
                    continue
                seen.add(queue)
                try:
                    stats, lanes = broker.stats(queue), broker.lane_stats(queue)
                except Exception:  # noqa: BLE001 - a broker outage must not fail the scrape
                    continue
                throttled.add_metric([queue], float(stats.throttled))
                for lane in lanes:
                    labels = [queue, lane.rate_key or "", lane.concurrency_key or ""]
                    waiting.add_metric(labels, float(lane.waiting))
                    running.add_metric(labels, float(lane.running))


class _Series:
    """Per-task counters and histograms of one (task, queue), as plain numbers.

    The hot receivers (four per task) update these under one lock, about 1 us
    per task instead of the ~6 us of prometheus_client's labelled metrics;
    they become metric families when scraped.  Histogram buckets are kept
    per bucket (not cumulative) with the +Inf bucket last.
    """

    __slots__ = ("received", "succeeded", "retried", "runtime", "runtime_sum", "wait", "wait_sum")

    def __init__(self) -> None:
        self.received = self.succeeded = self.retried = 0
        self.runtime = [0] * (len(RUNTIME_BUCKETS) + 1)
        self.runtime_sum = 0.0
        self.wait = [0] * (len(QUEUE_WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0


def _histogram(family: Any, labels: list[str], bounds: tuple[float, ...], counts: list[int], total: float) -> None:
    cumulative, running = [], 0
    for bound, n in zip(bounds + (float("inf"),), counts):
        running += n
        cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    family.add_metric(labels, cumulative, total)


class _TaskCollector:
    """The per-task series as metric families (see ``_Series``)."""

    def __init__(self, metrics: "StemMetrics"):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        tq = ["task", "queue"]
        received = CounterMetricFamily("stem_tasks_received", "Deliveries accepted for running.", labels=tq)
        succeeded = CounterMetricFamily("stem_tasks_succeeded", "Tasks that succeeded.", labels=tq)
        retried = CounterMetricFamily("stem_tasks_retried", "Attempts that failed and will run again.", labels=tq)
        runtime = HistogramMetricFamily("stem_task_runtime_seconds", "Handler run time of every attempt.",
                                        labels=tq)
        wait = HistogramMetricFamily("stem_task_queue_wait_seconds", "From enqueued (or due, for delayed tasks "
                                     "and retries) to started.", labels=tq)
        m = self.metrics
        with m._lock:
            rows = [(key, s.received, s.succeeded, s.retried, list(s.runtime), s.runtime_sum, list(s.wait),
                     s.wait_sum) for key, s in m._series.items()]
        for key, n_received, n_succeeded, n_retried, rt, rt_sum, wt, wt_sum in rows:
            labels = list(key)
            received.add_metric(labels, n_received)
            succeeded.add_metric(labels, n_succeeded)
            retried.add_metric(labels, n_retried)
            _histogram(runtime, labels, RUNTIME_BUCKETS, rt, rt_sum)
            _histogram(wait, labels, QUEUE_WAIT_BUCKETS, wt, wt_sum)
        yield from (received, succeeded, retried, runtime, wait)


class StemMetrics:
    """The metrics and the signal receivers that feed them (see the module doc)."""

    def __init__(self, registry: "CollectorRegistry | None" = None):
        pc = _prometheus()
        self.registry = registry if registry is not None else pc.CollectorRegistry()
        r = self.registry
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Series] = {}
        # rare events: prometheus_client's own labelled counters
        self.failed = pc.Counter("stem_tasks_failed", "Tasks that failed for good (dead-lettered after the "
                                 "last attempt).", ["task", "queue", "reason"], registry=r)
        self.revoked = pc.Counter("stem_tasks_revoked", "Tasks revoked or expired before running.",
                                  ["task", "queue", "reason"], registry=r)
        self.dead_lettered = pc.Counter("stem_tasks_dead_lettered", "Deliveries dead-lettered without running "
                                        "(bad signature, undecodable, unknown task, poison).", ["queue", "reason"],
                                        registry=r)
        self.recycles = pc.Counter("stem_child_recycles", "Child processes replaced, by reason.", ["reason"],
                                   registry=r)
        self.schedule_fired = pc.Counter("stem_schedule_runs_fired", "Schedule runs this process published.",
                                         ["schedule"], registry=r)
        self.schedule_caught_up = pc.Counter("stem_schedule_runs_caught_up", "Schedule runs published late: "
                                             "misfires fired by the catch-up policy.", ["schedule"], registry=r)
        self.schedule_skipped = pc.Counter("stem_schedule_runs_skipped", "Schedule runs settled without being "
                                           "published, by reason (misfire, overlap, paused).",
                                           ["schedule", "reason"], registry=r)
        r.register(_TaskCollector(self))
        self.collector = _WorkerCollector()
        r.register(self.collector)
        self._receivers = (
            (signals.task_received, self._on_received), (signals.task_prerun, self._on_prerun),
            (signals.task_postrun, self._on_postrun), (signals.task_failed, self._on_failed), (signals.task_retry, self._on_retry),
            (signals.task_revoked, self._on_revoked), (signals.task_dead_lettered, self._on_dead_lettered),
            (signals.worker_child_shutdown, self._on_child_shutdown), (signals.worker_init, self._on_worker),
            (signals.worker_heartbeat, self._on_worker), (signals.worker_shutdown, self._on_worker_shutdown),
            (signals.schedule_fired, self._on_schedule_fired), (signals.schedule_skipped, self._on_schedule_skipped),
        )

    def connect(self, workers: Iterable[Any] = ()) -> None:
        for worker in workers:
            self.collector.track(worker)
        for signal, receiver in self._receivers:
            signal.connect(receiver)

    def disconnect(self) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)

    def _of(self, env: Any) -> _Series:
        """The series of ``env``'s (task, queue); called with the lock held."""
        key = (env.name, env.queue)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        return series

    # -- receivers (worker threads) ---------------------------------------------------------
    def _on_received(self, sender, envelope, **kw) -> None:
        with self._lock:
            self._of(envelope).received += 1

    def _on_prerun(self, sender, envelope, **kw) -> None:
        due = envelope.enqueued_at
        if envelope.not_before is not None and envelope.not_before > due:
            due = envelope.not_before
        if due:
            wait = time.time() - due
            if wait < 0.0:   # clocks of producer and worker hosts disagree
                wait = 0.0
            with self._lock:
                s = self._of(envelope)
                s.wait[bisect_left(QUEUE_WAIT_BUCKETS, wait)] += 1
                s.wait_sum += wait

    def _on_postrun(self, sender, envelope, status=None, started_at=None, finished_at=None, **kw) -> None:
        """Successes are counted here too: one receiver per settled task instead of two."""
        runtime = None
        if started_at and finished_at:
            runtime = finished_at - started_at
            if runtime < 0.0:
                runtime = 0.0
        with self._lock:
            s = self._of(envelope)
            if status is _SUCCEEDED:
                s.succeeded += 1
            if runtime is not None:
                s.runtime[bisect_left(RUNTIME_BUCKETS, runtime)] += 1
                s.runtime_sum += runtime

    def _on_retry(self, sender, envelope, **kw) -> None:
        with self._lock:
            self._of(envelope).retried += 1

    def _on_failed(self, sender, envelope, reason=None, **kw) -> None:
        self.failed.labels(envelope.name, envelope.queue, reason or "error").inc()

    def _on_revoked(self, sender, envelope, reason=None, **kw) -> None:
        self.revoked.labels(envelope.name, envelope.queue, reason or "revoked").inc()

    def _on_dead_lettered(self, sender, task_id=None, queue=None, reason=None, **kw) -> None:
        self.dead_lettered.labels(queue or "", reason or "").inc()

    def _on_child_shutdown(self, sender, reason=None, **kw) -> None:
        if reason != "shutdown":
            self.recycles.labels(reason or "unknown").inc()

    def _on_schedule_fired(self, sender, schedule=None, late=False, **kw) -> None:
        sid = getattr(schedule, "id", "")
        self.schedule_fired.labels(sid).inc()
        if late:
            self.schedule_caught_up.labels(sid).inc()

    def _on_schedule_skipped(self, sender, schedule=None, fire_times=(), reason=None, **kw) -> None:
        self.schedule_skipped.labels(getattr(schedule, "id", ""), reason or "").inc(len(fire_times))

    def _on_worker(self, sender, worker=None, **kw) -> None:
        if worker is not None:
            self.collector.track(worker)

    def _on_worker_shutdown(self, sender, worker=None, **kw) -> None:
        if worker is not None:
            self.collector.forget(worker)


_lock = threading.Lock()
_installed: StemMetrics | None = None


def install(registry: "CollectorRegistry | None" = None, *, workers: Iterable["Worker"] = ()) -> StemMetrics:
    """Start counting: connect the receivers (once per process) and return the metrics.

    ``registry`` defaults to a new dedicated ``CollectorRegistry``.  Workers
    that start later are tracked by themselves; pass ``workers`` that already
    run.  Installing again while installed returns the installed metrics
    (tracking ``workers`` too); a different ``registry`` is an error.
    """
    global _installed
    with _lock:
        if _installed is not None:
            if registry is not None and registry is not _installed.registry:
                raise ConfigurationError("stem.metrics is already installed with another registry; "
                                         "call stem.metrics.uninstall() first")
            _installed.connect(workers)
            return _installed
        metrics = StemMetrics(registry)
        metrics.connect(workers)
        _installed = metrics
        return metrics


def uninstall() -> None:
    """Disconnect the receivers; the registry keeps its last values."""
    global _installed
    with _lock:
        if _installed is not None:
            _installed.disconnect()
            _installed = None


def installed() -> StemMetrics | None:
    return _installed


class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread); ``close()`` stops it."""

    def __init__(self, httpd: Any, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_http_server(port: int, addr: str = "127.0.0.1", registry: "CollectorRegistry | None" = None
                      ) -> MetricsServer:
    """Serve ``registry`` (default: the installed metrics', installing them if
    needed) at ``http://addr:port/metrics`` from a daemon thread; ``port=0``
    picks a free port (see ``.port``).  Binds to localhost unless told otherwise."""
    pc = _prometheus()
    if registry is None:
        registry = install().registry
    checks.integer("metrics port", port, minimum=0, maximum=65535)
    try:
        httpd, thread = pc.start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {addr}:{port}: {exc}") from None
    return MetricsServer(httpd, thread)
