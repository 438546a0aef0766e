"""End-to-end throughput of stem: producer -> broker -> worker supervisor -> children -> results.

    .venv/bin/python benchmarks/e2e.py --broker redis --tasks 20000 --concurrency 2
    .venv/bin/python benchmarks/e2e.py --broker redis --task noop --no-results --tasks 100000
    .venv/bin/python benchmarks/e2e.py --broker memory --isolation inline --json
    .venv/bin/python benchmarks/e2e.py --help

Function API (for ``stem bench``): ``run(Config(...)) -> dict``; ``main(argv)``.

Phases, one run, each with its own namespace / schema / file, deleted at the end:

1. ``enqueue``: ``--single`` tasks with ``Stem.enqueue`` one by one (into a side
   queue, purged afterwards), then ``--tasks`` with ``Stem.enqueue_many`` in
   batches of ``--batch``; tasks/s and producer CPU µs per task.  On Redis,
   ``redis-benchmark -P 64`` XADD of an entry shaped like stem's (same fields,
   a frame of the same size) runs right after, against the same server: the
   ceiling stem's ``enqueue_many`` is compared with.
2. ``drain``: a worker starts on the pre-filled queue (``--tasks`` tasks):
   tasks/s from the worker's start (forking its children included) to the
   last task, the steady-state rate (10% -> 90% done), worker-tree CPU per task.
3. ``live``: the running worker and a producer thread together: ``--tasks`` more
   tasks enqueued with ``enqueue_many`` batches of ``--live-batch`` while the
   worker runs them; end-to-end tasks/s from the first enqueue to the last
   task done, CPU µs per task of the producer (its thread), the worker tree
   (supervisor + children, psutil) and redis-server (psutil on its pid).

The worker runs in its own process (``python e2e.py --worker-process``), so its
CPU and RSS are its own; with the in-memory broker it must share the producer's
process, and its CPU is the process's minus the producer thread's.  Completion
is what the worker reports (``stats()["processed"]``, sampled every 20 ms).

Tasks: ``check`` (default) does one ``HINCRBY <ns>:seen <task id> 1`` on the
local Redis; afterwards every id must be there exactly once (none missing,
none run twice).  ``incr`` does one ``INCR`` (the peers' workload; the count
is checked).  ``noop`` does nothing (only the worker's count is checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import psutil
import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import (TreeMeter, drop_keys, redis_benchmark, redis_server_pid, source_revision,  # noqa: E402
                      steady_rate)

import stem  # noqa: E402
from stem import PayloadSigner, Stem, TaskOptions, TaskRegistry, Worker, WorkerLifecycleConfig  # noqa: E402

__all__ = ["Config", "run", "main", "make_registry"]

QUEUE = "bench"
SINGLE_QUEUE = "bench-single"
SIGNING_KEY = {"bench": b"stem-benchmark-signing-key-0123456789"}
SAMPLE_S = 0.02


@dataclasses.dataclass
class Config:
    tasks: int = 20_000
    payload: str = "none"            # none | 1k
    broker: str = "redis"            # memory | sqlite | redis | postgres
    concurrency: int = 2
    isolation: str = "process"       # process | inline
    prefetch_multiplier: int | None = None   # None: the Worker's default
    signing: bool = True
    results: bool = True             # False: producer backend=None, worker store_results=False
    task: str = "check"              # check | incr | noop
    phases: tuple[str, ...] = ("enqueue", "drain", "live")
    single: int = 2_000
    batch: int = 500
    live_batch: int = 100
    redis_url: str = "redis://127.0.0.1:6379/0"
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    redis_benchmark: bool = True
    timeout: float = 900.0
    progress: bool = True

    def validate(self) -> None:
        if self.payload not in ("none", "1k"):
            raise ValueError("payload is 'none' or '1k'")
        if self.broker not in ("memory", "sqlite", "redis", "postgres"):
            raise ValueError("broker is memory, sqlite, redis or postgres")
        if self.isolation not in ("process", "inline"):
            raise ValueError("isolation is 'process' or 'inline'")
        if self.task not in ("check", "incr", "noop"):
            raise ValueError("task is check, incr or noop")
        bad = set(self.phases) - {"enqueue", "drain", "live"}
        if bad or not self.phases:
            raise ValueError(f"phases are enqueue, drain, live; got {sorted(bad)}")
        if self.tasks < 1 or self.concurrency < 1:
            raise ValueError("tasks and concurrency must be >= 1")


# -- the tasks -----------------------------------------------------------------------------------

def make_registry(side_url: str, side_key: str) -> TaskRegistry:
    """``bench.noop``, ``bench.incr`` (INCR <key>:count) and ``bench.check`` (HINCRBY <key>:seen id 1).
    Children inherit the registry (and its closures) through the zygote's fork."""
    registry = TaskRegistry()
    state: dict[str, Any] = {"pid": None, "r": None}

    def client() -> redis.Redis:
        if state["pid"] != os.getpid():
            state["r"], state["pid"] = redis.Redis.from_url(side_url), os.getpid()
        return state["r"]

    opts = TaskOptions(queue=QUEUE)

    @registry.task("bench.noop", options=opts)
    def noop(ctx, **_):
        return None

    @registry.task("bench.incr", options=opts)
    def incr(ctx, **_):
        client().incr(side_key + ":count")

    @registry.task("bench.check", options=opts)
    def check(ctx, **_):
        client().hincrby(side_key + ":seen", ctx.id, 1)

    return registry


# -- building the adapters -------------------------------------------------------------------------

def _adapters(cfg: Config, run_id: str) -> tuple[Any, Any]:
    """(broker, backend) for this run's namespace / file / schema."""
    if cfg.broker == "memory":
        from stem.backends import InMemoryResultBackend
        from stem.brokers import InMemoryBroker
        return InMemoryBroker(), InMemoryResultBackend()
    if cfg.broker == "redis":
        from stem.backends.redis import RedisResultBackend
        from stem.brokers.redis import RedisBroker
        ns = f"stembench-{run_id}"
        return RedisBroker(cfg.redis_url, namespace=ns), RedisResultBackend(cfg.redis_url, namespace=ns)
    if cfg.broker == "sqlite":
        from stem.backends.sqlite import SqliteResultBackend
        from stem.brokers.sqlite import SqliteBroker
        path = os.path.join(tempfile.gettempdir(), f"stembench-{run_id}.db")
        return SqliteBroker(path), SqliteResultBackend(path)
    from stem.backends.postgres import PostgresResultBackend
    from stem.brokers.postgres import PostgresBroker
    schema = f"stembench_{run_id}"
    return (PostgresBroker(cfg.postgres_url, schema=schema),
            PostgresResultBackend(cfg.postgres_url, schema=schema))


def _signer(cfg: Config) -> PayloadSigner | None:
    return PayloadSigner(SIGNING_KEY) if cfg.signing else None


def _make_worker(cfg: Config, run_id: str, broker, backend) -> Worker:
    kw = {} if cfg.prefetch_multiplier is None else {"prefetch_multiplier": cfg.prefetch_multiplier}
    return Worker(broker=broker, backend=backend, registry=make_registry(cfg.redis_url, _side_key(run_id)),
                  queues=[QUEUE], concurrency=cfg.concurrency, signer=_signer(cfg), isolation=cfg.isolation,
                  store_results=cfg.results, lifecycle=WorkerLifecycleConfig(install_signal_handlers=False),
                  **kw)


def _side_key(run_id: str) -> str:
    return f"stembench-{run_id}:side"


# -- the worker, in its own process or in this one ------------------------------------------------

def _worker_process(cfg: Config, run_id: str) -> int:
    """``e2e.py --worker-process``: run a worker; report ``processed`` on stdout every 20 ms;
    stop on a line ``stop`` (or EOF) on stdin."""
    broker, backend = _adapters(cfg, run_id)
    worker = _make_worker(cfg, run_id, broker, backend)
    out = sys.stdout
    stop = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    t_start = time.time()
    worker.run_in_background()
    out.write(json.dumps({"ready": True, "t_start": t_start, "t_ready": time.time(), "pid": os.getpid()}) + "\n")
    out.flush()
    while not stop.wait(SAMPLE_S):
        out.write(f"{time.time()} {worker.stats()['processed']}\n")
        out.flush()
    worker.shutdown(timeout=60)
    final = worker.stats()
    out.write(json.dumps({"final": {k: final.get(k) for k in ("processed", "succeeded", "failed", "retried",
                                                                 "dead_lettered", "received")}}) + "\n")
    out.flush()
    broker.close()
    backend.close()
    return 0


class _WorkerHandle:
    """The worker under test: ``processed`` (latest count), samples, pids to measure."""

    def __init__(self, cfg: Config, run_id: str, broker=None, backend=None):
        self.cfg, self.run_id = cfg, run_id
        self.samples: list[tuple[float, int]] = []
        self.processed = 0
        self.final: dict[str, Any] = {}
        self.t_start = self.t_ready = 0.0
        self._proc: subprocess.Popen | None = None
        self._worker: Worker | None = None
        self._broker, self._backend = broker, backend
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.in_process = cfg.broker == "memory"

    @property
    def pid(self) -> int:
        return os.getpid() if self.in_process else self._proc.pid

    def start(self) -> None:
        if self.in_process:
            self._worker = _make_worker(self.cfg, self.run_id, self._broker, self._backend)
            self.t_start = time.time()
            self._worker.run_in_background()
            self.t_ready = time.time()
            self._thread = threading.Thread(target=self._sample_in_process, daemon=True)
            self._thread.start()
            return
        argv = [sys.executable, os.path.abspath(__file__), "--worker-process", self.run_id,
                "--config-json", json.dumps(dataclasses.asdict(self.cfg))]
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        first = self._proc.stdout.readline()
        if not first:
            raise RuntimeError(f"the worker process exited with {self._proc.wait()} before it was ready")
        info = json.loads(first)
        self.t_start, self.t_ready = info["t_start"], info["t_ready"]
        self._thread = threading.Thread(target=self._read_subprocess, daemon=True)
        self._thread.start()

    def _sample_in_process(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            n = self._worker.stats()["processed"]
            self.processed = n
            self.samples.append((time.time(), n))

    def _read_subprocess(self) -> None:
        for line in self._proc.stdout:
            if line.startswith("{"):
                self.final = json.loads(line).get("final", {})
                continue
            t, n = line.split()
            self.processed = int(n)
            self.samples.append((float(t), int(n)))

    def wait_for(self, count: int, timeout: float, on_progress=None) -> float:
        """Block until ``count`` tasks are processed; returns the time of the first sample that saw it."""
        deadline = time.monotonic() + timeout
        while self.processed < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.processed} of {count} tasks processed within {timeout}s")
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"the worker process exited with {self._proc.returncode}")
            if on_progress:
                on_progress(self.processed)
            time.sleep(SAMPLE_S / 2)
        if on_progress:
            on_progress(self.processed)
        return next(t for t, n in self.samples if n >= count)

    def stop(self) -> None:
        if self.in_process:
            self._stop.set()
            if self._worker is not None and not self.final:
                self._worker.shutdown(timeout=60)
                s = self._worker.stats()
                self.final = {k: s.get(k) for k in ("processed", "succeeded", "failed", "retried",
                                                    "dead_lettered", "received")}
            return
        if self._proc is None or self._proc.stdin.closed:
            return
        try:
            self._proc.stdin.write("stop\n")
            self._proc.stdin.flush()
            self._proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self._proc.wait(90)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._thread is not None:
            self._thread.join(5)
        self._proc.stdout.close()


# -- the run --------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, enabled: bool):
        self.p = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.p = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.p.start()

    def add(self, what: str, total: int):
        return self.p.add_task(what, total=total) if self.p else None

    def update(self, task, done: int) -> None:
        if self.p is not None and task is not None:
            self.p.update(task, completed=done)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


def _payload_args(cfg: Config) -> dict[str, Any]:
    return {} if cfg.payload == "none" else {"blob": os.urandom(512).hex().encode()[:1024]}


def _cpu_us(seconds: float, tasks: int) -> float:
    return seconds / tasks * 1e6 if tasks else 0.0


def run(cfg: Config) -> dict[str, Any]:
    """Run the configured phases and return the figures (see the module docstring)."""
    cfg.validate()
    run_id = uuid.uuid4().hex[:10]
    side_key = _side_key(run_id)
    task_name = f"bench.{cfg.task}"
    args = _payload_args(cfg)
    r = redis.Redis.from_url(cfg.redis_url)
    r.ping()
    redis_pid = redis_server_pid(r)
    broker, backend = _adapters(cfg, run_id)
    producer = Stem(broker, backend if cfg.results else None, make_registry(cfg.redis_url, side_key), _signer(cfg))
    progress = _Progress(cfg.progress)
    res: dict[str, Any] = {"config": dataclasses.asdict(cfg), "run_id": run_id, "stem": stem.__version__
                           if hasattr(stem, "__version__") else None,
                           "implementation": getattr(stem, "IMPLEMENTATION", None), "revision": source_revision(),
                           "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}}
    handle = _WorkerHandle(cfg, run_id, broker, backend)
    expected = 0
    rss_samples: list[tuple[float, int, list[int]]] = []
    try:
        if "enqueue" in cfg.phases or "drain" in cfg.phases:
            res["enqueue"] = _phase_enqueue(cfg, producer, task_name, args, progress,
                                            measure_single="enqueue" in cfg.phases)
            expected += cfg.tasks
        if "enqueue" in cfg.phases and cfg.broker == "redis" and cfg.redis_benchmark:
            res["enqueue"].update(_xadd_reference(cfg, run_id, producer, task_name, args))
        handle.start()
        meter = TreeMeter(handle.pid)
        rss_samples.append((time.time(), *meter.rss()))
        sampler_stop = threading.Event()

        def sample_rss() -> None:
            while not sampler_stop.wait(0.5):
                rss_samples.append((time.time(), *meter.rss()))

        threading.Thread(target=sample_rss, daemon=True).start()
        if "drain" in cfg.phases or "enqueue" in cfg.phases:
            res["drain"] = _phase_drain(cfg, handle, meter, expected, progress, redis_pid)
        if "live" in cfg.phases:
            res["live"] = _phase_live(cfg, producer, handle, meter, expected, task_name, args, progress, redis_pid)
            expected += cfg.tasks
        sampler_stop.set()
        rss_samples.append((time.time(), *meter.rss()))
        handle.stop()
        res["memory"] = {
            "supervisor_rss_start": rss_samples[0][1], "supervisor_rss_end": rss_samples[-1][1],
            "supervisor_rss_max": max(s[1] for s in rss_samples),
            "children_rss_start": rss_samples[0][2], "children_rss_end": rss_samples[-1][2],
            "children_rss_max": max((max(s[2]) for s in rss_samples if s[2]), default=0),
            # supervisor RSS at 0%, 10%, ..., 100% of the run's samples (every 0.5 s): flat or growing?
            "supervisor_rss_timeline": [rss_samples[round(i * (len(rss_samples) - 1) / 10)][1] for i in range(11)],
            "note": ("in-process worker: the supervisor RSS includes the producer and the queue"
                     if handle.in_process else "worker process tree (supervisor, zygote, children)"),
        }
        res["worker_final"] = handle.final
        res["check"] = _check(cfg, r, side_key, expected, handle)
    finally:
        try:
            progress.close()
            handle.stop()
            producer.close()
        finally:   # whatever failed above, the run's keys / file / schema go
            _cleanup(cfg, run_id, r, broker, backend)
            r.close()
    res["machine"]["load_avg_end"] = os.getloadavg()
    return res


def _phase_enqueue(cfg: Config, producer: Stem, task_name: str, args: dict, progress: _Progress, *,
                   measure_single: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if measure_single and cfg.single:
        single_opts = TaskOptions(queue=SINGLE_QUEUE)
        bar = progress.add("enqueue (single)", cfg.single)
        t_cpu, t0 = time.thread_time(), time.perf_counter()
        for i in range(cfg.single):
            producer.enqueue(task_name, args, options=single_opts)
            if i % 256 == 0:
                progress.update(bar, i)
        dt, cpu = time.perf_counter() - t0, time.thread_time() - t_cpu
        progress.update(bar, cfg.single)
        producer.broker.purge(SINGLE_QUEUE)
        out.update(single_tasks=cfg.single, single_per_s=cfg.single / dt, single_cpu_us=_cpu_us(cpu, cfg.single))
    bar = progress.add("enqueue_many", cfg.tasks)
    items = [(task_name, args)] * cfg.batch
    t_cpu, t0 = time.thread_time(), time.perf_counter()
    done = 0
    while done < cfg.tasks:
        n = min(cfg.batch, cfg.tasks - done)
        producer.enqueue_many(items if n == cfg.batch else items[:n])
        done += n
        progress.update(bar, done)
    dt, cpu = time.perf_counter() - t0, time.thread_time() - t_cpu
    out.update(many_tasks=cfg.tasks, many_batch=cfg.batch, many_per_s=cfg.tasks / dt,
               many_cpu_us=_cpu_us(cpu, cfg.tasks))
    return out


def _xadd_reference(cfg: Config, run_id: str, producer: Stem, task_name: str, args: dict) -> dict[str, Any]:
    """``redis-benchmark -P 64`` XADD of entries shaped like stem's, right after stem's enqueue_many."""
    _env, message = producer._build(task_name, args, None, None, None, None, None, None, None, time.time())
    frame_size = len(message.frame)
    u = urlsplit(cfg.redis_url)
    db = int((u.path or "/0").lstrip("/") or 0)
    key = f"stembench-{run_id}:xadd-reference"
    cmd = ["XADD", key, "*", "t", uuid.uuid4().hex, "f", "x" * frame_size, "p", "0", "v", "0"]
    out: dict[str, Any] = {"frame_bytes": frame_size}
    try:
        out["redis_benchmark_xadd_p64_per_s"] = redis_benchmark(u.hostname or "127.0.0.1", u.port or 6379, db, cmd,
                                                               n=200_000)
        _delete(cfg.redis_url, key)
        out["redis_benchmark_xadd_p64_c1_per_s"] = redis_benchmark(u.hostname or "127.0.0.1", u.port or 6379, db,
                                                                  cmd, n=100_000, clients=1)
    finally:
        _delete(cfg.redis_url, key)
    return out


def _delete(url: str, key: str) -> None:
    with redis.Redis.from_url(url) as r:
        r.delete(key)


def _phase_drain(cfg: Config, handle: _WorkerHandle, meter: TreeMeter, expected: int, progress: _Progress,
                 redis_pid: int | None) -> dict[str, Any]:
    bar = progress.add("drain (pre-filled)", expected)
    sup0, kids0 = meter.cpu_split()
    rcpu0 = psutil.Process(redis_pid).cpu_times() if redis_pid else None
    t_done = handle.wait_for(expected, cfg.timeout, lambda n: progress.update(bar, n))
    sup1, kids1 = meter.cpu_split()
    cpu = sup1 + kids1 - sup0 - kids0
    out = {"tasks": expected, "startup_s": handle.t_ready - handle.t_start,
           "from_start_per_s": expected / (t_done - handle.t_start),
           "steady_per_s": steady_rate(handle.samples, expected),
           "worker_cpu_us": _cpu_us(cpu, expected),
           "supervisor_cpu_us": _cpu_us(sup1 - sup0, expected), "children_cpu_us": _cpu_us(kids1 - kids0, expected),
           "cpu_note": "from the worker's ready (children forked) to the last task"}
    if rcpu0 is not None:
        r1 = psutil.Process(redis_pid).cpu_times()
        out["redis_cpu_us"] = _cpu_us(r1.user + r1.system - rcpu0.user - rcpu0.system, expected)
    if handle.in_process:
        out["cpu_note"] = "in-process worker: whole process CPU (no producer runs in this phase)"
    return out


def _phase_live(cfg: Config, producer: Stem, handle: _WorkerHandle, meter: TreeMeter, before: int,
                task_name: str, args: dict, progress: _Progress, redis_pid: int | None) -> dict[str, Any]:
    bar = progress.add("live (produce+run)", cfg.tasks)
    box: dict[str, float] = {}
    items = [(task_name, args)] * cfg.live_batch
    errors: queue.SimpleQueue = queue.SimpleQueue()

    def produce() -> None:
        try:
            c0 = time.thread_time()
            done = 0
            while done < cfg.tasks:
                n = min(cfg.live_batch, cfg.tasks - done)
                producer.enqueue_many(items if n == cfg.live_batch else items[:n])
                done += n
            box["producer_cpu"] = time.thread_time() - c0
            box["t_produced"] = time.time()
        except BaseException as exc:  # noqa: BLE001
            errors.put(exc)

    sup0, kids0 = meter.cpu_split()
    rcpu0 = psutil.Process(redis_pid).cpu_times() if redis_pid else None
    t0 = time.time()
    th = threading.Thread(target=produce, name="bench-producer")
    th.start()
    t_done = handle.wait_for(before + cfg.tasks, cfg.timeout, lambda n: progress.update(bar, n - before))
    th.join()
    if not errors.empty():
        raise errors.get()
    sup1, kids1 = meter.cpu_split()
    sup = sup1 - sup0
    if handle.in_process:
        sup -= box["producer_cpu"]
    cpu = sup + kids1 - kids0
    samples = [(t, n - before) for t, n in handle.samples if t >= t0]
    out = {"tasks": cfg.tasks, "live_batch": cfg.live_batch, "per_s": cfg.tasks / (t_done - t0),
           "steady_per_s": steady_rate(samples, cfg.tasks), "producer_s": box["t_produced"] - t0,
           "producer_cpu_us": _cpu_us(box["producer_cpu"], cfg.tasks), "worker_cpu_us": _cpu_us(cpu, cfg.tasks),
           "supervisor_cpu_us": _cpu_us(sup, cfg.tasks), "children_cpu_us": _cpu_us(kids1 - kids0, cfg.tasks)}
    if rcpu0 is not None:
        r1 = psutil.Process(redis_pid).cpu_times()
        out["redis_cpu_us"] = _cpu_us(r1.user + r1.system - rcpu0.user - rcpu0.system, cfg.tasks)
    if handle.in_process:
        out["cpu_note"] = "in-process worker: process CPU minus the producer thread's"
    return out


def _check(cfg: Config, r: redis.Redis, side_key: str, expected: int, handle: _WorkerHandle) -> dict[str, Any]:
    """No task missing, none run twice."""
    out: dict[str, Any] = {"expected": expected, "worker_processed": handle.final.get("processed"),
                           "worker_failed": handle.final.get("failed"),
                           "worker_dead_lettered": handle.final.get("dead_lettered")}
    if cfg.task == "check":
        values = [int(v) for v in r.hvals(side_key + ":seen")]
        out.update(distinct_ids=len(values), ran_twice=sum(1 for v in values if v > 1),
                   missing=expected - len(values))
        out["ok"] = out["missing"] == 0 and out["ran_twice"] == 0 and out["worker_processed"] == expected
    elif cfg.task == "incr":
        count = int(r.get(side_key + ":count") or 0)
        out.update(incr_count=count, ok=count == expected and out["worker_processed"] == expected)
    else:
        out["ok"] = out["worker_processed"] == expected
    return out


def _cleanup(cfg: Config, run_id: str, r: redis.Redis, broker, backend) -> None:
    for closeable in (broker, backend):
        try:
            closeable.close()
        except Exception:  # noqa: BLE001
            pass
    drop_keys(r, f"stembench-{run_id}*")
    if cfg.broker == "sqlite":
        base = os.path.join(tempfile.gettempdir(), f"stembench-{run_id}.db")
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(base + suffix)
            except FileNotFoundError:
                pass
    elif cfg.broker == "postgres":
        import psycopg
        with psycopg.connect(cfg.postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "stembench_{run_id}" CASCADE')


# -- output ----------------------------------------------------------------------------------------------

def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}{unit}" if abs(v) >= 100 else f"{v:,.2f}{unit}"
    return f"{v:,}{unit}"


def rows(res: dict[str, Any]) -> list[tuple[str, str]]:
    e, d, lv, m, c = (res.get(k, {}) for k in ("enqueue", "drain", "live", "memory", "check"))
    out = []
    if e:
        if e.get("single_per_s"):
            out += [("enqueue, one by one (tasks/s)", _fmt(e.get("single_per_s"))),
                    ("  producer CPU (µs/task)", _fmt(e.get("single_cpu_us")))]
        out += [(f"enqueue_many x{e.get('many_batch')} (tasks/s)", _fmt(e.get("many_per_s"))),
                ("  producer CPU (µs/task)", _fmt(e.get("many_cpu_us")))]
        if e.get("redis_benchmark_xadd_p64_per_s"):
            xr = e["redis_benchmark_xadd_p64_per_s"]
            out += [(f"redis-benchmark -P 64 XADD, {e['frame_bytes']} B (req/s)", _fmt(xr)),
                    ("  enqueue_many / that", f"{e['many_per_s'] / xr:.0%}"),
                    ("redis-benchmark -P 64 -c 1 XADD (req/s)", _fmt(e.get("redis_benchmark_xadd_p64_c1_per_s")))]
            if e.get("redis_benchmark_xadd_p64_c1_per_s"):   # one connection, as the producer uses
                out.append(("  enqueue_many / that", f"{e['many_per_s'] / e['redis_benchmark_xadd_p64_c1_per_s']:.0%}"))
    if d:
        out += [("worker startup (s)", _fmt(d["startup_s"])),
                ("drain from worker start (tasks/s)", _fmt(d["from_start_per_s"])),
                ("drain steady state (tasks/s)", _fmt(d["steady_per_s"])),
                ("  worker tree CPU (µs/task)", _fmt(d["worker_cpu_us"])),
                ("    supervisor / children", f"{_fmt(d['supervisor_cpu_us'])} / {_fmt(d['children_cpu_us'])}"),
                ("  redis-server CPU (µs/task)", _fmt(d.get("redis_cpu_us")))]
    if lv:
        out += [(f"end-to-end live, batches of {lv['live_batch']} (tasks/s)", _fmt(lv["per_s"])),
                ("  live steady state (tasks/s)", _fmt(lv["steady_per_s"])),
                ("  producer CPU (µs/task)", _fmt(lv["producer_cpu_us"])),
                ("  worker tree CPU (µs/task)", _fmt(lv["worker_cpu_us"])),
                ("    supervisor / children", f"{_fmt(lv['supervisor_cpu_us'])} / {_fmt(lv['children_cpu_us'])}"),
                ("  redis-server CPU (µs/task)", _fmt(lv.get("redis_cpu_us")))]
    if m:
        mb = 2 ** 20
        out += [("supervisor RSS start / end / max (MiB)",
                 f"{m['supervisor_rss_start'] / mb:.1f} / {m['supervisor_rss_end'] / mb:.1f} / "
                 f"{m['supervisor_rss_max'] / mb:.1f}"),
                ("supervisor RSS at 0, 10, ..., 100% of the run (MiB)",
                 " ".join(f"{x / mb:.1f}" for x in m.get("supervisor_rss_timeline", []))),
                ("children RSS at end (MiB)", ", ".join(f"{x / mb:.1f}" for x in m["children_rss_end"]) or "-")]
    if c:
        detail = (f"{c.get('distinct_ids')} ids, {c.get('missing')} missing, {c.get('ran_twice')} twice"
                  if "distinct_ids" in c else f"processed {c.get('worker_processed')} of {c['expected']}")
        out.append(("exactly once", ("OK: " if c["ok"] else "FAILED: ") + detail))
    return out


def print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    cfg = res["config"]
    runs = res.get("runs")
    title = (f"{'median of %d runs: ' % runs if isinstance(runs, int) else ''}stem e2e: {cfg['tasks']:,} x bench.{cfg['task']}, payload {cfg['payload']}, broker {cfg['broker']}, "
             f"{cfg['isolation']} x{cfg['concurrency']}, signing {'on' if cfg['signing'] else 'off'}, "
             f"results {'stored' if cfg['results'] else 'off'}, impl {res.get('implementation')}, "
             f"rev {res.get('revision')}")
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in rows(res):
        table.add_row(k, v)
    Console(width=max(Console().width, 110)).print(table)


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="e2e.py", description=__doc__.split("\n\n")[0])
    d = Config()
    p.add_argument("--tasks", type=int, default=d.tasks, help="tasks per phase (default %(default)s)")
    p.add_argument("--payload", choices=("none", "1k"), default=d.payload)
    p.add_argument("--broker", choices=("memory", "sqlite", "redis", "postgres"), default=d.broker)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--isolation", choices=("process", "inline"), default=d.isolation)
    p.add_argument("--prefetch-multiplier", type=int, default=None)
    p.add_argument("--no-signing", dest="signing", action="store_false")
    p.add_argument("--no-results", dest="results", action="store_false",
                   help="fire-and-forget: producer backend=None, worker store_results=False")
    p.add_argument("--task", choices=("check", "incr", "noop"), default=d.task)
    p.add_argument("--phases", default=",".join(d.phases), help="comma-separated: enqueue,drain,live")
    p.add_argument("--single", type=int, default=d.single, help="tasks for the one-by-one enqueue rate")
    p.add_argument("--batch", type=int, default=d.batch, help="enqueue_many batch in the enqueue phase")
    p.add_argument("--live-batch", type=int, default=d.live_batch, help="enqueue_many batch in the live phase")
    p.add_argument("--redis-url", default=d.redis_url)
    p.add_argument("--postgres-url", default=d.postgres_url)
    p.add_argument("--no-redis-benchmark", dest="redis_benchmark", action="store_false")
    p.add_argument("--timeout", type=float, default=d.timeout)
    p.add_argument("--repeat", type=int, default=1, help="run N times; the table shows each run and the median")
    p.add_argument("--json", action="store_true", help="print the results as JSON (one object, or a list)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--worker-process", metavar="RUN_ID", help=argparse.SUPPRESS)
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.config_json:
        cfg = Config(**json.loads(ns.config_json))
        cfg.phases = tuple(cfg.phases)
        return cfg, ns
    cfg = Config(tasks=ns.tasks, payload=ns.payload, broker=ns.broker, concurrency=ns.concurrency,
                 isolation=ns.isolation, prefetch_multiplier=ns.prefetch_multiplier, signing=ns.signing,
                 results=ns.results, task=ns.task, phases=tuple(x for x in ns.phases.split(",") if x),
                 single=ns.single, batch=ns.batch, live_batch=ns.live_batch, redis_url=ns.redis_url,
                 postgres_url=ns.postgres_url, redis_benchmark=ns.redis_benchmark, timeout=ns.timeout,
                 progress=ns.progress and sys.stderr.isatty())
    return cfg, ns


def _median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median of the numeric figures of several runs."""
    import statistics
    med: dict[str, Any] = {"config": results[0]["config"], "implementation": results[0].get("implementation"),
                           "revision": results[0].get("revision"),
                           "runs": len(results)}
    for section in ("enqueue", "drain", "live", "memory"):
        if section not in results[0]:
            continue
        med[section] = {}
        for k, v in results[0][section].items():
            vals = [r[section].get(k) for r in results]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and all(
                    isinstance(x, (int, float)) for x in vals):
                med[section][k] = statistics.median(vals)
            else:
                med[section][k] = v
    med["check"] = {"ok": all(r["check"]["ok"] for r in results), "expected": results[0]["check"]["expected"],
                    "worker_processed": results[0]["check"].get("worker_processed")}
    return med


def main(argv: list[str] | None = None) -> int:
    cfg, ns = parse_args(argv)
    if ns.worker_process:
        return _worker_process(cfg, ns.worker_process)
    results = [run(cfg) for _ in range(max(1, ns.repeat))]
    if ns.json:
        out = results[0] if len(results) == 1 else {"runs": results, "median": _median_result(results)}
        print(json.dumps(out, indent=2, default=str))
    else:
        for res in results:
            print_table(res)
        if len(results) > 1:
            print_table(_median_result(results))
    return 0 if all(r["check"]["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
