"""stem: one worker, ``concurrency=N`` child processes (``python stem_app.py``).

Redis broker and result backend, HMAC-SHA256 signing on, results stored,
acks after the result is stored (always), the process engine, prefetch
multiplier 16 (``BENCH_STEM_PREFETCH``; Celery runs with 64); tasks enqueued with ``Stem.enqueue_many`` (500 per batch).
"""

from __future__ import annotations

import os
import sys

from _common import PYTHON, QUEUE, REDIS_URL, chunks, incr as _incr

from stem import PayloadSigner, Stem, TaskOptions, TaskRegistry, Worker
from stem.backends.redis import RedisResultBackend
from stem.brokers.redis import RedisBroker

NAMESPACE = "bench-stem"
PREFETCH = int(os.environ.get("BENCH_STEM_PREFETCH", "16")) or None
SETTINGS = ("1 supervisor x N children, signing on (HMAC-SHA256), results stored, acks after the result, "
            f"prefetch_multiplier={PREFETCH or 'default'} (the window widens to 64 per child while tasks are short)")
SIGNER = PayloadSigner({"bench": b"stem-benchmark-signing-key-0123456789"})

registry = TaskRegistry()


@registry.task("bench.incr", options=TaskOptions(queue=QUEUE))
def incr(ctx):
    _incr()


def worker_argv(n: int) -> list[str]:
    return [PYTHON, os.path.abspath(__file__), str(n)]


_producer: Stem | None = None


def produce(n: int) -> None:
    global _producer
    if _producer is None:
        _producer = Stem(RedisBroker(REDIS_URL, namespace=NAMESPACE),
                         RedisResultBackend(REDIS_URL, namespace=NAMESPACE), registry, SIGNER)
    items = [("bench.incr", {})] * 500
    for k in chunks(n, 500):
        _producer.enqueue_many(items[:k])


def produce_single(n: int) -> None:
    """One ``Stem.enqueue`` per task, as a service enqueues (``--producer single``)."""
    global _producer
    if _producer is None:
        _producer = Stem(RedisBroker(REDIS_URL, namespace=NAMESPACE),
                         RedisResultBackend(REDIS_URL, namespace=NAMESPACE), registry, SIGNER)
    enqueue = _producer.enqueue
    for _ in range(n):
        enqueue("bench.incr")


def main(n: int) -> int:
    kw = {} if PREFETCH is None else {"prefetch_multiplier": PREFETCH}
    worker = Worker(RedisBroker(REDIS_URL, namespace=NAMESPACE), RedisResultBackend(REDIS_URL, namespace=NAMESPACE),
                    registry, queues=[QUEUE], concurrency=n, signer=SIGNER, **kw)
    worker.start()   # SIGTERM: warm shutdown
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2))
