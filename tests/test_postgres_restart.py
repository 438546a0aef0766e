"""A private PostgreSQL cluster (initdb on a free port) restarted in the middle of a run."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Message
from tests.conftest import REQUIRE_SERVICES
from tests.test_sqlite_broker import Q, drained, start_consumers, stop_consumers, wait_until

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.postgres


def _bindir() -> str | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateCluster:
    def __init__(self, bindir: str, root: str, as_user: list[str]):
        self.bindir, self.root, self.as_user = bindir, root, as_user
        self.data = os.path.join(root, "data")
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self.as_user, os.path.join(self.bindir, args[0]), *args[1:]], check=True,
                       timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-w", "-t", "30", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop")


@pytest.fixture
def private_postgres():
    bindir = _bindir()
    if bindir is None:
        if REQUIRE_SERVICES:
            pytest.fail("initdb not found and STEM_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip("initdb not found (install postgresql)")
    root = tempfile.mkdtemp(prefix="stem-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:        # initdb refuses to run as root
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = PrivateCluster(bindir, root, as_user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        except subprocess.SubprocessError:
            pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
def test_consumers_resume_after_a_postgres_restart_and_nothing_is_lost(private_postgres):
    url = private_postgres.url
    broker = broker_from_url(url, reconnect_timeout=30)
    first = [uuid.uuid4().hex for _ in range(3000)]
    second = [uuid.uuid4().hex for _ in range(1000)]
    broker.publish_many([Message(t, Q, b"x", visibility_timeout=2.0) for t in first])
    procs, stop, out = start_consumers(url, {"reconnect_timeout": 30}, 2, batch=10)
    try:
        assert wait_until(lambda: broker.stats(Q).ready < 2500, timeout=30), "the consumers never started"
        private_postgres.stop("fast")
        private_postgres.start()
        # a publish right after the restart reconnects by itself
        broker.publish_many([Message(t, Q, b"y", visibility_timeout=2.0) for t in second])
        assert wait_until(lambda: drained(broker), timeout=60), broker.stats(Q)
        assert all(p.is_alive() for p in procs), "a consumer died instead of reconnecting"
        assert broker.stats(Q).dead == 0
    finally:
        results = stop_consumers(procs, stop, out)
        broker.close()
    delivered = {t for got in results.values() for t, _ in got}
    assert delivered == set(first) | set(second), f"{len(set(first) | set(second) - delivered)} messages lost"
