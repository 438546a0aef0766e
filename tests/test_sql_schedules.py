"""Schedule records on the SQL backends beyond the contract: the schema upgrade that brings
``stem_schedules`` (version 3 -> 4, in place) keeps what a version-3 store holds."""

from __future__ import annotations

import sqlite3
import time

import pytest

from stem.backends import from_url as backend_from_url
from stem.stores import postgres_schema, sqlite_schema

V3 = (1, 2, 3)      # versions are append-only: these are what stem wrote before schedules


def check_upgraded(backend) -> None:
    """The status and key rows written under version 3 are still there; schedules work."""
    assert backend.get("old-task").result == "kept"
    assert backend.revoked(["old-revoked"]) == {"old-revoked"}
    assert backend.schedule_records() == {}
    backend.put_schedule("nightly", b"def")
    backend.mark_fired("nightly", 1_700_000_000.5, "sched:nightly:1700000000500")
    assert backend.pause_schedule("nightly", True) is True
    r = backend.schedule_records()["nightly"]
    assert (r.definition, r.paused, r.last_fired, r.last_run_id) == (b"def", True, 1_700_000_000.5,
                                                                     "sched:nightly:1700000000500")


def old_status() -> bytes:
    from stem.results import TaskState, TaskStatus, encode_status
    return encode_status(TaskStatus(id="old-task", state=TaskState.SUCCEEDED, result="kept"))


def test_a_version_3_sqlite_file_upgrades_in_place_and_then_keeps_schedules(tmp_path):
    path = str(tmp_path / "v3.db")
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("CREATE TABLE stem_schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
    for version in V3:
        for statement in sqlite_schema.MIGRATIONS[version]:
            raw.execute(statement)
        raw.execute("INSERT INTO stem_schema_version VALUES (?, ?)", (version, time.time()))
    raw.execute("INSERT INTO stem_results VALUES ('old-task', 'SUCCEEDED', ?, ?)", (time.time() + 600, old_status()))
    raw.execute("INSERT INTO stem_revocations VALUES ('old-revoked', ?, NULL)", (time.time() + 600,))
    raw.execute("INSERT INTO stem_keys VALUES ('q', 'k', 'owner', ?)", (time.time() + 600,))
    raw.close()

    backend = backend_from_url(f"sqlite:///{path}")
    try:
        assert backend.migrate() == sqlite_schema.SCHEMA_VERSION >= 4
        with sqlite3.connect(path) as raw:
            assert raw.execute("SELECT version FROM stem_schema_version ORDER BY 1").fetchall() == [
                (v,) for v in range(1, sqlite_schema.SCHEMA_VERSION + 1)]
            assert raw.execute("SELECT queue, key, owner FROM stem_keys").fetchall() == [("q", "k", "owner")]
        raw.close()
        check_upgraded(backend)
        assert backend.migrate() == sqlite_schema.SCHEMA_VERSION        # idempotent
    finally:
        backend.close()


@pytest.mark.postgres
def test_a_version_3_postgres_schema_upgrades_in_place_and_then_keeps_schedules(postgres_url, namespace):
    import psycopg
    s = postgres_schema.quote_schema(namespace)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {s}")
        conn.execute(f"CREATE TABLE {s}.stem_schema_version (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for version in V3:
            for statement in postgres_schema.MIGRATIONS[version]:
                conn.execute(statement.format(s=s))
            conn.execute(f"INSERT INTO {s}.stem_schema_version (version) VALUES (%s)", (version,))
        conn.execute(f"INSERT INTO {s}.stem_results VALUES ('old-task', 'SUCCEEDED', "
                     "extract(epoch FROM now()) + 600, %s)", (old_status(),))
        conn.execute(f"INSERT INTO {s}.stem_revocations VALUES ('old-revoked', extract(epoch FROM now()) + 600, NULL)")
        conn.execute(f"INSERT INTO {s}.stem_keys VALUES ('q', 'k', 'owner', extract(epoch FROM now()) + 600, 1)")
    backend = backend_from_url(f"{postgres_url}?schema={namespace}")
    try:
        assert backend.migrate() == postgres_schema.SCHEMA_VERSION >= 4
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            assert conn.execute(f"SELECT version FROM {s}.stem_schema_version ORDER BY 1").fetchall() == [
                (v,) for v in range(1, postgres_schema.SCHEMA_VERSION + 1)]
            assert conn.execute(f"SELECT queue, key, owner FROM {s}.stem_keys").fetchall() == [("q", "k", "owner")]
        check_upgraded(backend)
        assert backend.migrate() == postgres_schema.SCHEMA_VERSION
    finally:
        backend.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
