"""A worker process through a Redis Cluster failover: the primary that serves the queue's slot
(of a 3-primary cluster with a replica each, the test's own) is killed with SIGKILL mid-run;
the cluster promotes its replica, the worker follows the new slot map by itself and every
task succeeds (the run: ``tests/e2e/failover.py``).  The results (``{t:ID}`` keys) are spread
over every primary, so the killed one took some of them down with it too."""

from __future__ import annotations

import pytest

from tests.e2e.failover import worker_follows_failover


def _kill_queue_primary(cluster):
    return lambda broker: cluster.failover_by_kill(broker.queue_keys("default")[0])


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_worker_process_follows_a_cluster_failover_and_every_task_succeeds(own_cluster, fleet, ledger):
    worker_follows_failover(own_cluster, _kill_queue_primary(own_cluster), fleet, ledger, n=1000, task_sleep=0.01)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_process_follows_a_cluster_failover_mid_5000_task_run(own_cluster, fleet, ledger):
    worker_follows_failover(own_cluster, _kill_queue_primary(own_cluster), fleet, ledger, n=5000, task_sleep=0.01)
