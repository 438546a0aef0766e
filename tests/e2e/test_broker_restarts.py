"""Worker processes through a restart of their broker's server: a redis-server of the test's
own killed with SIGKILL and started again, a PostgreSQL cluster of the test's own stopped and
started.  The workers resume by themselves and every task succeeds."""

from __future__ import annotations

import pytest

from tests.support import Store, all_succeeded

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once

IDLE = (0, 0, 0, 0)


def effects(ledger, n: int, **kw) -> list[tuple[str, dict]]:
    return [("e2e.effect", {"n": i, "ledger": str(ledger), **kw}) for i in range(n)]


def redis_restart_mid_run(redis_server, fleet, ledger, n: int) -> None:
    store = Store("redis", redis_server.url, {"namespace": "e2e"})     # the server is the test's own
    try:
        stem = store.producer()
        worker = fleet.process(store, concurrency=4, visibility_timeout=5.0)
        ids = stem.enqueue_many(effects(ledger, n, sleep=0.002))
        fleet.wait_for(lambda: ledger.total() >= n // 5, 60, "a fifth of the tasks to run")
        redis_server.kill()
        fleet.wait_for(lambda: worker.lines("unreachable"), 30, "the worker to notice the outage")
        redis_server.start()
        assert len(ledger.ran()) < n, "the run finished before Redis was killed"
        fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 120, "every task SUCCEEDED after the restart",
                       interval=0.2)
        assert set(ledger.ran()) == set(ids)
        fleet.wait_for(lambda: stem.broker.stats("default")[1:5] == IDLE, 30, "the queue to drain")
        assert worker.returncode is None, "the worker died instead of resuming"
    finally:
        fleet.close()
        store.close()


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_worker_process_resumes_by_itself_after_redis_is_killed_and_restarted(redis_server, fleet, ledger):
    redis_restart_mid_run(redis_server, fleet, ledger, 1000)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_process_resumes_after_redis_is_killed_and_restarted_mid_5000_task_run(redis_server, fleet,
                                                                                       ledger):
    redis_restart_mid_run(redis_server, fleet, ledger, 5000)


@pytest.mark.postgres
@pytest.mark.timeout(150)
def test_worker_processes_resume_after_a_postgres_restart_and_every_task_succeeds(private_postgres, fleet, ledger):
    store = Store("postgres", private_postgres.url)
    try:
        stem = store.producer()
        ids = stem.enqueue_many(effects(ledger, 3000, sleep=0.002))
        fleet.process(store, visibility_timeout=5.0)
        fleet.process(store, visibility_timeout=5.0)
        fleet.wait_for(lambda: ledger.total() >= 500, 60, "500 tasks to run")
        private_postgres.stop("fast")
        private_postgres.start()
        more = stem.enqueue_many(effects(ledger, 500))          # the producer reconnects by itself
        fleet.wait_for(lambda: all_succeeded(stem.backend, ids + more), 120, "every task SUCCEEDED")
        assert all(p.returncode is None for p in fleet.procs), "a worker died instead of resuming"
        assert set(ledger.ran()) == set(ids + more)
        assert stem.broker.stats("default")[1:5] == IDLE
    finally:
        fleet.close()
        store.close()
