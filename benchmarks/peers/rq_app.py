"""RQ: ``rq worker-pool -n N -w rq.worker.SimpleWorker`` (no fork per job: RQ's fastest mode).

Jobs enqueued with ``Queue.enqueue_many`` (one pipeline per batch), result_ttl=0
(the job hash is deleted after success).
"""

from __future__ import annotations

from redis import Redis
from rq import Queue

from _common import PYTHON, QUEUE, REDIS_URL, chunks, incr as _incr

SETTINGS = "worker-pool -n N, SimpleWorker (no fork per job), enqueue_many, result_ttl=0"


def incr():
    _incr()


def worker_argv(n: int) -> list[str]:
    return [PYTHON, "-m", "rq.cli", "worker-pool", "-n", str(n), "-w", "rq.worker.SimpleWorker", "-u", REDIS_URL,
            "-q", QUEUE]


def produce(n: int) -> None:
    q = Queue(QUEUE, connection=Redis.from_url(REDIS_URL))
    for k in chunks(n, 500):
        q.enqueue_many([Queue.prepare_data(incr, result_ttl=0) for _ in range(k)])


def produce_single(n: int) -> None:
    q = Queue(QUEUE, connection=Redis.from_url(REDIS_URL))
    for _ in range(n):
        q.enqueue(incr, result_ttl=0)
