"""The workflow store on SQL beyond the contract suite: it lives beside the result backends,
its sweeper queries read indexes only, older databases upgrade to it, and a writer killed in
the middle of a transaction leaves nothing half done."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time

import pytest

from stem.backends import from_url as backend_from_url
from stem.backends.memory import InMemoryResultBackend
from stem.backends.postgres import PostgresResultBackend
from stem.backends.sqlite import SqliteResultBackend
from stem.errors import BackendConnectionError, BackendError, ConfigurationError
from stem.workflows.store import PARKED, RUNNING, SUCCEEDED, open_store
from stem.workflows.store_memory import MemoryWorkflowStore
from stem.workflows.store_sql import PostgresWorkflowStore, SQLiteWorkflowStore
from tests.support import current_version, schema_versions, sql_rows, store_at_version

T0 = 1_700_000_000.5


@pytest.fixture
def sqlite_backend(tmp_path):
    backend = SqliteResultBackend(str(tmp_path / "wf.db"))
    yield backend
    backend.close()


@pytest.fixture
def pg_backend(postgres_url, namespace):
    import psycopg
    backend = PostgresResultBackend(postgres_url, schema=namespace)
    yield backend
    backend.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


def test_open_store_gives_each_result_backend_the_store_that_lives_beside_it(sqlite_backend, tmp_path):
    assert isinstance(open_store(sqlite_backend), SQLiteWorkflowStore)
    memory_sqlite = SqliteResultBackend(None)
    try:
        assert isinstance(open_store(memory_sqlite), SQLiteWorkflowStore)
    finally:
        memory_sqlite.close()
    memory = InMemoryResultBackend()
    assert isinstance(open_store(memory), MemoryWorkflowStore) and open_store(memory) is open_store(memory)
    with pytest.raises(ConfigurationError, match="memory, SQLite, Postgres or Redis result backend"):
        open_store(object())


class ResultsOfAnotherModule(SqliteResultBackend):
    """A backend whose module is not ``stem.backends.sqlite``: it still names its store."""


class NamesNoStore(InMemoryResultBackend):
    def workflow_store_recipe(self):
        return None


class NamesAStranger(InMemoryResultBackend):
    def workflow_store_recipe(self):
        return ("stem.workflows.store:open_store", self)


def test_the_backend_names_its_workflow_store_whatever_its_module(tmp_path):
    backend = ResultsOfAnotherModule(str(tmp_path / "sub.db"))
    try:
        assert type(backend).__module__ != "stem.backends.sqlite"
        store = open_store(backend)
        assert isinstance(store, SQLiteWorkflowStore) and store.create("r", "n", "1", b"", now=T0)[0]
    finally:
        backend.close()
    with pytest.raises(ConfigurationError, match="NamesNoStore keeps no runs"):
        open_store(NamesNoStore())
    with pytest.raises(ConfigurationError, match="not a WorkflowStore class"):
        open_store(NamesAStranger())


@pytest.mark.postgres
def test_open_store_gives_a_postgres_backend_the_store_in_its_schema(pg_backend, namespace):
    store = open_store(pg_backend)
    assert isinstance(store, PostgresWorkflowStore)
    store.create("r", "n", "1", b"", now=T0)
    assert PostgresWorkflowStore.for_backend(pg_backend).get("r").id == "r"
    assert f'"{namespace}".stem_wf_runs' in store.sql["get"]


@pytest.mark.postgres
def test_the_async_postgres_backend_gets_the_store_beside_the_backend_it_reads(pg_backend, namespace):
    from stem.backends.postgres_async import AsyncPostgresResults
    results = AsyncPostgresResults(pg_backend)
    store = open_store(results)
    assert isinstance(store, PostgresWorkflowStore) and f'"{namespace}".stem_wf_runs' in store.sql["get"]
    assert store.create("async", "n", "1", b"", now=T0)[0]
    assert open_store(pg_backend).get("async").status == "PENDING"     # one store, on the backend's sessions


def test_the_store_writes_in_the_backends_own_file_and_connections(sqlite_backend, tmp_path):
    store = open_store(sqlite_backend)
    store.create("r", "n", "1", b"in", now=T0)
    assert sqlite_backend.sqlite_store.connections() == 1          # this thread's, the backend's
    with sqlite3.connect(str(tmp_path / "wf.db")) as raw:
        assert raw.execute("SELECT id, input FROM stem_wf_runs").fetchall() == [("r", b"in")]
    raw.close()


# -- the sweeper reads indexes only ------------------------------------------------------------

def test_sqlite_due_and_parked_on_are_index_searches(sqlite_backend):
    store = open_store(sqlite_backend)
    store.get("warm-up")
    with sqlite_backend.sqlite_store.connection() as conn:
        plans = {key: " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + store.sql[key], params))
                 for key, params in (("due", (T0, T0, 10)), ("parked_on", (10,)), ("parked_on_after", ("a", 10)))}
    assert "USING INDEX stem_wf_runs_due (due_at<?)" in plans["due"]
    assert "USING INDEX stem_wf_runs_parked_on" in plans["parked_on"]
    assert "USING INDEX stem_wf_runs_parked_on (id>?)" in plans["parked_on_after"]


@pytest.mark.postgres
def test_postgres_due_reads_its_index_not_the_terminal_runs(pg_backend, postgres_url, namespace):
    """20,000 finished runs and 500 sleeping ones: the generic plan the store's sessions use (and
    the planner's free choice, sequential scans allowed) is an index range that touches a few pages."""
    import psycopg
    store = open_store(pg_backend)
    for n in range(3):
        store.create(f"due-{n}", "n", "1", b"", now=T0)
    s = f'"{namespace}"'
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {s}.stem_wf_runs (id, name, version, input, status, epoch, created_at, updated_at) "
                     "SELECT 'done-' || g, 'n', '1', '', 'SUCCEEDED', 1, 0, 0 FROM generate_series(1, 20000) g")
        conn.execute(f"INSERT INTO {s}.stem_wf_runs (id, name, version, input, status, epoch, wake_at, created_at, "
                     "updated_at) SELECT 'sleep-' || g, 'n', '1', '', 'PARKED', 1, 1e12, 0, 0 "
                     "FROM generate_series(1, 500) g")
        conn.execute(f"ANALYZE {s}.stem_wf_runs")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        statement = store.sql["due"]
        for n in (1, 2, 3):
            statement = statement.replace("%s", f"${n}", 1)
        conn.execute(f"PREPARE due_q(float8, float8, int8) AS {statement}")
        plan = "\n".join(r[0] for r in conn.execute(
            f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE due_q({T0 + 1!r}, {T0 + 1!r}, 500)", prepare=False))
    assert "Index Scan using stem_wf_runs_due" in plan, plan
    assert "Seq Scan" not in plan and "Sort" not in plan, plan
    execution = plan.split("Planning")[0]          # the planner's own catalog reads are not the scan's
    hits = [int(part.split("=")[1]) for line in execution.splitlines() if "Buffers: shared hit=" in line
            for part in line.split() if part.startswith("hit=")]
    assert hits and max(hits) < 20, plan
    assert sorted(store.due(now=T0 + 1)) == [(f"due-{n}", "start", 0, T0) for n in range(3)]


# -- upgrades ----------------------------------------------------------------------------------

# a run parked on a task by a store of schema version 7 or 8 (no waits_kind column)
PARKED_BEFORE_9 = {
    "sqlite": ("INSERT INTO stem_wf_runs (id, name, version, input, status, epoch, waits_for, created_at, "
               "updated_at) VALUES ('parked', 'n', '1', X'', 'PARKED', 1, 'parked:c0:e1', 0, 0)", ()),
    "postgres": ("INSERT INTO {s}.stem_wf_runs (id, name, version, input, status, epoch, waits_for, created_at, "
                 "updated_at) VALUES ('parked', 'n', '1', '', 'PARKED', 1, 'parked:c0:e1', 0, 0)", ()),
}


@pytest.mark.parametrize("old", [6, 8])
def test_an_older_store_upgrades_in_place_and_takes_runs(sql_url, old):
    kind = "sqlite" if sql_url.startswith("sqlite") else "postgres"
    rows = [PARKED_BEFORE_9[kind]] if old >= 7 else []
    if kind == "sqlite":
        rows.append(("INSERT INTO stem_results VALUES ('old', 'SUCCEEDED', ?, ?)", (time.time() + 3600, b"x")))
    with store_at_version(sql_url, old, *rows) as url:
        backend = backend_from_url(url)
        try:
            store = open_store(backend)
            assert store.create("r", "n", "1", b"", now=T0)[0]
            assert schema_versions(url) == list(range(1, current_version(url) + 1))
            if kind == "sqlite":
                assert sql_rows(url, "SELECT task_id FROM stem_results") == [("old",)]
            else:
                assert sql_rows(url, "SELECT collation_name FROM information_schema.columns WHERE table_schema = "
                                     "current_schema() AND table_name = 'stem_wf_runs' AND column_name = 'id'") == [
                    ("C",)]
            if old >= 7:        # listed without a kind, and claimed as any parked run
                assert store.parked_on() == [("parked", "parked:c0:e1", None)]
                assert store.get("parked").waits_kind is None
                assert store.claim("parked", "w", now=T0, lease=30.0).epoch == 2
        finally:
            backend.close()


# -- errors ------------------------------------------------------------------------------------

def test_a_closed_sqlite_database_is_the_backends_error():
    backend = SqliteResultBackend(None)
    store = open_store(backend)
    store.create("r", "n", "1", b"", now=T0)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        store.get("r")
    with pytest.raises(BackendError, match="closed"):
        store.claim("r", "w", now=T0, lease=1.0)


def test_an_unreachable_postgres_is_the_backends_connection_error():
    backend = PostgresResultBackend("postgresql://postgres@127.0.0.1:1/postgres", schema="wf_nowhere",
                                    reconnect_timeout=0.3)
    try:
        store = open_store(backend)
        with pytest.raises(BackendConnectionError, match="gave up"):
            store.claim("r", "w", now=T0, lease=1.0)
    finally:
        backend.close()


# -- a writer killed mid-transaction ------------------------------------------------------------

class _DieAt:
    """A connection that kills its process (SIGKILL) when it is about to run ``statement``:
    whatever the transaction wrote before is in flight, never committed."""

    def __init__(self, conn, statement):
        self._conn, self._statement = conn, statement

    def execute(self, statement, params=()):
        if statement == self._statement:
            os.kill(os.getpid(), signal.SIGKILL)
        return self._conn.execute(statement, params)

    def cursor(self):
        return self._conn.cursor()


def _open_like(backend):
    if isinstance(backend, SqliteResultBackend):
        other = SqliteResultBackend(backend.sqlite_store.path)
    else:
        other = PostgresResultBackend(backend.url, schema=backend.schema)
    return open_store(other)


def _die_in(backend, statement_key, op):
    store = _open_like(backend)
    store.get("warm-up")
    write = store._write
    statement = store.sql[statement_key]
    store._write = lambda fn: write(lambda conn: fn(_DieAt(conn, statement)))
    op(store)
    os._exit(0)          # not reached when the statement was: the test asserts the kill


CASES = {
    # op: (the statement the writer dies before, what it calls)
    "append": ("insert_entry", lambda s, r: s.append(r["child"], r["epoch"], 1, "step", "b", now=T0)),
    "finish": ("insert_event", lambda s, r: s.finish(r["child"], r["epoch"], SUCCEEDED, result=b"r", now=T0)),
    "cancel": ("insert_event", lambda s, r: s.cancel(r["child"], now=T0)),
    "continue_as_new": ("drop_journal", lambda s, r: s.continue_as_new(r["child"], r["epoch"], b"new",
                                                                       drop_events=[1], now=T0)),
    "reset": ("drop_journal", lambda s, r: s.reset(r["child"], 0, now=T0)),
    "send": ("count_event", lambda s, r: s.send(r["child"], "t", "e2", b"", now=T0)),
}


# an append is one statement on Postgres: there is no middle to die in
@pytest.mark.parametrize("kind, op", [(k, op) for k in ("sqlite", "postgres") for op in sorted(CASES)
                                      if (k, op) != ("postgres", "append")])
def test_a_writer_killed_mid_transaction_leaves_nothing_half_done(request, kind, op):
    sql_backend = request.getfixturevalue(f"{'sqlite' if kind == 'sqlite' else 'pg'}_backend")
    store = open_store(sql_backend)
    store.create("parent", "n", "1", b"", now=T0)
    parent = store.claim("parent", "w", now=T0, lease=60.0)
    assert store.park("parent", parent.epoch, wake_at=None, waiting=b"child", waits_for="child",
                      waits_kind="child", inbox_seen=0, now=T0) == "parked"
    store.create("child", "n", "1", b"", now=T0, parent="parent")
    child = store.claim("child", "w", now=T0, lease=60.0)
    assert store.append("child", child.epoch, 0, "step", "a", output=b"o", now=T0)
    assert store.send("child", "t", "e1", b"", now=T0)[0]
    before = (store.get("parent"), store.get("child"), store.journal("child"), store.events("child"),
              store.events("parent"), store.due(now=T0 + 1))
    statement_key, call = CASES[op]
    refs = {"child": "child", "epoch": child.epoch}
    proc = multiprocessing.get_context("fork").Process(target=_die_in,
                                                       args=(sql_backend, statement_key, lambda s: call(s, refs)))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL, "the writer was not killed inside its transaction"
    after = (store.get("parent"), store.get("child"), store.journal("child"), store.events("child"),
             store.events("parent"), store.due(now=T0 + 1))
    assert after == before
    # and the same call from a live writer goes through whole
    assert call(store, refs) not in (False, None, (False, None))
    got = store.get("child")
    if op in ("finish", "cancel"):
        assert store.get("parent").status == PARKED and [d.reason for d in store.due(now=T0)] == ["inbox"]
        assert [e.event_id for e in store.events("parent")] == ["child"]
    elif op == "append":
        assert [e.position for e in store.journal("child")] == [0, 1]
    elif op == "continue_as_new":
        assert (got.generation, store.journal("child"), [e.seq for e in store.events("child")]) == (1, [], [])
    elif op == "reset":
        assert (got.epoch, store.journal("child")) == (child.epoch + 1, [])
    elif op == "send":
        assert (got.status, got.inbox_count, [e.event_id for e in store.events("child")]) == (RUNNING, 2,
                                                                                            ["e1", "e2"])
