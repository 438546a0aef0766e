"""Keys on the SQL brokers beyond the contract: the schema upgrade that brings them (version 2
-> 3, in place), and their release by the backend's fused result+ack transaction."""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from stem.backends import from_url as backend_from_url
from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Keyed, Message
from stem.results import TaskState, TaskStatus
from stem.stores import postgres_schema, sqlite_schema

Q = "upgraded"


def keyed(key: str, linger: float = 0.0) -> Keyed:
    return Keyed(Message(uuid.uuid4().hex, Q, b"new"), key, 600.0, linger)


def check_upgraded(broker) -> None:
    """The rows written under version 2 are delivered, dead-lettered and replayed as before (no
    key), and the upgraded tables take keys."""
    [d] = broker.consume([Q], 5, 5.0)
    assert (d.task_id, bytes(d.frame), d.key) == ("old-ready", b"old", None)
    broker.ack([d])
    [dl] = broker.dead_letters(Q)
    assert (dl.task_id, dl.reason, dl.key) == ("old-dead", "poison", None)
    assert broker.replay(Q) == 1
    [d] = broker.consume([Q], 5, 5.0)
    assert d.task_id == "old-dead" and d.key is None
    broker.dead_letter(d, "again")
    assert broker.replay(Q) == 1
    broker.ack(broker.consume([Q], 5, 5.0))

    first, second = keyed("k"), keyed("k")
    assert broker.publish_keyed([first, second]) == [None, first.message.task_id]
    [d] = broker.consume([Q], 5, 5.0)
    assert d.key == "k"
    broker.ack([d])
    assert broker.key_owner(Q, "k") is None
    assert broker.stats(Q)[1:5] == (0, 0, 0, 0)


def test_a_version_2_sqlite_file_upgrades_in_place_keeps_its_rows_and_then_takes_keys(tmp_path):
    path = str(tmp_path / "v2.db")
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("CREATE TABLE stem_schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
    for version in (1, 2):          # versions are append-only: these are what stem wrote before keys
        for statement in sqlite_schema.MIGRATIONS[version]:
            raw.execute(statement)
        raw.execute("INSERT INTO stem_schema_version VALUES (?, ?)", (version, time.time()))
    raw.execute("INSERT INTO stem_queues VALUES (?)", (Q,))
    raw.execute("INSERT INTO stem_messages (queue, task_id, priority, state, available_at, frame) "
                "VALUES (?, 'old-ready', 0, 0, ?, ?)", (Q, time.time(), b"old"))
    raw.execute("INSERT INTO stem_dead_letters (queue, task_id, reason, failed_at, frame) "
                "VALUES (?, 'old-dead', 'poison', ?, ?)", (Q, time.time(), b"dead"))
    raw.close()

    broker = broker_from_url(f"sqlite:///{path}")
    try:
        assert broker.migrate() == sqlite_schema.SCHEMA_VERSION
        with sqlite3.connect(path) as raw:
            assert raw.execute("SELECT version FROM stem_schema_version ORDER BY 1").fetchall() == [
                (v,) for v in range(1, sqlite_schema.SCHEMA_VERSION + 1)]
        raw.close()
        check_upgraded(broker)
    finally:
        broker.close()


@pytest.mark.postgres
def test_a_version_2_postgres_schema_upgrades_in_place_keeps_its_rows_and_then_takes_keys(postgres_url, namespace):
    import psycopg
    s = postgres_schema.quote_schema(namespace)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {s}")
        conn.execute(f"CREATE TABLE {s}.stem_schema_version (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for version in (1, 2):
            for statement in postgres_schema.MIGRATIONS[version]:
                conn.execute(statement.format(s=s))
            conn.execute(f"INSERT INTO {s}.stem_schema_version (version) VALUES (%s)", (version,))
        conn.execute(f"INSERT INTO {s}.stem_queues VALUES (%s)", (Q,))
        conn.execute(f"INSERT INTO {s}.stem_jobs (queue, task_id, priority, state, available_at, frame) "
                     "VALUES (%s, 'old-ready', 0, 0, extract(epoch FROM now()), %s)", (Q, b"old"))
        conn.execute(f"INSERT INTO {s}.stem_dead_letters (queue, task_id, reason, failed_at, frame) "
                     "VALUES (%s, 'old-dead', 'poison', extract(epoch FROM now()), %s)", (Q, b"dead"))
    broker = broker_from_url(f"{postgres_url}?schema={namespace}")
    try:
        assert broker.migrate() == postgres_schema.SCHEMA_VERSION
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            assert conn.execute(f"SELECT version FROM {s}.stem_schema_version ORDER BY 1").fetchall() == [
                (v,) for v in range(1, postgres_schema.SCHEMA_VERSION + 1)]
        check_upgraded(broker)
    finally:
        broker.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    import psycopg
    url, schema = request.getfixturevalue("postgres_url"), request.getfixturevalue("namespace")
    yield f"{url}?schema={schema}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_the_fused_result_and_ack_releases_keys_as_the_brokers_ack_does(shared_url):
    broker, backend = broker_from_url(shared_url), backend_from_url(shared_url)
    try:
        gone, lingering = keyed("gone"), keyed("lingering", linger=600.0)
        plain = Message("plain", Q, b"plain")
        assert broker.publish_keyed([gone, lingering]) == [None, None]
        broker.publish(plain)
        # "gone" is released early (unique_until="started") and another task takes it: the ack must spare it
        ds = broker.consume([Q], 3, 5.0)
        assert {d.key for d in ds} == {"gone", "lingering", None}
        assert broker.release_key(Q, "gone", gone.message.task_id) is True
        thief = keyed("gone")
        assert broker.publish_keyed([thief]) == [None]
        statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, result=1) for d in ds]
        assert backend.store_many_and_ack(statuses, broker, ds) is True
        assert broker.key_owner(Q, "gone") == thief.message.task_id
        assert broker.key_owner(Q, "lingering") == lingering.message.task_id     # linger keeps it
        assert broker.publish_keyed([keyed("lingering")]) == [lingering.message.task_id]
        assert all(s is not None and s.succeeded for s in backend.get_many([d.task_id for d in ds]))
        assert broker.stats(Q).in_flight == 0 and broker.stats(Q).ready == 1    # the thief's message
    finally:
        broker.close()
        backend.close()


def _key_rows(url: str) -> list[str]:
    """Every row of stem_keys, expired or not."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url[len("sqlite:///"):]) as raw:
            rows = raw.execute("SELECT key FROM stem_keys ORDER BY key").fetchall()
        raw.close()
        return [r[0] for r in rows]
    import psycopg
    base, schema = url.split("?schema=")
    with psycopg.connect(base, autocommit=True) as conn:
        return [r[0] for r in conn.execute(f'SELECT key FROM "{schema}".stem_keys ORDER BY key').fetchall()]


def test_publish_keyed_sweeps_expired_keys_now_and_then(shared_url):
    from tests.support import wait_for
    broker = broker_from_url(shared_url)
    try:
        short = Keyed(Message(uuid.uuid4().hex, Q, b"x"), "short", 0.2)
        assert broker.publish_keyed([short]) == [None]
        wait_for(lambda: broker.key_owner(Q, "short") is None, 10.0, what="the short key to expire")
        assert broker.publish_keyed([keyed("later")]) == [None]
        assert _key_rows(shared_url) == ["later", "short"]      # expired, not yet swept: reads as free
        broker._next_key_sweep = 0.0                           # the minute since the last sweep is up
        assert broker.publish_keyed([keyed("latest")]) == [None]
        assert _key_rows(shared_url) == ["later", "latest"]
    finally:
        broker.close()
