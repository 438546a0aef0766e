"""End-to-end throughput on a local Redis: enqueue_many, then one worker drains the queue.

    .venv/bin/python benchmarks/redis_e2e.py [--tasks 20000] [--concurrency 2] [--url redis://127.0.0.1:6379/0]

20,000 no-op tasks are enqueued with ``Stem.enqueue_many`` (signed, HMAC-SHA256),
then one ``Worker`` (process engine, ``concurrency`` children, signing on) runs
them in burst mode until the queue is empty; every result is stored in the
Redis result backend.  Both rates are reported next to
``redis-benchmark -P 64 -t lpush -n 200000 -q`` measured in the same run
against the same server (in ``--bench-db``, whose ``mylist`` key is deleted
afterwards), as a ratio: how close stem gets to what this Redis can do.
Everything the run writes lives under a fresh namespace, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stem  # noqa: E402
from _measure import drop_keys  # noqa: E402
from stem import PayloadSigner, Stem, TaskRegistry, Worker, WorkerLifecycleConfig
from stem.backends.redis import RedisResultBackend
from stem.brokers.redis import RedisBroker

registry = TaskRegistry()


@registry.task("noop")
def noop(ctx):
    return None


def redis_benchmark_lpush(url: str, db: int, n: int = 200_000) -> float:
    """LPUSH requests/s from ``redis-benchmark -P 64 -t lpush -n N -q``."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark is not on PATH")
    u = urlsplit(url)
    out = subprocess.run([exe, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "--dbnum", str(db),
                          "-P", "64", "-t", "lpush", "-n", str(n), "-q"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    client = redis.Redis(host=u.hostname or "127.0.0.1", port=u.port or 6379, db=db)
    client.delete("mylist")
    client.close()
    m = re.search(r"LPUSH:\s*([\d.]+)\s*requests per second", out.replace("\r", "\n"))
    if m is None:
        raise SystemExit(f"could not read redis-benchmark output: {out!r}")
    return float(m.group(1))


def _time_calls(obj, names, acc) -> None:
    """Wrap ``obj``'s methods to add (calls, seconds) per name into ``acc``."""
    for name in names:
        fn = getattr(obj, name)

        def timed(*a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                entry = acc.setdefault(_name, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - t

        setattr(obj, name, timed)


def run(url: str, tasks: int, concurrency: int, isolation: str = "process", breakdown: bool = False) -> dict:
    namespace = "bench_" + uuid.uuid4().hex[:8]
    signer = PayloadSigner({"bench": b"benchmark-signing-key-32-bytes!!"})
    broker = RedisBroker.from_url(url, namespace=namespace)
    backend = RedisResultBackend.from_url(url, namespace=namespace)
    producer = Stem(broker, backend, registry, signer)
    try:
        broker.ping()
        t0 = time.perf_counter()
        ids = producer.enqueue_many([("noop", {})] * tasks)
        enqueue_s = time.perf_counter() - t0
        assert len(ids) == tasks and broker.stats("default").ready == tasks

        calls: dict[str, list] = {}
        if breakdown:
            _time_calls(broker, ("consume", "ack", "extend"), calls)
            _time_calls(backend, ("store_many", "revoked"), calls)
        worker = Worker(broker, backend, registry, queues=["default"], concurrency=concurrency, signer=signer,
                        isolation=isolation, lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
        t0 = time.perf_counter()
        worker.run_in_background(burst=True)
        if not worker.join(600):
            raise SystemExit("the worker did not drain the queue within 600 s")
        process_s = time.perf_counter() - t0
        done = worker.stats()["succeeded"]
        sample = backend.get_many(ids[:: max(tasks // 100, 1)])
        assert done == tasks and all(s is not None and s.succeeded for s in sample), (done, sample[:3])
        return {"tasks": tasks, "concurrency": concurrency, "enqueue_s": enqueue_s, "process_s": process_s,
                "isolation": worker.isolation,
                "worker_calls": {k: {"calls": n, "mean_us": t / n * 1e6} for k, (n, t) in calls.items()}}
    finally:
        producer.close()
        client = redis.Redis.from_url(url)
        drop_keys(client, namespace + ":*")
        client.close()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--isolation", choices=("process", "inline"), default="process")
    ap.add_argument("--breakdown", action="store_true",
                    help="time the worker's broker/backend calls (mean wall time per call, GIL waits included)")
    ap.add_argument("--bench-db", type=int, default=15, help="database redis-benchmark writes its key into")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    lpush = redis_benchmark_lpush(args.url, args.bench_db)
    r = run(args.url, args.tasks, args.concurrency, args.isolation, args.breakdown)
    enqueue_rate, process_rate = r["tasks"] / r["enqueue_s"], r["tasks"] / r["process_s"]
    figures = {**r, "implementation": stem.IMPLEMENTATION, "python": sys.version.split()[0],
               "redis_benchmark_lpush_per_s": lpush,
               "enqueue_per_s": enqueue_rate, "process_per_s": process_rate,
               "enqueue_ratio": enqueue_rate / lpush, "process_ratio": process_rate / lpush}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"redis-benchmark -P 64 -t lpush: {lpush:12,.0f} req/s")
        print(f"enqueue_many ({r['tasks']:,} signed): {enqueue_rate:12,.0f} tasks/s  "
              f"ratio {enqueue_rate / lpush:.3f}")
        print(f"worker (concurrency {r['concurrency']}, {r['isolation']}): {process_rate:12,.0f} tasks/s  "
              f"ratio {process_rate / lpush:.3f}")
        for name, c in r["worker_calls"].items():
            print(f"  worker {name:10} {c['calls']:7,} calls  {c['mean_us']:8,.0f} us/call")
        print(f"implementation={stem.IMPLEMENTATION} python={figures['python']}")
    return figures


if __name__ == "__main__":
    main()
