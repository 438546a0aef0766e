"""A worker process through a Sentinel failover: the master of a master/replica/sentinel set
of the test's own is killed with SIGKILL mid-run; the worker follows the promoted replica by
itself and every task succeeds.  Replication is asynchronous: what the master took in its
last moments and never sent to the replica is gone with it, so a task whose result and ack
were lost runs again (the count is printed); a task enqueued before the kill was replicated
first (``wait_replicated``), as the README says a producer must do for an enqueue to survive
a failover."""

from __future__ import annotations

import pytest

from tests.support import Store, all_succeeded

IDLE = (0, 0, 0, 0)


def failover_mid_run(sentinel, fleet, ledger, n: int) -> None:
    store = Store("redis", sentinel.url(), {"namespace": "e2e"})
    try:
        stem = store.producer()
        worker = fleet.process(store, concurrency=4, visibility_timeout=5.0)
        ids = stem.enqueue_many([("e2e.effect", {"n": i, "ledger": str(ledger), "sleep": 0.002})
                                 for i in range(n)])
        sentinel.wait_replicated()
        fleet.wait_for(lambda: ledger.total() >= n // 5, 60, "a fifth of the tasks to run")
        sentinel.failover_by_kill()
        assert len(ledger.ran()) < n, "the run finished before the master was killed"
        fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 120, "every task SUCCEEDED after the failover",
                       interval=0.2)
        assert set(ledger.ran()) == set(ids)
        print(f"{len(ledger.twice())} of {n} tasks ran twice across the failover")
        fleet.wait_for(lambda: stem.broker.stats("default")[1:5] == IDLE, 30, "the queue to drain")
        assert worker.returncode is None, "the worker died instead of following the failover"
    finally:
        fleet.close()
        store.close()


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_worker_process_follows_a_sentinel_failover_and_every_task_succeeds(own_sentinel, fleet, ledger):
    failover_mid_run(own_sentinel, fleet, ledger, 1000)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_process_follows_a_sentinel_failover_mid_5000_task_run(own_sentinel, fleet, ledger):
    failover_mid_run(own_sentinel, fleet, ledger, 5000)
