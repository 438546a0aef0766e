"""Durable workflows end to end: worker processes over a store they share (SQLite, Postgres, Redis) run
a workflow with a step, a called task, a two-day sleep under the injectable clock, an event wait
and a child run; a child process killed mid-step, and every worker killed during a sleep, leave
runs that complete with the same outputs."""

from __future__ import annotations

import os
import signal
import time

import pytest

from stem import Stem
from stem.results import TaskState
from tests.apps import wf as wfapp
from tests.e2e.conftest import make_store
from tests.wf_support import wf_clock  # noqa: F401 - fixture

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once

WF_REGISTRY = "tests.apps.wf:registry"
DAY = 86400.0
EXPECTED = {"charge": "ch-42", "total": 42, "shipped": "shipped-42", "review": {"stars": 5}, "doubled": 84}


@pytest.fixture(params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("redis", marks=pytest.mark.redis)])
def wf_store(request, fleet):
    store = make_store(request.param, request)
    yield store
    fleet.close()
    store.close()


def _producer(store) -> Stem:
    return Stem(store.broker(), store.backend(), wfapp.registry)


def _waiting(store, run_id: str) -> str | None:
    """What a parked run waits for (sleep, wait, call, child), else None."""
    from stem.workflows.codec import decode
    run = store.get(run_id)
    return decode(run.waiting)["kind"] if run is not None and run.status == "PARKED" else None


def _counts(ledger, prefix: str) -> int:
    return sum(n for line, n in ledger.ran().items() if line.startswith(prefix))


def test_a_run_with_a_step_a_call_a_sleep_a_wait_and_a_child_completes_across_worker_processes(
        wf_store, fleet, ledger, wf_clock):
    for _ in range(2):
        fleet.process(wf_store, registry=WF_REGISTRY, concurrency=2)
    stem = _producer(wf_store)
    store = wfapp.wf.store_for(stem.backend)
    wfapp.wf.start(stem, "wf.order", {"ledger": str(ledger), "order_id": "42"}, run_id="order-42")
    fleet.wait_for(lambda: _waiting(store, "order-42") == "sleep", 60, "the run to sleep")
    wake_at = store.get("order-42").wake_at
    assert wake_at >= wf_clock.now() + 2 * DAY - 120
    # never early: five sweep intervals pass on both workers and it sleeps on
    deadline = time.monotonic() + 5 * wfapp.wf.sweep_interval
    while time.monotonic() < deadline:
        assert _waiting(store, "order-42") == "sleep" and _counts(ledger, "ship") == 0
        time.sleep(0.05)
    wf_clock.advance(2 * DAY)
    fleet.wait_for(lambda: _waiting(store, "order-42") == "wait", 60, "the run to wait for its review")
    assert wfapp.wf.send(stem, "order-42", "review", {"stars": 5}, event_id="rv-9") is True
    status = stem.wait_for_task("order-42", timeout=60)
    assert status.state is TaskState.SUCCEEDED and status.result == EXPECTED
    assert _counts(ledger, "charge") == 1 and _counts(ledger, "ship") == 1
    assert store.get("order-42").status == "SUCCEEDED"


def test_killing_the_child_process_mid_step_runs_the_step_at_most_twice_and_the_run_ends_the_same(
        wf_store, fleet, ledger, tmp_path):
    for _ in range(2):
        fleet.process(wf_store, registry=WF_REGISTRY, concurrency=2)
    stem = _producer(wf_store)
    hold = tmp_path / "hold"
    wfapp.wf.start(stem, "wf.order", {"ledger": str(ledger), "order_id": "42", "hold": str(hold), "sleep_days": 0},
                   run_id="crash-42")
    wfapp.wf.send(stem, "crash-42", "review", {"stars": 5}, event_id="rv")       # kept for the wait
    fleet.wait_for(lambda: _counts(ledger, "charge") == 1, 60, "the step to start")
    [path] = [p for p in ledger.path.glob("ran-*") if "charge" in p.read_text()]
    child_pid = int(path.name.rsplit("-", 1)[1])
    os.kill(child_pid, signal.SIGKILL)                                          # mid-step
    hold.touch()
    status = stem.wait_for_task("crash-42", timeout=90)
    assert status.state is TaskState.SUCCEEDED and status.result == EXPECTED
    executions = [line for line in ledger.ran().elements() if line.startswith("charge")]
    print("executions of the killed step:", len(executions))
    assert 1 <= len(executions) <= 2 and set(executions) == {"charge crash-42:g0:p0"}   # one key for both
    assert _counts(ledger, "ship") == 1


def test_a_two_day_sleep_survives_killing_every_worker_and_wakes_once(wf_store, fleet, ledger, wf_clock):
    first = fleet.process(wf_store, registry=WF_REGISTRY, concurrency=1)
    stem = _producer(wf_store)
    store = wfapp.wf.store_for(stem.backend)
    wfapp.wf.start(stem, "wf.order", {"ledger": str(ledger), "order_id": "42"}, run_id="nap-42")
    fleet.wait_for(lambda: _waiting(store, "nap-42") == "sleep", 60, "the run to sleep")
    first.kill()                                                                # every worker, kill -9
    wf_clock.advance(2 * DAY + 1)
    wfapp.wf.send(stem, "nap-42", "review", {"stars": 5}, event_id="rv")
    fleet.process(wf_store, registry=WF_REGISTRY, concurrency=1)
    status = stem.wait_for_task("nap-42", timeout=60)
    assert status.state is TaskState.SUCCEEDED and status.result == EXPECTED
    assert _counts(ledger, "ship") == 1 and _counts(ledger, "charge") == 1


def test_a_child_stopped_mid_step_past_its_lease_is_fenced_out_when_it_resumes(wf_store, fleet, ledger, tmp_path):
    for _ in range(2):
        fleet.process(wf_store, registry=WF_REGISTRY, concurrency=2)
    stem = _producer(wf_store)
    store = wfapp.wf.store_for(stem.backend)
    hold = tmp_path / "hold"
    wfapp.wf.start(stem, "wf.zombie", {"ledger": str(ledger), "hold": str(hold)}, run_id="zombie")
    fleet.wait_for(lambda: _counts(ledger, "pid") == 1, 60, "the step to start")
    [line] = [line for line in ledger.ran() if line.startswith("pid")]
    stalled = int(line.split()[1])
    os.kill(stalled, signal.SIGSTOP)                       # executor A stops mid-step ...
    try:
        epoch = store.get("zombie").epoch
        hold.touch()
        # ... its lease runs out, the sweeper wakes the run, executor B claims it and finishes it
        status = stem.wait_for_task("zombie", timeout=60)
        assert status.state is TaskState.SUCCEEDED and status.result != stalled
        assert store.get("zombie").epoch > epoch
        journal = store.journal("zombie")
        record = store.get("zombie")
    finally:
        os.kill(stalled, signal.SIGCONT)                   # A resumes: its step returns ...
    # ... and its append is refused: it leaves nothing behind (it ends its activation quietly)
    fleet.wait_for(lambda: any("run zombie: the activation of epoch" in p.output() and "was fenced out" in p.output()
                               for p in fleet.procs), 20, "A's activation to end fenced out")
    deadline = time.monotonic() + 3 * wfapp.wf.lease
    while time.monotonic() < deadline:
        assert store.journal("zombie") == journal and store.get("zombie") == record
        time.sleep(0.05)
    assert stem.get_status("zombie").result == status.result
    assert _counts(ledger, "pid") == 2


def _two_day_sleep_across_restarts(store_, restart, fleet, ledger, wf_clock) -> None:
    try:
        first = fleet.process(store_, registry=WF_REGISTRY, concurrency=1)
        stem = _producer(store_)
        store = wfapp.wf.store_for(stem.backend)
        wfapp.wf.start(stem, "wf.order", {"ledger": str(ledger), "order_id": "42"}, run_id="restart-42")
        fleet.wait_for(lambda: _waiting(store, "restart-42") == "sleep", 60, "the run to sleep")
        first.kill()                                   # every worker ...
        restart()                                      # ... the broker and the store (one server) ...
        fleet.process(store_, registry=WF_REGISTRY, concurrency=1)     # ... and a new worker
        deadline = time.monotonic() + 5 * wfapp.wf.sweep_interval
        while time.monotonic() < deadline:             # never early: nothing after the sleep runs
            # (an activation may look at the sleeping run meanwhile: a late duplicate of the call's
            # event makes it due, and it parks on the same sleep again)
            assert _waiting(store, "restart-42") in ("sleep", None) and _counts(ledger, "ship") == 0
            time.sleep(0.05)
        wf_clock.advance(2 * DAY + 1)
        fleet.wait_for(lambda: _waiting(store, "restart-42") == "wait", 60, "the run to wake once and wait")
        wfapp.wf.send(stem, "restart-42", "review", {"stars": 5}, event_id="rv")
        status = stem.wait_for_task("restart-42", timeout=60)
        assert status.state is TaskState.SUCCEEDED and status.result == EXPECTED
        assert _counts(ledger, "ship") == 1 and _counts(ledger, "charge") == 1
    finally:
        fleet.close()
        store_.close()


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_two_day_sleep_survives_a_restart_of_redis_and_of_every_worker(redis_server, fleet, ledger, wf_clock):
    from tests.support import Store
    _two_day_sleep_across_restarts(Store("redis", redis_server.url, {"namespace": "wf"}), redis_server.restart,
                                   fleet, ledger, wf_clock)


@pytest.mark.postgres
@pytest.mark.timeout(150)
def test_a_two_day_sleep_survives_a_restart_of_postgres_and_of_every_worker(private_postgres, fleet, ledger,
                                                                             wf_clock):
    from tests.support import Store

    def restart() -> None:
        private_postgres.stop("immediate")
        private_postgres.start()

    _two_day_sleep_across_restarts(Store("postgres", private_postgres.url), restart, fleet, ledger, wf_clock)
