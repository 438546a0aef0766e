"""A worker process through a Redis Cluster failover: the primary that serves the queue's slot
(of a 3-primary cluster with a replica each, the test's own) is killed with SIGKILL mid-run;
the cluster promotes its replica, the worker follows the new slot map by itself and every
task succeeds.  The results (``{t:ID}`` keys) are spread over every primary, so the killed
one took some of them down with it too.  Replication is asynchronous: what the primary took
in its last moments and never sent to its replica is gone with it, so a task whose result
and ack were lost runs again (the count is printed); the tasks were enqueued and replicated
(``wait_replicated``) before the kill."""

from __future__ import annotations

import pytest

from tests.support import Store, all_succeeded

IDLE = (0, 0, 0, 0)


def failover_mid_run(cluster, fleet, ledger, n: int) -> None:
    store = Store("redis", cluster.url(), {"namespace": "e2e"})
    try:
        stem = store.producer()
        worker = fleet.process(store, concurrency=4, visibility_timeout=5.0)
        ids = stem.enqueue_many([("e2e.effect", {"n": i, "ledger": str(ledger), "sleep": 0.01})
                                 for i in range(n)])
        cluster.wait_replicated()
        fleet.wait_for(lambda: ledger.total() >= n // 5, 60, "a fifth of the tasks to run")
        ran_before = len(ledger.ran())
        cluster.failover_by_kill(stem.broker.queue_keys("default")[0])
        assert ran_before < n, "the run finished before the primary was killed"
        fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 120, "every task SUCCEEDED after the failover",
                       interval=0.2)
        assert set(ledger.ran()) == set(ids)
        print(f"{len(ledger.twice())} of {n} tasks ran twice across the cluster failover "
              f"(killed after {ran_before} had run)")
        fleet.wait_for(lambda: stem.broker.stats("default")[1:5] == IDLE, 30, "the queue to drain")
        assert worker.returncode is None, "the worker died instead of following the failover"
    finally:
        fleet.close()
        store.close()


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_worker_process_follows_a_cluster_failover_and_every_task_succeeds(own_cluster, fleet, ledger):
    failover_mid_run(own_cluster, fleet, ledger, 1000)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_process_follows_a_cluster_failover_mid_5000_task_run(own_cluster, fleet, ledger):
    failover_mid_run(own_cluster, fleet, ledger, 5000)
