"""Process engine vs inline engine, end to end on the in-memory broker, and the cost of replacing a child.

    .venv/bin/python benchmarks/engine.py [--tasks 100000] [--runs 3]

Prints one JSON line per measurement and a summary; the figures in
benchmarks/README.md ("Process engine") come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stem import IMPLEMENTATION, Stem, TaskRegistry, Worker, WorkerLifecycleConfig  # noqa: E402
from stem.backends import InMemoryResultBackend  # noqa: E402
from stem.brokers import InMemoryBroker  # noqa: E402

registry = TaskRegistry()
registry.task("noop")(lambda ctx: None)


def throughput(tasks: int, isolation: str, concurrency: int = 2) -> float:
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    stem = Stem(broker, backend, registry)
    for start in range(0, tasks, 1000):
        stem.enqueue_many([("noop", {})] * min(1000, tasks - start))
    worker = Worker(broker, backend, registry, concurrency=concurrency, isolation=isolation,
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
    t0 = time.perf_counter()
    worker.run_in_background(burst=True)
    worker.join(3600)
    elapsed = time.perf_counter() - t0
    done = worker.stats()["succeeded"]
    assert done == tasks, f"{done} of {tasks} succeeded"
    return tasks / elapsed


def replacement_ms(start_method: str, tasks: int) -> float:
    """Median ms from asking for a child to its READY, with every task recycling its child."""
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    stem = Stem(broker, backend, registry)
    stem.enqueue_many([("noop", {})] * tasks)
    worker = Worker(broker, backend, registry if start_method == "fork" else "benchmarks.engine:registry",
                    concurrency=1, isolation="process", start_method=start_method,
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False, max_tasks_per_child=1))
    worker.run_in_background(burst=True)
    worker.join(3600)
    samples = list(worker._engine._replace_ms)
    return statistics.median(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    out = {"implementation": IMPLEMENTATION, "tasks": args.tasks, "cpus": os.cpu_count()}
    for isolation in ("inline", "process"):
        runs = [throughput(args.tasks, isolation) for _ in range(args.runs)]
        out[f"{isolation}_tasks_per_s"] = statistics.median(runs)
        print(json.dumps({"isolation": isolation, "runs": [round(r) for r in runs]}), flush=True)
    out["process_over_inline"] = out["process_tasks_per_s"] / out["inline_tasks_per_s"]
    out["replace_fork_ms"] = replacement_ms("fork", 200)
    out["replace_spawn_ms"] = replacement_ms("spawn", 10)
    out["spawn_over_fork"] = out["replace_spawn_ms"] / out["replace_fork_ms"]
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
