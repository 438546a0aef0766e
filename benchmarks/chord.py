"""A chord of N members against plain ``enqueue_many`` of the same tasks, in one run.

    .venv/bin/python benchmarks/chord.py [--n 100000] [--url redis://127.0.0.1:6379/10] [--isolation inline]

Rounds (``--repeat``, interleaved; medians reported) on one Redis (a namespace of their own, removed afterwards):

* ``plain``: ``enqueue_many`` of N ``bench.noop`` tasks (the uniform fast path), then a burst
  worker drains them;
* ``chord``: ``stem.apply(chord(group(N bench.noop signatures), bench.total))``, then a burst
  worker runs the members and the callback (which reads the N results page by page).

Figures: the enqueue call's wall time (per task), and the worker process's CPU time (user +
system, from ``getrusage(RUSAGE_CHILDREN)`` once the burst worker exited) per task; the
chord's figures over the plain ones are the ratios (targets: enqueue <= 1.3x, worker CPU per
task <= 1.2x).  Each worker is a fresh process (``--worker``), so neither round warms the
other's caches.  ``--isolation inline`` (default) runs the tasks in the worker process itself,
so its CPU time is all of the worker's work; ``process`` adds the children's (reaped at exit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stem import Stem, TaskRegistry  # noqa: E402
from stem.canvas import Signature, chord, group  # noqa: E402

registry = TaskRegistry()


@registry.task("bench.noop")
def noop(ctx, i):
    return i


@registry.task("bench.total")
def total(ctx):
    return sum(ctx.previous)


def _open(url: str, namespace: str) -> Stem:
    from stem.backends import from_url as backend_from_url
    from stem.brokers import from_url as broker_from_url
    return Stem(broker_from_url(url, namespace=namespace), backend_from_url(url, namespace=namespace), registry)


def worker_main(config: dict) -> None:
    from stem import Worker, WorkerLifecycleConfig
    from stem.backends import from_url as backend_from_url
    from stem.brokers import from_url as broker_from_url
    url, ns = config["url"], config["namespace"]
    w = Worker(broker_from_url(url, namespace=ns), backend_from_url(url, namespace=ns), "benchmarks.chord:registry",
               concurrency=config["concurrency"], isolation=config["isolation"],
               lifecycle=WorkerLifecycleConfig(install_signal_handlers=False), heartbeat_interval=30.0)
    w.start(burst=True)


def _drain(url: str, namespace: str, concurrency: int, isolation: str) -> tuple[float, float]:
    """Run a burst worker process; (its CPU seconds, wall seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    config = {"url": url, "namespace": namespace, "concurrency": concurrency, "isolation": isolation}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "benchmarks.chord", "--worker", json.dumps(config)], check=True, cwd=root)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def run(url: str, n: int, concurrency: int, isolation: str, repeat: int) -> dict:
    namespace = "stembench_" + uuid.uuid4().hex[:8]
    stem = _open(url, namespace)
    rounds: list[dict] = []
    try:
        for _ in range(repeat):          # interleaved: a load change hits both kinds alike
            items = [("bench.noop", {"i": i}) for i in range(n)]
            t0 = time.perf_counter()
            stem.enqueue_many(items)
            plain_enqueue = time.perf_counter() - t0
            plain_cpu, plain_wall = _drain(url, namespace, concurrency, isolation)

            # built before the clock starts, as the plain round's items are
            canvas = chord(group(Signature("bench.noop", {"i": i}) for i in range(n)), Signature("bench.total"))
            t0 = time.perf_counter()
            h = stem.apply(canvas)
            chord_enqueue = time.perf_counter() - t0
            chord_cpu, chord_wall = _drain(url, namespace, concurrency, isolation)
            status = h.wait(60)
            assert status.result == n * (n - 1) // 2, status
            rounds.append({"plain_enqueue": plain_enqueue, "plain_cpu": plain_cpu, "plain_wall": plain_wall,
                           "chord_enqueue": chord_enqueue, "chord_cpu": chord_cpu, "chord_wall": chord_wall})
    finally:
        import redis
        with redis.Redis.from_url(url) as client:
            keys = list(client.scan_iter(f"{namespace}:*", count=10_000))
            for i in range(0, len(keys), 10_000):
                client.delete(*keys[i:i + 10_000])
        stem.close()
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {
        "n": n, "isolation": isolation, "concurrency": concurrency, "rounds": len(rounds),
        "plain": {"enqueue_us_per_task": med["plain_enqueue"] / n * 1e6,
                  "worker_cpu_us_per_task": med["plain_cpu"] / n * 1e6, "worker_wall_s": med["plain_wall"]},
        "chord": {"enqueue_us_per_task": med["chord_enqueue"] / n * 1e6,
                  "worker_cpu_us_per_task": med["chord_cpu"] / n * 1e6, "worker_wall_s": med["chord_wall"]},
        "enqueue_ratio": med["chord_enqueue"] / med["plain_enqueue"],
        "worker_cpu_ratio": med["chord_cpu"] / med["plain_cpu"],
        "per_round": [{"enqueue_ratio": r["chord_enqueue"] / r["plain_enqueue"],
                       "worker_cpu_ratio": r["chord_cpu"] / r["plain_cpu"]} for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--isolation", choices=("inline", "process"), default="inline")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    out = run(args.url, args.n, args.concurrency, args.isolation, args.repeat)
    print(json.dumps(out, indent=2))
    print(f"enqueue: chord {out['enqueue_ratio']:.2f}x plain (target <= 1.3x); "
          f"worker CPU per task: chord {out['worker_cpu_ratio']:.2f}x plain (target <= 1.2x)")


if __name__ == "__main__":
    main()
