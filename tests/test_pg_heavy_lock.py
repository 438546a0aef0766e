"""The machine-wide lock that keeps the PostgreSQL-hungry tests one at a time (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import PG_HEAVY_LOCK

_TRY_LOCK = ("import fcntl, sys\n"
             "f = open(sys.argv[1], 'a')\n"
             "try:\n"
             "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError:\n"
             "    sys.exit(3)\n")


@pytest.mark.pg_heavy
def test_a_pg_heavy_test_on_postgres_holds_the_lock_while_it_runs(postgres_url):
    """Another test process (the other build, another xdist worker) cannot take it now."""
    taken = subprocess.run([sys.executable, "-c", _TRY_LOCK, PG_HEAVY_LOCK], timeout=30)
    assert taken.returncode == 3
