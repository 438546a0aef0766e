"""Unique tasks across worker processes: a unique task's key outlives the worker killed while
running it, stays held while another worker runs the redelivered task, and goes when it ends."""

from __future__ import annotations

import pytest

from stem import TaskOptions, TaskState
from stem.keys import unique_key

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once

UNIQUE = TaskOptions(unique=True)


@pytest.mark.timeout(120)
def test_a_unique_task_keeps_its_key_through_a_killed_worker_and_its_redelivery(process_store, fleet, ledger,
                                                                                tmp_path):
    hold = tmp_path / "go"
    stem = process_store.producer()
    args = {"n": 7, "ledger": str(ledger), "hold": str(hold)}
    key = unique_key("e2e.effect", "default", args)
    tid = stem.enqueue("e2e.effect", args, options=UNIQUE)
    victim = fleet.process(process_store, concurrency=1, visibility_timeout=1.0, label="victim")
    fleet.wait_for(lambda: ledger.ran().get(tid) == 1, 60, "the task to start on the victim")
    victim.kill()
    assert stem.enqueue("e2e.effect", args, options=UNIQUE) == tid   # leased to a dead worker: still held
    fleet.process(process_store, concurrency=1, visibility_timeout=1.0, label="rescuer")
    fleet.wait_for(lambda: ledger.ran().get(tid) == 2, 60, "the task to be redelivered to the rescuer")
    assert ledger.by_worker() == {"victim": 1, "rescuer": 1}
    assert stem.enqueue("e2e.effect", args, options=UNIQUE) == tid   # redelivered: still held
    assert stem.broker.key_owner("default", key) == tid
    hold.touch()
    status = stem.wait_for_task(tid, timeout=30)
    assert status.state is TaskState.SUCCEEDED and status.result == 7
    fleet.wait_for(lambda: stem.broker.key_owner("default", key) is None, 30, "the key to be released")
    again = stem.enqueue("e2e.effect", args, options=UNIQUE)
    assert again != tid
    assert stem.wait_for_task(again, timeout=30).state is TaskState.SUCCEEDED
