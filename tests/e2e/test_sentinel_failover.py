"""A worker process through a Sentinel failover: the master of a master/replica/sentinel set
of the test's own is killed with SIGKILL mid-run; the worker follows the promoted replica by
itself and every task succeeds (the run: ``tests/e2e/failover.py``)."""

from __future__ import annotations

import pytest

from tests.e2e.failover import worker_follows_failover


def _kill_master(sentinel):
    return lambda broker: sentinel.failover_by_kill()


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_worker_process_follows_a_sentinel_failover_and_every_task_succeeds(own_sentinel, fleet, ledger):
    worker_follows_failover(own_sentinel, _kill_master(own_sentinel), fleet, ledger, n=1000, task_sleep=0.002)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_process_follows_a_sentinel_failover_mid_5000_task_run(own_sentinel, fleet, ledger):
    worker_follows_failover(own_sentinel, _kill_master(own_sentinel), fleet, ledger, n=5000, task_sleep=0.002)
