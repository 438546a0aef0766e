"""End-to-end throughput on SQLite and PostgreSQL: enqueue_many, then one worker drains the queue.

    .venv/bin/python benchmarks/sql_e2e.py [--tasks 20000] [--concurrency 2] [--prefetch-multiplier 2]
        [--isolation process|inline] [--adapters sqlite,postgres] [--postgres-url URL] [--breakdown] [--json]

For each adapter: 20,000 no-op tasks are enqueued with ``Stem.enqueue_many``
(HMAC-SHA256 signed), then one ``Worker`` (``concurrency`` children, signing
on) runs them in burst mode until the queue is empty; every result is stored
in the same adapter's result backend (same file / same schema).  Reported:
enqueue tasks/s, worker tasks/s and end to end (tasks / (enqueue + drain
time)).  SQLite runs on a fresh file in a temporary directory; Postgres in a
fresh schema, dropped at the end.  ``--breakdown`` times the worker's broker
and backend calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid

import stem
from stem import PayloadSigner, Stem, TaskRegistry, Worker, WorkerLifecycleConfig
from stem.backends import from_url as backend_from_url
from stem.brokers import from_url as broker_from_url

registry = TaskRegistry()


@registry.task("noop")
def noop(ctx):
    return None


def _time_calls(obj, names, calls: dict) -> None:
    for name in names:
        fn = getattr(obj, name)

        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            result = None
            try:
                result = _fn(*a, **k)
                return result
            finally:
                entry = calls.setdefault(_name, [0, 0.0, 0])
                entry[0] += 1
                entry[1] += time.perf_counter() - t0
                items = result if _name == "consume" else (a[0] if a else None)   # deliveries / ids / statuses
                if isinstance(items, (list, tuple, set)):
                    entry[2] += len(items)

        setattr(obj, name, timed)


def run(url: str, tasks: int, concurrency: int, prefetch_multiplier: int, isolation: str,
        breakdown: bool = False) -> dict:
    signer = PayloadSigner({"bench": b"benchmark-signing-key-32-bytes!!"})
    broker, backend = broker_from_url(url), backend_from_url(url)
    producer = Stem(broker, backend, registry, signer)
    try:
        broker.migrate()
        t0 = time.perf_counter()
        ids = producer.enqueue_many([("noop", {})] * tasks)
        enqueue_s = time.perf_counter() - t0
        assert len(ids) == tasks and broker.stats("default").ready == tasks

        calls: dict[str, list] = {}
        if breakdown:
            _time_calls(broker, ("consume", "ack", "extend"), calls)
            _time_calls(backend, ("store_many", "revoked"), calls)
        worker = Worker(broker, backend, registry, queues=["default"], concurrency=concurrency,
                        prefetch_multiplier=prefetch_multiplier, signer=signer, isolation=isolation,
                        lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
        t0 = time.perf_counter()
        worker.run_in_background(burst=True)
        if not worker.join(600):
            raise SystemExit("the worker did not drain the queue within 600 s")
        process_s = time.perf_counter() - t0
        done = worker.stats()["succeeded"]
        sample = backend.get_many(ids[:: max(tasks // 100, 1)])
        assert done == tasks and all(s is not None and s.succeeded for s in sample), (done, sample[:3])
        return {"tasks": tasks, "concurrency": concurrency, "prefetch_multiplier": prefetch_multiplier,
                "isolation": worker.isolation, "enqueue_s": enqueue_s, "process_s": process_s,
                "enqueue_per_s": tasks / enqueue_s, "process_per_s": tasks / process_s,
                "end_to_end_per_s": tasks / (enqueue_s + process_s),
                "worker_calls": {k: {"calls": n, "mean_us": t / n * 1e6, "items_per_call": items / n}
                                 for k, (n, t, items) in calls.items()}}
    finally:
        producer.close()


def run_sqlite(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="stem-bench-") as tmp:
        url = f"sqlite:///{os.path.join(tmp, 'bench.db')}"
        return run(url, args.tasks, args.concurrency, args.prefetch_multiplier, args.isolation, args.breakdown)


def run_postgres(args) -> dict:
    import psycopg
    schema = "bench_" + uuid.uuid4().hex[:8]
    sep = "&" if "?" in args.postgres_url else "?"
    try:
        return run(f"{args.postgres_url}{sep}schema={schema}", args.tasks, args.concurrency,
                   args.prefetch_multiplier, args.isolation, args.breakdown)
    finally:
        with psycopg.connect(args.postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="sqlite,postgres")
    ap.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--prefetch-multiplier", type=int, default=2)
    ap.add_argument("--isolation", choices=["process", "inline"], default="process")
    ap.add_argument("--breakdown", action="store_true", help="time the worker's broker and backend calls")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    runners = {"sqlite": run_sqlite, "postgres": run_postgres}
    figures = {"implementation": stem.IMPLEMENTATION, "python": sys.version.split()[0]}
    for name in args.adapters.split(","):
        figures[name] = runners[name](args)
    if args.json:
        print(json.dumps(figures, indent=2))
        return figures
    for name in args.adapters.split(","):
        r = figures[name]
        print(f"{name:9s} enqueue_many {r['enqueue_per_s']:9,.0f} tasks/s   "
              f"worker ({r['isolation']}, concurrency {r['concurrency']}, prefetch x{r['prefetch_multiplier']}) "
              f"{r['process_per_s']:7,.0f} tasks/s   end to end {r['end_to_end_per_s']:7,.0f} tasks/s")
        for call, c in r["worker_calls"].items():
            print(f"          {call:11s} {c['calls']:6d} calls  {c['mean_us']:8,.0f} us/call  "
                  f"{c['items_per_call']:5.1f} items/call")
    print(f"implementation={figures['implementation']} python={figures['python']}")
    return figures


if __name__ == "__main__":
    main()
