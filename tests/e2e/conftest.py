"""The end-to-end suite's fixtures: a store of each broker kind (as ``tests/contract/`` does
with its adapters), the fleet of workers of a test, and the ledger of what ran.

``store`` is every kind (``memory`` too: for what runs in one process); ``process_store`` the
kinds a worker process can share (SQLite, Redis, a Redis Cluster, PostgreSQL).  Each store is the test's own: a
file, a Redis namespace or a PostgreSQL schema, removed afterwards, and its workers are stopped
before it is.
"""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import REQUIRE_SERVICES
from tests.support import Fleet, Ledger, Store, drop_namespace, private_postgres_cluster

PROCESS_KINDS = [pytest.param("sqlite"), pytest.param("redis", marks=pytest.mark.redis),
                 pytest.param("cluster", marks=pytest.mark.redis),
                 pytest.param("postgres", marks=pytest.mark.postgres)]
KINDS = [pytest.param("memory"), *PROCESS_KINDS]


def make_store(kind: str, request) -> Store:
    name = "stemtest_" + uuid.uuid4().hex[:12]
    if kind == "memory":
        return Store(kind, f"memory://{name}")
    if kind == "sqlite":
        return Store(kind, f"sqlite:///{request.getfixturevalue('tmp_path') / 'stem.db'}")
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        store = Store(kind, url, {"namespace": name})

        def drop() -> None:
            import redis
            with redis.Redis.from_url(url) as client:
                drop_namespace(client, name)

        store.on_close(drop)
        return store
    if kind == "cluster":   # the session's 3-primary Redis Cluster
        url = request.getfixturevalue("warm_redis_cluster").url()
        raw = request.getfixturevalue("raw_clients")(url)
        store = Store("redis", url, {"namespace": name})

        def drop_cluster() -> None:
            drop_namespace(raw, name)

        store.on_close(drop_cluster)
        return store
    if kind == "postgres":
        psycopg = pytest.importorskip("psycopg")
        url = request.getfixturevalue("postgres_url")
        store = Store(kind, f"{url}?schema={name}")

        def drop() -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

        store.on_close(drop)
        return store
    raise ValueError(f"no store kind {kind!r}")


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path / "fleet")
    yield fleet
    fleet.close()


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "ledger")


def _store(request, fleet):
    store = make_store(request.param, request)
    yield store
    fleet.close()          # its workers first: then nothing uses the store being removed
    store.close()


@pytest.fixture(params=KINDS)
def store(request, fleet):
    yield from _store(request, fleet)


@pytest.fixture(params=PROCESS_KINDS)
def process_store(request, fleet):
    yield from _store(request, fleet)


@pytest.fixture
def private_postgres():
    """A PostgreSQL cluster of the test's own, to restart (tests/support.py)."""
    pytest.importorskip("psycopg")
    with private_postgres_cluster(require=REQUIRE_SERVICES) as cluster:
        yield cluster
