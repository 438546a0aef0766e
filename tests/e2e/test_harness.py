"""The harness itself (tests/support.py): a process that dies is reported at once with its
output, and nothing a test started outlives it."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.support import Fleet, wait_for

SILENT_EXIT = "import sys; print('loading the registry failed: boom', flush=True); sys.exit(3)"
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("READY", child.pid, flush=True)
time.sleep(120)
"""


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone for our purposes: its parent (the stubborn process) is dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_process_that_exits_before_it_is_ready_fails_the_start_at_once_with_its_output(tmp_path):
    fleet = Fleet(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(AssertionError, match=r"(?s)w0 exited with code 3.*boom"):
            fleet.start([sys.executable, "-c", SILENT_EXIT], ready="READY", timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        fleet.close()


def test_waiting_fails_at_once_when_a_process_nobody_stopped_exits(tmp_path):
    fleet = Fleet(tmp_path)
    try:
        fleet.start([sys.executable, "-c", "print('READY', flush=True); import sys; sys.exit(5)"], ready="READY")
        t0 = time.monotonic()
        with pytest.raises(AssertionError, match="w0 exited with code 5"):
            fleet.wait_for(lambda: False, 30, "something that never happens")
        assert time.monotonic() - t0 < 10
    finally:
        fleet.close()


def test_close_kills_a_process_that_ignores_sigterm_and_its_children(tmp_path):
    fleet = Fleet(tmp_path, stop_timeout=0.5)
    proc = fleet.start([sys.executable, "-c", STUBBORN], ready="READY")
    child = int(proc.lines("READY")[0].split()[1])
    fleet.close()
    assert proc.returncode is not None
    wait_for(lambda: gone(child), 10, "the child to die with its process group")
