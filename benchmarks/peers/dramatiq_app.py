"""Dramatiq: ``dramatiq dramatiq_app --processes N --threads 8`` (its defaults are 2 processes x 8 threads).

Redis broker (acks after the actor returns, as stem), no results middleware,
retries off for the actor, Prometheus middleware removed.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from _common import PYTHON, QUEUE, REDIS_URL, incr as _incr

THREADS = 8
SETTINGS = f"N processes x {THREADS} threads, Redis broker, acks after the task (default), no results, max_retries=0"

broker = RedisBroker(url=REDIS_URL, namespace="bench-dramatiq")
for m in list(broker.middleware):
    if type(m).__name__ == "Prometheus":
        broker.middleware.remove(m)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def incr():
    _incr()


def worker_argv(n: int) -> list[str]:
    return [PYTHON, "-m", "dramatiq", "dramatiq_app", "--processes", str(n), "--threads", str(THREADS)]


def produce(n: int) -> None:
    for _ in range(n):
        incr.send()


produce_single = produce   # already one call per task
