"""Durable workflows under random kills: runs by the hundred over worker processes whose children
(and whole workers) are SIGKILLed at random; every run ends SUCCEEDED with its output, and no run
is ever without an owner or something that makes it due (checked on every sample of the store)."""

from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest

from stem import Stem
from stem.workflows.codec import decode
from tests.apps import wf as wfapp
from tests.e2e.conftest import make_store

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once

WF_REGISTRY = "tests.apps.wf:registry"


def _stranded(store, now: float) -> list[str]:
    """Runs that nothing would ever activate: not terminal, no live owner, nothing due, nothing
    awaited (the workflow of the stress run never waits for an event)."""
    bad, after = [], None
    while True:
        page = store.runs(limit=500, after=after)
        for r in page:
            if r.terminal:
                continue
            if r.status == "RUNNING" and r.owner and r.lease_until is not None:
                continue
            if r.status == "PENDING" and r.wake_at is not None:
                continue
            if r.status == "PARKED" and (r.wake_at is not None or r.waits_for is not None
                                         or r.inbox_count > r.inbox_seen):
                continue
            bad.append(f"{r.id} {r.status} waiting={decode(r.waiting) if r.waiting else None}")
        if len(page) < 500:
            return bad
        after = page[-1].id


def _kill_something(fleet, store_, rng) -> str:
    alive = [p for p in fleet.procs if p.returncode is None]
    victim = rng.choice(alive)
    if rng.random() < 0.15 and len(alive) > 1:
        victim.kill()
        fleet.process(store_, registry=WF_REGISTRY, concurrency=2)
        return f"worker {victim.label}"
    try:   # the task children, which the zygote forks (a zygote killed over and over stops its worker)
        children = [c for z in psutil.Process(victim.pid).children() for c in z.children()]
    except psutil.NoSuchProcess:
        return "none"
    if not children:
        return "none"
    child = rng.choice(children)
    try:
        os.kill(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        return "none"
    return f"child {child.pid} of {victim.label}"


def _stress(store_, fleet, ledger, runs: int, kill_for: float) -> None:
    rng = random.Random(27)
    for _ in range(3):
        fleet.process(store_, registry=WF_REGISTRY, concurrency=2)
    stem = Stem(store_.broker(), store_.backend(), wfapp.registry)
    store = wfapp.wf.store_for(stem.backend)
    ids = [wfapp.wf.start(stem, "wf.small", {"ledger": str(ledger), "n": i}, run_id=f"s{i:04d}") for i in range(runs)]
    kills, samples = [], 0
    stop_killing = time.monotonic() + kill_for
    while time.monotonic() < stop_killing and len(store.runs(status="SUCCEEDED", limit=runs)) < runs * 0.9:
        kills.append(_kill_something(fleet, store_, rng))
        assert _stranded(store, time.time()) == []
        samples += 1
        time.sleep(rng.uniform(0.1, 0.4))
    deadline = time.monotonic() + 60 + runs * 0.5
    while True:
        assert _stranded(store, time.time()) == []
        samples += 1
        done = store.runs(status="SUCCEEDED", limit=runs + 1)
        if len(done) == runs:
            break
        assert time.monotonic() < deadline, (f"{runs - len(done)} runs not done: "
                                             f"{[r.id + ' ' + r.status for r in store.runs(limit=runs) if not r.terminal][:10]}"
                                             f"\nkills: {kills}\n{fleet.logs()}")
        time.sleep(0.2)
    # The mirror follows the store's terminal write; a worker killed in between leaves it to the
    # next activation (its unacked one, redelivered after the lease), so wait for it, not read it.
    statuses = [stem.wait_for_task(run_id, timeout=60) for run_id in ids]
    assert [s.result for s in statuses] == [["a", i + 1, "b"] for i in range(runs)]
    ran = ledger.ran()
    assert all(ran[f"a s{i:04d}:g0:p0"] >= 1 and ran[f"b s{i:04d}:g0:p4"] >= 1 for i in range(runs))
    print(f"{runs} runs, {len([k for k in kills if k != 'none'])} kills, {samples} samples, "
          f"step executions: {sum(n for line, n in ran.items() if line[:2] in ('a ', 'b '))} for {2 * runs} "
          "step calls")


@pytest.fixture(params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("redis", marks=pytest.mark.redis)])
def wf_store(request, fleet):
    store = make_store(request.param, request)
    yield store
    fleet.close()
    store.close()


@pytest.mark.timeout(300)
def test_runs_under_random_kills_all_end_succeeded_and_none_is_ever_stranded(wf_store, fleet, ledger):
    _stress(wf_store, fleet, ledger, runs=40, kill_for=8.0)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_thousand_runs_under_random_kills_all_end_succeeded_and_none_is_ever_stranded(wf_store, fleet, ledger):
    _stress(wf_store, fleet, ledger, runs=1000, kill_for=600.0)
