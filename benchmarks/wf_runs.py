"""Workflow runs end to end: runs started and finished per second by one worker process pool.

    .venv/bin/python benchmarks/wf_runs.py [--runs 300] [--concurrency 2] [--stores sqlite,redis,postgres]
        [--redis-url URL] [--postgres-url URL]

Each store gets a fresh broker and backend (a SQLite file in a temporary directory, a Redis
namespace, a Postgres schema) and one ``Worker`` with ``concurrency`` child processes.  Two
workflows: ``two.steps`` (two steps: one activation) and ``step.sleep.step`` (a 10 ms durable
sleep between them: two activations, a delayed wake-up).  Printed per store and workflow: runs
started per second (``Workflows.start``: create, mirror, publish) and runs finished per second
(from the first start to the last terminal status, ``Stem.wait_many``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stem import Stem, TaskRegistry, Worker, WorkerLifecycleConfig  # noqa: E402
from stem.workflows import Workflows  # noqa: E402

registry = TaskRegistry()
wf = Workflows(registry, sweep_interval=1.0)


@wf.step(name="bench.one")
def one(ctx, n):
    return n + 1


@wf.step(name="bench.two")
def two(ctx, n):
    return n * 2


@wf.workflow("two.steps")
def two_steps(ctx, n):
    return two(ctx, one(ctx, n))


@wf.workflow("step.sleep.step")
def step_sleep_step(ctx, n):
    a = one(ctx, n)
    ctx.sleep(0.01)
    return two(ctx, a)


def measure(broker, backend, name: str, runs: int, concurrency: int) -> tuple[float, float]:
    worker = Worker(broker, backend, registry, concurrency=concurrency,
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False)).run_in_background()
    try:
        stem = Stem(broker, backend, registry)
        t0 = time.perf_counter()
        ids = [wf.start(stem, name, {"n": i}) for i in range(runs)]
        t1 = time.perf_counter()
        done = stem.wait_many(ids, timeout=600)
        t2 = time.perf_counter()
        if done.pending or any(not s.succeeded for s in done.done.values()):
            raise SystemExit(f"{len(done.pending)} runs unfinished, or some failed")
        return runs / (t1 - t0), runs / (t2 - t0)
    finally:
        worker.shutdown(timeout=60)


def stores(kinds: list[str], redis_url: str, postgres_url: str):
    from stem.backends import from_url as backend
    from stem.brokers import from_url as broker
    for kind in kinds:
        if kind == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                url = f"sqlite:///{tmp}/bench.db"
                yield kind, broker(url), backend(url)
        elif kind == "redis":
            ns = "wfbench" + uuid.uuid4().hex[:8]
            yield kind, broker(redis_url, namespace=ns), backend(redis_url, namespace=ns)
            import redis
            with redis.Redis.from_url(redis_url) as client:
                keys = list(client.scan_iter(match=ns + ":*", count=1000))
                for i in range(0, len(keys), 1000):
                    client.delete(*keys[i:i + 1000])
        elif kind == "postgres":
            schema = "wfbench" + uuid.uuid4().hex[:8]
            url = f"{postgres_url}?schema={schema}"
            yield kind, broker(url), backend(url)
            import psycopg
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--stores", default="sqlite,redis,postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    for name in ("two.steps", "step.sleep.step"):
        for kind, broker, backend in stores(args.stores.split(","), args.redis_url, args.postgres_url):
            started, finished = measure(broker, backend, name, args.runs, args.concurrency)
            print(f"{kind:<9} {name:<16} {args.runs} runs: started {started:7.0f}/s, finished {finished:6.0f}/s",
                  flush=True)
            broker.close()
            backend.close()


if __name__ == "__main__":
    main()
