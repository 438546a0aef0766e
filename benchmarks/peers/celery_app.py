"""Celery, prefork pool: ``celery -A celery_app worker --pool prefork -c 2``.

Settings chosen for throughput, each a documented Celery option: results off
(``task_ignore_result``), early acks (Celery's default), prefetch multiplier
64 (default 4), no gossip / mingle / heartbeat, rate limits disabled.
"""

from __future__ import annotations

from celery import Celery

from _common import PYTHON, QUEUE, REDIS_URL, chunks, incr as _incr

PREFETCH = 64
SETTINGS = (f"prefork -c N, prefetch_multiplier={PREFETCH}, acks early (default), ignore_result, "
            "--without-gossip/mingle/heartbeat, rate limits off")

app = Celery("bench", broker=REDIS_URL)
app.conf.update(task_ignore_result=True, task_acks_late=False, worker_prefetch_multiplier=PREFETCH,
                worker_disable_rate_limits=True, task_default_queue=QUEUE, broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False, task_serializer="json", accept_content=["json"])


@app.task(name="bench.incr")
def incr():
    _incr()


def worker_argv(n: int) -> list[str]:
    return [PYTHON, "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork", "-c", str(n),
            "-Q", QUEUE, "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"]


def produce(n: int) -> None:
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            incr.apply_async(producer=producer)


def produce_single(n: int) -> None:
    for _ in range(n):
        incr.delay()
