"""What every peer app shares: where its Redis is, the counter key, one client per process.

The runner (``run.py``) sets ``BENCH_REDIS_URL`` (a URL whose db is the peer's
own) before it imports a peer app or starts a peer's worker process.
"""

from __future__ import annotations

import os

import redis

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
COUNTER = "bench:count"
QUEUE = "bench"
PYTHON = os.environ.get("BENCH_PYTHON", "python")

_client: dict[int, redis.Redis] = {}


def client() -> redis.Redis:
    """This process's client (a forked child makes its own)."""
    pid = os.getpid()
    r = _client.get(pid)
    if r is None:
        r = _client[pid] = redis.Redis.from_url(REDIS_URL)
    return r


def incr() -> None:
    """The workload: one INCR, so completion is observed in Redis, not inferred."""
    client().incr(COUNTER)


def chunks(n: int, size: int):
    while n > 0:
        yield min(size, n)
        n -= size
