"""What the yielding supervisor (``SCHED_BATCH``, ``Worker(yield_cpu=...)``) costs when the
children keep every CPU busy: CPU-bound tasks fed at ~80% of the children's capacity,
enqueue-to-finish latency and the total time, with and without it::

    .venv/bin/python benchmarks/cpu_latency.py --yield-cpu on  --tasks 300 --ms 10
    .venv/bin/python benchmarks/cpu_latency.py --yield-cpu off --tasks 300 --ms 10

Run the two alternately, a few times each: one run is noise on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import drop_keys  # noqa: E402
from stem import Stem, TaskOptions, TaskRegistry, Worker, WorkerLifecycleConfig
from stem.backends.redis import RedisResultBackend
from stem.brokers.redis import RedisBroker

registry = TaskRegistry()


@registry.task("bench.spin", options=TaskOptions(queue="bench"))
def spin(ctx, ms: float) -> float:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return time.time()


def run(url: str, yield_cpu: bool, tasks: int, ms: float, concurrency: int) -> str:
    ns = f"stembench-lat-{uuid.uuid4().hex[:8]}"
    broker, backend = RedisBroker(url, namespace=ns), RedisResultBackend(url, namespace=ns)
    producer = Stem(broker, backend, registry)
    worker = Worker(broker, backend, registry, queues=["bench"], concurrency=concurrency, prefetch_multiplier=4,
                    yield_cpu=yield_cpu, lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
    worker.run_in_background()
    try:
        gap = ms / 1000 / concurrency / 0.8   # a steady stream at ~80% of capacity: latency, not backlog
        t0 = time.time()
        sent, ids = [], []
        for _ in range(tasks):
            sent.append(time.time())
            ids.append(producer.enqueue("bench.spin", {"ms": ms}))
            time.sleep(gap)
        done = [producer.wait_for_task(i, timeout=120) for i in ids]
        total = time.time() - t0
    finally:
        worker.shutdown(timeout=30)
        drop_keys(broker.store.client, ns + "*")
    lat = sorted((s.finished_at - t) * 1000 for s, t in zip(done, sent))

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p))]

    return (f"yield_cpu={'on' if yield_cpu else 'off'}: {tasks} x {ms:g} ms tasks, {concurrency} children, "
            f"{total:.2f} s in all; enqueue->finish ms p50 {pct(0.5):.2f} p90 {pct(0.9):.2f} p99 {pct(0.99):.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--yield-cpu", choices=("on", "off"), default="on")
    p.add_argument("--tasks", type=int, default=300)
    p.add_argument("--ms", type=float, default=10.0, help="CPU time of each task")
    p.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    p.add_argument("--redis-url", default=os.environ.get("STEM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ns = p.parse_args(argv)
    print(run(ns.redis_url, ns.yield_cpu == "on", ns.tasks, ns.ms, ns.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
