"""A worker process's shutdown signals, on every broker a process can share: SIGTERM (warm)
lets its running tasks finish and exits 0; SIGQUIT (hard) kills them and gives their
deliveries back at once, so another worker runs them long before their visibility timeout."""

from __future__ import annotations

import signal
import time

import pytest

from tests.support import all_succeeded

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once

IDLE = (0, 0, 0, 0)


@pytest.mark.timeout(90)
def test_sigterm_lets_the_running_tasks_finish_and_the_worker_process_exits_zero(process_store, fleet, ledger,
                                                                                tmp_path):
    gate = tmp_path / "release"
    worker = fleet.process(process_store, concurrency=2)
    stem = process_store.producer()
    ids = stem.enqueue_many([("e2e.effect", {"n": i, "ledger": str(ledger), "hold": str(gate)}) for i in range(2)])
    fleet.wait_for(lambda: ledger.total() == 2, 30, "both tasks to start")
    worker.send(signal.SIGTERM)
    fleet.wait_for(lambda: worker.lines("warm shutdown") or worker.returncode is not None, 20,
                   "the worker to take the SIGTERM")
    assert worker.returncode is None, "the worker exited with its tasks still running\n" + worker.output()
    gate.touch()
    assert worker.popen.wait(30) == 0, worker.output()
    assert all_succeeded(stem.backend, ids), [stem.get_status(i).state for i in ids]
    assert ledger.ran() == {i: 1 for i in ids}
    assert stem.broker.stats("default")[1:5] == IDLE


@pytest.mark.timeout(90)
def test_sigquit_gives_the_running_tasks_back_at_once_and_another_worker_runs_them(process_store, fleet, ledger,
                                                                                  tmp_path):
    vt = 30.0          # far beyond the test's wait: only an explicit give-back brings them back
    gate = tmp_path / "release"
    worker = fleet.process(process_store, concurrency=2, visibility_timeout=vt)
    stem = process_store.producer()
    ids = stem.enqueue_many([("e2e.effect", {"n": i, "ledger": str(ledger), "hold": str(gate)}) for i in range(2)])
    fleet.wait_for(lambda: ledger.total() == 2, 30, "both tasks to start")
    quit_at = time.monotonic()
    assert worker.stop(signal.SIGQUIT) == 0, worker.output()
    assert stem.broker.stats("default")[1:5] == (2, 0, 0, 0), "the killed tasks were not given back"
    assert not any(stem.get_status(i).is_terminal for i in ids)
    gate.touch()
    fleet.process(process_store, concurrency=2, visibility_timeout=vt, label="rescuer")
    fleet.wait_for(lambda: all_succeeded(stem.backend, ids), 20, "the rescuer to run both")
    assert time.monotonic() - quit_at < vt
    assert ledger.ran() == {i: 2 for i in ids}          # once killed, once run to the end
    assert stem.broker.stats("default")[1:5] == IDLE
