"""Redis Cluster against a single Redis, in one run: enqueue_many and consume+ack rates.

    .venv/bin/python benchmarks/cluster.py [--tasks 20000] [--queues 8] [--procs 1,2] [--repeat 3] [--json]

Starts its own servers on free ports (``tests.support``): one redis-server, and a Redis
Cluster of three primaries without replicas, all on this machine, none persisting (no
AOF, no RDB), so both sides do the same work.  For each target, each ``--procs`` count P
and each of ``--repeat`` rounds (median reported):

* enqueue: P processes each ``Stem.enqueue_many`` ``--tasks`` / P no-op tasks (unsigned, no
  result backend) in batches of 1,000, every batch spread round robin over ``--queues``
  queues (whose hash tags land on every primary);
* consume+ack: then P processes each loop ``consume(all queues, 100)`` + ``ack`` until
  every task was acked;
* worker (once per round, not per P): ``--tasks`` no-op tasks enqueued with a result
  backend on the same URL, then one ``Worker`` (process engine, ``--concurrency``
  children, all the queues) drains them in burst mode, storing every result: the
  fused settle path (results, then acks and the refill consume; on the cluster the
  acks wait behind a ``BARRIER`` for the results).

Rates are tasks per second of wall clock, from the moment every process is ready to the
moment the last one is done.  The namespace is fresh per round; the servers are killed
at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stem import Stem, TaskOptions, TaskRegistry, Worker, WorkerLifecycleConfig  # noqa: E402
from stem.backends import from_url as backend_from_url  # noqa: E402
from stem.brokers import from_url  # noqa: E402
from tests.support import ClusterSetup, RedisServer  # noqa: E402

registry = TaskRegistry()


@registry.task("noop")
def noop(ctx):
    return None


def _queues(n: int) -> list[str]:
    return [f"bench-{i}" for i in range(n)]


def _enqueue(url: str, ns: str, n: int, queues: list[str], ready, go, done) -> None:
    stem = Stem(from_url(url, namespace=ns), None, registry)
    options = [TaskOptions(queue=q) for q in queues]
    batches = []
    for start in range(0, n, 1000):
        batches.append([("noop", {}, options[i % len(options)]) for i in range(start, min(n, start + 1000))])
    ready.release()
    go.wait()
    for batch in batches:
        stem.enqueue_many(batch)
    done.release()
    stem.close()


def _drain(url: str, ns: str, queues: list[str], total: int, ready, go, done, counter) -> None:
    """Consume and ack until the processes together acked ``total``."""
    broker = from_url(url, namespace=ns)
    ready.release()
    go.wait()
    while counter.value < total:
        got = broker.consume(queues, 100, 0.05)
        if got:
            broker.ack(got)
            with counter.get_lock():
                counter.value += len(got)
    done.release()
    broker.close()


def _timed(target, args_for, procs: int) -> float:
    """Seconds from every process ready to the last one done."""
    ctx = multiprocessing.get_context("fork")
    ready, done, go = ctx.Semaphore(0), ctx.Semaphore(0), ctx.Event()
    ps = [ctx.Process(target=target, args=(*args_for(i), ready, go, done)) for i in range(procs)]
    for p in ps:
        p.start()
    for _ in ps:
        ready.acquire()
    t0 = time.perf_counter()
    go.set()
    for _ in ps:
        done.acquire()
    elapsed = time.perf_counter() - t0
    for p in ps:
        p.join(30)
        if p.exitcode != 0:
            raise SystemExit(f"a benchmark process failed (exit {p.exitcode})")
    return elapsed


def one_round(url: str, tasks: int, queues: list[str], procs: int) -> tuple[float, float]:
    ns = "benchc_" + uuid.uuid4().hex[:8]
    per = tasks // procs
    enq = _timed(_enqueue, lambda i: (url, ns, per, queues[i % len(queues):] + queues[:i % len(queues)]), procs)
    counter = multiprocessing.get_context("fork").Value("q", 0)

    def drain(url_, ns_, queues_, ready, go, done):
        _drain(url_, ns_, queues_, per * procs, ready, go, done, counter)

    deq = _timed(drain, lambda i: (url, ns, queues), procs)
    if counter.value != per * procs:
        raise SystemExit(f"drained {counter.value} of {per * procs}")
    broker = from_url(url, namespace=ns)
    for q in queues:
        broker.delete_queue(q)
    broker.close()
    return per * procs / enq, per * procs / deq


def worker_round(url: str, tasks: int, queues: list[str], concurrency: int) -> float:
    """Tasks per second one Worker drains, results stored (see the module docstring)."""
    ns = "benchw_" + uuid.uuid4().hex[:8]
    broker, backend = from_url(url, namespace=ns), backend_from_url(url, namespace=ns)
    stem = Stem(broker, backend, registry)
    options = [TaskOptions(queue=q) for q in queues]
    try:
        for start in range(0, tasks, 1000):
            stem.enqueue_many([("noop", {}, options[i % len(options)]) for i in range(start, min(tasks, start + 1000))])
        worker = Worker(broker, backend, registry, queues=queues, concurrency=concurrency,
                        lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
        t0 = time.perf_counter()
        worker.run_in_background(burst=True)
        if not worker.join(600):
            raise SystemExit("the worker did not drain the queues within 600 s")
        elapsed = time.perf_counter() - t0
        if worker.stats()["succeeded"] != tasks:
            raise SystemExit(f"the worker ran {worker.stats()['succeeded']} of {tasks}")
        for q in queues:
            broker.delete_queue(q)
        return tasks / elapsed
    finally:
        stem.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--queues", type=int, default=8)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=2, help="the worker's children")
    ap.add_argument("--no-worker", action="store_true", help="skip the worker phase")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    procs_list = [int(p) for p in args.procs.split(",")]
    queues = _queues(args.queues)
    tmp = tempfile.mkdtemp(prefix="stem-cluster-bench-")
    single = RedisServer(os.path.join(tmp, "single"), args=["--appendonly", "no", "--appendfsync", "everysec"])
    os.makedirs(single.dir, exist_ok=True)
    cluster = ClusterSetup(os.path.join(tmp, "cluster"), masters=3, replicas=0)
    results: dict = {}
    try:
        single.start()
        cluster.start()
        probe = from_url(cluster.url(), namespace="benchc")
        with cluster.client() as c:
            spread = {c.get_node_from_key(probe.queue_keys(q)[0]).name for q in queues}
        probe.close()
        if not args.json:
            print(f"{len(queues)} queues on {len(spread)} of 3 primaries; {args.tasks} tasks per round", flush=True)
        targets = {"single": f"redis://127.0.0.1:{single.port}/0", "cluster": cluster.url()}
        if not args.no_worker:
            for name, url in targets.items():
                rate = statistics.median(worker_round(url, args.tasks, queues, args.concurrency)
                                         for _ in range(args.repeat))
                results[f"{name} worker"] = {"worker_per_s": rate}
                if not args.json:
                    print(f"{name:8} worker (concurrency {args.concurrency}, results stored): {rate:>9,.0f} tasks/s",
                          flush=True)
        for procs in procs_list:
            for name, url in targets.items():
                rounds = [one_round(url, args.tasks, queues, procs) for _ in range(args.repeat)]
                results[f"{name} x{procs}"] = {
                    "enqueue_per_s": statistics.median(r[0] for r in rounds),
                    "consume_ack_per_s": statistics.median(r[1] for r in rounds)}
                if not args.json:
                    r = results[f"{name} x{procs}"]
                    print(f"{name:8} {procs} proc: enqueue_many {r['enqueue_per_s']:>9,.0f}/s   "
                          f"consume+ack {r['consume_ack_per_s']:>9,.0f}/s", flush=True)
    finally:
        cluster.stop()
        single.kill()
    if args.json:
        print(json.dumps({"tasks": args.tasks, "queues": args.queues, "primaries_used": len(spread),
                          "load": os.getloadavg(), **results}))


if __name__ == "__main__":
    main()
