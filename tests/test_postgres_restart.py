"""A private PostgreSQL cluster (initdb on a free port) restarted in the middle of a run."""

from __future__ import annotations

import uuid

import pytest

from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Message
from tests.conftest import REQUIRE_SERVICES
from tests.support import private_postgres_cluster
from tests.test_sqlite_broker import Q, drained, start_consumers, stop_consumers, wait_until

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.postgres


@pytest.fixture
def private_postgres():
    """A PostgreSQL cluster of the test's own (tests/support.py)."""
    with private_postgres_cluster(require=REQUIRE_SERVICES) as cluster:
        yield cluster


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
