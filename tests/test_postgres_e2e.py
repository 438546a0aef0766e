"""The producer and worker processes end to end on Postgres: the scenarios of test_sqlite_e2e.py,
plus a restart of a private cluster under running workers."""

from __future__ import annotations

import pytest

from tests.test_postgres_restart import private_postgres  # noqa: F401  (fixture)
from tests.test_sqlite_e2e import (Workers, all_succeeded, killed_workers_tasks_are_completed_by_the_other, producer,
                                   two_workers_run_each_task_once, wait_for_task_returns_a_worker_processs_result,
                                   wait_until)

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(postgres_url, namespace):
    yield f"{postgres_url}?schema={namespace}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.close()


def test_wait_for_task_in_the_producer_returns_the_result_of_a_worker_process(pg_url, workers):
    wait_for_task_returns_a_worker_processs_result(pg_url, workers)


@pytest.mark.timeout(150)
def test_two_worker_processes_and_a_producer_run_each_of_5000_tasks_once(pg_url, workers):
    two_workers_run_each_task_once(pg_url, workers)


@pytest.mark.timeout(150)
def test_a_killed_workers_tasks_are_completed_by_the_other_worker_after_the_visibility_timeout(pg_url, workers):
    killed_workers_tasks_are_completed_by_the_other(pg_url, workers)


@pytest.mark.timeout(150)
def test_workers_resume_after_a_postgres_restart_and_every_task_succeeds(private_postgres, workers):
    url = private_postgres.url
    stem = producer(url, workers)
    try:
        ids = stem.enqueue_many([("effect", {"n": i}) for i in range(3000)])
        workers.start(url, vt=5.0, task_sleep=0.002)
        workers.start(url, vt=5.0, task_sleep=0.002)
        wait_until(lambda: sum(workers.ran().values()) >= 500, 60, "500 tasks to run")
        private_postgres.stop("fast")
        private_postgres.start()
        more = stem.enqueue_many([("effect", {"n": i}) for i in range(500)])   # reconnects by itself
        wait_until(lambda: all_succeeded(stem, ids + more), 120, f"every task SUCCEEDED\n{workers.logs()}")
        assert all(p.poll() is None for p in workers.procs), "a worker died instead of resuming"
        assert set(workers.ran()) == set(ids + more)
        assert stem.broker.stats("default")[1:] == (0, 0, 0, 0)
    finally:
        stem.close()
