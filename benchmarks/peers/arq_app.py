"""arq: ``arq arq_app.WorkerSettings``, one asyncio process (``BENCH_ARQ_PROCESSES``, default 1).

arq has no process pool; several arq processes on one queue were slower here
(2 processes: 125 tasks/s at 3,620 µs/task vs 1 process: 172 tasks/s at
2,180 µs/task, run one after the other), as they race for the same jobs, so arq gets one.

asyncio, max_jobs=64 per process, keep_result=0, jobs enqueued concurrently
(``enqueue_job`` under ``asyncio.gather``, 32 at a time: the client pool's
connection limit).
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

from arq import create_pool
from arq.connections import RedisSettings

from _common import COUNTER, PYTHON, QUEUE, REDIS_URL, chunks

PROCESSES = int(os.environ.get("BENCH_ARQ_PROCESSES", "1"))
SETTINGS = f"{PROCESSES} process(es) (faster than 2 here), asyncio max_jobs=64, keep_result=0, poll_delay=0.05 s"

_u = urlsplit(REDIS_URL)
REDIS = RedisSettings(host=_u.hostname or "127.0.0.1", port=_u.port or 6379, database=int(_u.path.lstrip("/") or 0))


async def incr(ctx):
    await ctx["redis"].incr(COUNTER)


class WorkerSettings:
    functions = [incr]
    redis_settings = REDIS
    queue_name = QUEUE
    max_jobs = 64
    keep_result = 0
    poll_delay = 0.05
    handle_signals = True


def worker_argv(n: int) -> list[str]:
    return [PYTHON, "-m", "arq", "arq_app.WorkerSettings"]   # the runner starts PROCESSES of these


PROCESSES_ARE_SEPARATE = True


def produce(n: int) -> None:
    async def go():
        pool = await create_pool(REDIS, default_queue_name=QUEUE)
        try:
            for k in chunks(n, 32):
                await asyncio.gather(*(pool.enqueue_job("incr") for _ in range(k)))
        finally:
            await pool.close()

    asyncio.run(go())


def produce_single(n: int) -> None:
    async def go():
        pool = await create_pool(REDIS, default_queue_name=QUEUE)
        try:
            for _ in range(n):
                await pool.enqueue_job("incr")
        finally:
            await pool.close()

    asyncio.run(go())
