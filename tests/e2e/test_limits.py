"""Global rate and concurrency limits with real workers (issue 21): several workers together keep
one rate, a task without retries is never failed by throttling, and the concurrency slots of a
worker killed with SIGKILL come back when its leases expire.  Start times come from the tasks
(their results, or the lines they write), so what is measured is what ran, not what a worker
says."""

from __future__ import annotations

import glob
import os

import pytest

from stem import Stem, TaskState
from stem.limits import default_burst
from tests.apps.e2e import RATED_BURST, RATED_RATE, SLOTS
from tests.e2e.conftest import KINDS
from tests.support import all_succeeded

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once


def producer(store, knows_options: bool) -> Stem:
    """A producer with the tasks' registry (it publishes each task with its Limit), or one
    without (the worker routes each delivery into its lane once)."""
    if knows_options:
        return store.producer()
    return Stem(store.broker(), store.backend())


def sliding_excess(times: list[float], rate: float, burst: int) -> float:
    """The most that any window [t_i, t_j] holds above ``burst + rate * (t_j - t_i)``."""
    times = sorted(times)
    worst = float("-inf")
    for i in range(len(times)):
        for j in range(i, len(times)):
            worst = max(worst, (j - i + 1) - (burst + rate * (times[j] - times[i])))
    return worst


def workers(store, fleet, n_workers: int, concurrency: int) -> None:
    for i in range(n_workers):
        if store.in_process_only:
            fleet.in_process(store, concurrency=concurrency)
        else:
            fleet.process(store, concurrency=concurrency, label=f"w{i}")


def _rate_cases() -> list:
    """Each case costs ~9 s of rate-bound waiting, so the default run keeps one per guarantee
    and ``make test-slow`` runs the rest.  Worker processes sharing one rate, the producer
    knowing the limits: on the three stores of their own code (SQLite, Redis, PostgreSQL);
    the cluster runs Redis's scripts, and in-process workers on memory share one broker
    whose rate the contract suite checks (tests/contract/test_limits_contract.py).  The
    worker routing each delivery into its lane (``Broker.route_limited``, in the contract
    suite on every adapter): on Redis."""
    default = {(True, "sqlite"), (True, "redis"), (True, "postgres"), (False, "redis")}
    cases = []
    for p in KINDS:
        kind = p.values[0]
        for knows, label in ((True, "producer-knows"), (False, "worker-routes")):
            marks = p.marks if (knows, kind) in default else [*p.marks, pytest.mark.slow]
            cases.append(pytest.param(kind, knows, marks=marks, id=f"{kind}-{label}"))
    return cases


@pytest.mark.timeout(120)
@pytest.mark.parametrize("store, knows_options", _rate_cases(), indirect=["store"])
def test_workers_together_keep_one_global_rate(store, fleet, ledger, knows_options):
    """3 workers x 2 slots (4 in one process on memory) share a 2/s limit: in every window T at
    most 2*T + burst start (plus one for the jitter between a lease and the task's start), and
    the whole batch takes as long as the rate says."""
    n = 16
    workers(store, fleet, 4 if store.in_process_only else 3, 2)
    stem = producer(store, knows_options)
    ids = stem.enqueue_many([("e2e.rated", {"ledger": str(ledger)})] * n)
    fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 90, f"{n} rated tasks SUCCEEDED")
    starts = [s.result for s in stem.backend.get_many(ids)]
    assert ledger.twice() == []
    excess = sliding_excess(starts, RATED_RATE, RATED_BURST)
    assert excess <= 1.0, f"{excess} more starts than the limit allows in some window: {sorted(starts)}"
    span = max(starts) - min(starts)
    expected = (n - RATED_BURST) / RATED_RATE
    assert span >= expected * 0.9, f"{n} tasks at 2/s (burst 2) ran in {span:.2f}s, expected >= {expected}s"
    assert span <= expected * 1.5 + 2.0, f"the limit was kept far below its rate: {span:.2f}s"
    assert stem.broker.stats("default")[1:5] == (0, 0, 0, 0) and stem.broker.stats("default").throttled == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_acceptance_1000_tasks_at_50_per_second_on_3_workers_of_2_children_take_20_seconds(process_store, fleet):
    """Issue 21's acceptance run: 3 worker processes x 2 children, 1,000 tasks at 50/s (the
    default burst: 6).  Every window of T seconds holds at most 50*T + 6 starts, plus 5: what
    is measured is when each child started its task, which trails the broker's lease by a
    varying few tens of ms on a loaded machine (100 ms of spread at 50/s is 5 starts; workers
    woken together start together), while the leases themselves keep the exact bound
    (tests/contract/test_limits_contract.py, and the adapters' own tests with several
    consumers); and the whole run takes 20 s +- 5%."""
    n, rate, burst = 1000, 50.0, default_burst(50.0)
    workers(process_store, fleet, 3, 2)
    stem = process_store.producer()
    ids = stem.enqueue_many([("e2e.rated50", {})] * n)
    fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 180, f"{n} tasks at 50/s SUCCEEDED")
    starts = sorted(s.result for s in stem.backend.get_many(ids))
    excess = sliding_excess(starts, rate, burst)
    span = starts[-1] - starts[0]
    expected = (n - burst) / rate
    print(f"{process_store.kind}: {n} tasks in {span:.2f}s (expected {expected:.2f}s), "
          f"worst window excess {excess:.2f}")
    assert excess <= 5.0, f"{excess:.1f} more starts than 50*T + {burst} in some window"
    assert abs(span - expected) <= expected * 0.05, f"{n} tasks at 50/s took {span:.2f}s, not {expected:.2f}s +- 5%"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [20, pytest.param(40, marks=pytest.mark.slow)])
def test_a_task_without_retries_is_never_failed_or_dead_lettered_by_throttling(store, fleet, n):
    """n tasks with max_retries=0 and a 1 s lease behind a 5/s limit: the last ones wait
    (n - 1) / 5 s, several leases long, in the broker, not in a worker, so no lease expires,
    no attempt is spent, nothing is dead-lettered.  20 by default (~4 s of waiting), 40
    under ``make test-slow``."""
    workers(store, fleet, 2, 4)
    stem = store.producer()
    ids = stem.enqueue_many([("e2e.throttled_fragile", {})] * n)
    fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 90, f"{n} throttled tasks SUCCEEDED")
    statuses = stem.backend.get_many(ids)
    assert all(s.state is TaskState.SUCCEEDED and s.result == 0 for s in statuses)
    assert stem.broker.dead_letters("default") == []
    assert stem.broker.stats("default").dead == 0


def _slot_lines(ledger) -> list[tuple[str, str, float, str]]:
    out = []
    for path in glob.glob(os.path.join(str(ledger.path), "slots-*")):
        worker = os.path.basename(path).split("-")[1]
        with open(path) as f:
            for line in f:
                task_id, what, at = line.split()
                out.append((task_id, what, float(at), worker))
    return out


def _max_overlap(lines, ended_at: dict[str, float]) -> int:
    """The most runs alive at once; a run without its end line ended at ``ended_at[worker]``."""
    runs: dict[tuple[str, str], list[float]] = {}
    for task_id, what, at, worker in lines:
        runs.setdefault((task_id, worker), [0.0, float("inf")])[0 if what == "start" else 1] = at
    events = []
    for (task_id, worker), (start, end) in runs.items():
        end = min(end, ended_at.get(worker, float("inf")))
        events += [(start, 1), (end, -1)]
    alive = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        alive += step
        peak = max(peak, alive)
    return peak


@pytest.mark.timeout(150)
def test_a_killed_workers_concurrency_slots_come_back_when_its_leases_expire(process_store, fleet, ledger,
                                                                             tmp_path):
    """A worker holding both slots of a key is killed with SIGKILL: a second worker gets the
    slots once the leases (1 s) expire, never more than two run at once, and every task ends."""
    import time
    n, vt = 6, 1.0
    hold = tmp_path / "release"
    stem = process_store.producer()
    ids = stem.enqueue_many([("e2e.slotted", {"ledger": str(ledger), "hold": str(hold)})] * n)
    victim = fleet.process(process_store, concurrency=4, visibility_timeout=vt, label="victim")
    fleet.wait_for(lambda: ledger.total() >= SLOTS, 30, "the victim holding both slots")
    lanes = stem.broker.lane_stats("default")
    assert [(s.waiting, s.running) for s in lanes] == [(n - SLOTS, SLOTS)]
    assert ledger.total() == SLOTS, "more tasks started than the key has slots"
    victim.kill()
    killed_at = time.time()
    rescuer = fleet.process(process_store, concurrency=4, visibility_timeout=vt, label="rescuer")
    fleet.wait_for(lambda: len(set(ledger.ran())) > SLOTS or ledger.total() > SLOTS, 30,
                   "the rescuer starting tasks with the slots back")
    first_rescued = min(at for _, what, at, worker in _slot_lines(ledger) if worker == "rescuer" and what == "start")
    assert first_rescued - killed_at <= vt + 5.0, (
        f"the slots came back {first_rescued - killed_at:.1f}s after the kill; leases are {vt}s")
    hold.touch()
    fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 60, "every slotted task SUCCEEDED")
    assert _max_overlap(_slot_lines(ledger), {"victim": killed_at}) <= SLOTS
    assert rescuer.returncode is None
    assert stem.broker.lane_stats("default") == []
