"""Huey: ``huey_consumer huey_app.huey -w N -k process`` (process workers).

RedisHuey with blocking pops (BRPOP, no polling delay), results off, no
periodic tasks.
"""

from __future__ import annotations

from huey import RedisHuey

from _common import PYTHON, REDIS_URL, incr as _incr

SETTINGS = "-w N -k process, RedisHuey(blocking=True), results off, -n (no periodic)"

huey = RedisHuey("bench", url=REDIS_URL, results=False, blocking=True)


@huey.task()
def incr():
    _incr()


def worker_argv(n: int) -> list[str]:
    return [PYTHON, "-m", "huey.bin.huey_consumer", "huey_app.huey", "-w", str(n), "-k", "process", "-n", "-q"]


def produce(n: int) -> None:
    for _ in range(n):
        incr()


produce_single = produce   # already one call per task
