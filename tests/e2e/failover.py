"""The run both failover tests make (``test_sentinel_failover.py``, ``test_cluster_failover.py``):
a worker process mid-run when a server is killed, checked for following the failover by itself.

Replication is asynchronous: what a killed master took in its last moments and never sent
to its replica is gone with it, so a task whose result and ack were lost runs again (the
count is printed, not asserted); the tasks were replicated (``wait_replicated``) before the
kill, as the README says a producer must wait for an enqueue to survive a failover.
"""

from __future__ import annotations

from typing import Any, Callable

from tests.support import Store, all_succeeded

IDLE = (0, 0, 0, 0)


def worker_follows_failover(setup: Any, kill: Callable[[Any], None], fleet, ledger, *, n: int,
                            task_sleep: float) -> None:
    """Run ``n`` tasks on a worker process against ``setup`` (a ``SentinelSetup`` or a
    ``ClusterSetup``: ``url()``, ``wait_replicated()``), call ``kill(broker)`` once a fifth
    of them ran, and check that every task then SUCCEEDED, the queue drained and the worker
    is still alive."""
    store = Store("redis", setup.url(), {"namespace": "e2e"})
    try:
        stem = store.producer()
        worker = fleet.process(store, concurrency=4, visibility_timeout=5.0)
        ids = stem.enqueue_many([("e2e.effect", {"n": i, "ledger": str(ledger), "sleep": task_sleep})
                                 for i in range(n)])
        setup.wait_replicated()
        fleet.wait_for(lambda: ledger.total() >= n // 5, 60, "a fifth of the tasks to run")
        ran_before = len(ledger.ran())
        kill(stem.broker)
        assert ran_before < n, "the run finished before the server was killed"
        fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 120, "every task SUCCEEDED after the failover",
                       interval=0.2)
        assert set(ledger.ran()) == set(ids)
        print(f"{len(ledger.twice())} of {n} tasks ran twice across the failover (killed after {ran_before} had run)")
        fleet.wait_for(lambda: stem.broker.stats("default")[1:5] == IDLE, 30, "the queue to drain")
        assert worker.returncode is None, "the worker died instead of following the failover"
    finally:
        fleet.close()
        store.close()
