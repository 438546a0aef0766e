"""The workflow store on SQL: SQLite and Postgres, in the result backend's own database.

Three tables (schema version 7, ``waits_kind`` version 10, created by the stores' migrations beside the backend's
tables: ``stem/stores/sqlite_schema.py``, ``postgres_schema.py``):

* ``stem_wf_runs``: one row per run, the ``RunRecord`` columns plus ``journal_length``
  (the position the next append must name) and ``due_at``, a generated column: when the run
  next needs an activation (``wake_at`` of a PENDING run, ``lease_until`` of a RUNNING one,
  ``wake_at`` of a PARKED one, or minus infinity while a PARKED run has unread events; NULL
  otherwise).  ``due`` is one ordered range scan of a partial index on it: terminal and
  waiting runs are not in that index at all.
* ``stem_wf_journal``: primary key (run, position), the position an integer.
* ``stem_wf_events``: primary key (run, seq), unique (run, event id).

Every operation is one transaction.  Fencing is a compare-and-set on the run row
(``UPDATE ... WHERE epoch = ? AND status = 'RUNNING'`` and its row count); every
transaction that writes more than the run row takes the run row first (the fencing UPDATE,
or ``SELECT ... FOR UPDATE`` on Postgres; SQLite's ``BEGIN IMMEDIATE`` serialises all
writers), then the run's journal or events, then a parent's row: racing writers queue on one
row instead of deadlocking.  An append bumps ``journal_length`` in the same fenced UPDATE, so
two writers of one position serialise on the run row and the second finds the length moved.
Times are the ``now`` the caller passes, never the database server's clock.

The SQL is shared where the dialects agree: statements are written once with ``?``
placeholders and ``{runs}``-style table names, and each dialect formats them.

Postgres: an operation of one statement (create, claim, renew, append, park, attention,
release) is its own transaction, with no BEGIN/COMMIT round trips.  Writes commit on the
backend's durable sessions (``synchronous_commit`` on): a claim lost in a server crash would
hand its epoch out again to a second activation, a lost append would let a step's recorded
value change, a lost send would lose an event.  ``park``, ``renew`` and ``release`` commit on
the fast sessions without waiting for the disk: losing one leaves the run RUNNING under a
lease that runs out,
and the sweeper activates it again (the next durable commit flushes them anyway).  Reads run
on the fast sessions.  A statement retried after a connection loss may find its own committed
effect: a claim then answers None (its lease runs out), an append False, a send "duplicate";
the engine handles each as it handles a lost race.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

from ..stores.postgres_schema import quote_schema
from .store import (CANCELLED, NEEDS_ATTENTION, PARKED, PENDING, RUNNING, TERMINAL, DueRun, Event, JournalEntry,
                    ParkedRun, ParkOutcome, RunRecord, WorkflowStore)

__all__ = ["SQLiteWorkflowStore", "PostgresWorkflowStore", "SqlWorkflowStore"]

T = TypeVar("T")

RUN_COLUMNS = ("id, name, version, input, status, epoch, owner, lease_until, wake_at, waiting, waits_for, "
               "inbox_count, inbox_seen, parent, result, error, attention, generation, created_at, updated_at, "
               "waits_kind")
_TERMINAL = "(" + ", ".join(f"'{s}'" for s in sorted(TERMINAL)) + ")"
_HELD = f"id = ? AND epoch = ? AND status = '{RUNNING}'"
# what every write that ends an activation's hold clears
_RELEASED = "owner = NULL, lease_until = NULL, wake_at = NULL, waiting = NULL, waits_for = NULL, waits_kind = NULL"

# Statements in both dialects: ``?`` placeholders, ``{runs}``/``{journal}``/``{events}`` table names,
# ``{lock}`` the row lock a read-then-write takes (Postgres: FOR UPDATE; SQLite: its write lock is held).
SQL = {
    "create": f"INSERT INTO {{runs}} (id, name, version, input, status, epoch, wake_at, parent, created_at, "
              f"updated_at) VALUES (?, ?, ?, ?, '{PENDING}', 0, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING "
              f"RETURNING {RUN_COLUMNS}",
    "get": f"SELECT {RUN_COLUMNS} FROM {{runs}} WHERE id = ?",
    "select_runs": f"SELECT {RUN_COLUMNS} FROM {{runs}}",
    "get_locked": f"SELECT {RUN_COLUMNS} FROM {{runs}} WHERE id = ?{{lock}}",
    "claim": f"UPDATE {{runs}} SET status = '{RUNNING}', epoch = epoch + 1, owner = ?, lease_until = ?, "
             f"wake_at = NULL, waiting = NULL, waits_for = NULL, waits_kind = NULL, updated_at = ? "
             f"WHERE id = ? AND (status IN ('{PENDING}', '{PARKED}') OR (status = '{RUNNING}' AND lease_until <= ?)) "
             f"RETURNING {RUN_COLUMNS}",
    "renew": f"UPDATE {{runs}} SET lease_until = ?, updated_at = ? WHERE {_HELD}",
    "held": f"SELECT 1 FROM {{runs}} WHERE {_HELD}",
    "journal": "SELECT position, kind, name, output, error, attempt, epoch, created_at FROM {journal} "
               "WHERE run_id = ? ORDER BY position",
    "take_position": f"UPDATE {{runs}} SET journal_length = journal_length + 1 WHERE {_HELD} AND journal_length = ?",
    "insert_entry": "INSERT INTO {journal} (run_id, position, kind, name, output, error, attempt, epoch, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "park": f"UPDATE {{runs}} SET status = '{PARKED}', owner = NULL, lease_until = NULL, wake_at = ?, waiting = ?, "
            f"waits_for = ?, waits_kind = ?, inbox_seen = ?, updated_at = ? WHERE {_HELD} AND inbox_count = ?",
    "release": f"UPDATE {{runs}} SET status = '{PENDING}', owner = NULL, lease_until = NULL, wake_at = ?, "
               f"waiting = NULL, waits_for = NULL, waits_kind = NULL, updated_at = ? WHERE {_HELD}",
    "finish": f"UPDATE {{runs}} SET status = ?, {_RELEASED}, result = ?, error = ?, updated_at = ? WHERE {_HELD} "
              f"RETURNING parent",
    "attention": f"UPDATE {{runs}} SET status = '{NEEDS_ATTENTION}', {_RELEASED}, attention = ?, updated_at = ? "
                 f"WHERE {_HELD}",
    "continue_as_new": f"UPDATE {{runs}} SET input = ?, status = '{PENDING}', epoch = epoch + 1, owner = NULL, "
                       f"lease_until = NULL, wake_at = ?, waiting = NULL, waits_for = NULL, waits_kind = NULL, "
                       f"generation = generation + 1, journal_length = 0, updated_at = ? WHERE {_HELD}",
    "drop_journal": "DELETE FROM {journal} WHERE run_id = ? AND position >= ?",
    "drop_event": "DELETE FROM {events} WHERE run_id = ? AND seq = ?",
    "cancel": f"UPDATE {{runs}} SET status = '{CANCELLED}', epoch = epoch + 1, {_RELEASED}, updated_at = ? "
              f"WHERE id = ? AND status NOT IN {_TERMINAL} RETURNING {RUN_COLUMNS}",
    "reset": f"UPDATE {{runs}} SET status = '{PENDING}', epoch = epoch + 1, owner = NULL, lease_until = NULL, "
             f"wake_at = ?, waiting = NULL, waits_for = NULL, waits_kind = NULL, result = NULL, error = NULL, "
             f"attention = NULL, "
             f"journal_length = CASE WHEN journal_length > ? THEN ? ELSE journal_length END, updated_at = ? "
             f"WHERE id = ? RETURNING {RUN_COLUMNS}",
    "insert_event": "INSERT INTO {events} (run_id, seq, topic, event_id, payload, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, event_id) DO NOTHING",
    "count_event": f"UPDATE {{runs}} SET inbox_count = ?, updated_at = ? WHERE id = ? RETURNING {RUN_COLUMNS}",
    "events": "SELECT seq, topic, event_id, payload, created_at FROM {events} WHERE run_id = ? AND seq > ? "
              "ORDER BY seq LIMIT ?",
    "topic_events": "SELECT seq, topic, event_id, payload, created_at FROM {events} WHERE run_id = ? AND topic = ? "
                    "AND seq > ? ORDER BY seq LIMIT ?",
    # the first reason that applies, in the contract's order: a row is in the index range only
    # when one does (``due_at``: see the module docstring)
    "due": f"SELECT id, CASE WHEN status = '{PENDING}' THEN 'start' "
           f"WHEN status = '{PARKED}' AND wake_at <= ? THEN 'timer' "
           f"WHEN status = '{PARKED}' THEN 'inbox' ELSE 'lease' END, epoch, due_at "
           "FROM {runs} WHERE due_at <= ? ORDER BY due_at LIMIT ?",
    "parked_on": f"SELECT id, waits_for, waits_kind FROM {{runs}} WHERE status = '{PARKED}' AND waits_for IS NOT NULL "
                 "ORDER BY id LIMIT ?",
    "parked_on_after": f"SELECT id, waits_for, waits_kind FROM {{runs}} WHERE status = '{PARKED}' "
                       "AND waits_for IS NOT NULL AND id > ? ORDER BY id LIMIT ?",
}


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _run(row: Sequence[Any]) -> RunRecord:
    return RunRecord(row[0], row[1], row[2], bytes(row[3]), row[4], row[5], row[6], row[7], row[8], _bytes(row[9]),
                     row[10], row[11], row[12], row[13], _bytes(row[14]), _bytes(row[15]), row[16], row[17], row[18],
                     row[19], row[20])


class SqlWorkflowStore(WorkflowStore):
    """The operations, over a dialect's statements (``sql``) and its transactions: ``_write``,
    ``_one`` and ``_read`` run ``fn(conn)`` (``conn.execute(statement, params)``) in one
    transaction; ``_one``'s ``fn`` runs one statement, which ``lazy`` lets commit without
    waiting for the disk where that can only cost a repeated activation (see ``PostgresWorkflowStore``)."""

    sql: dict[str, str]
    #: the dialect's placeholder
    mark = "?"

    def _write(self, fn: Callable[[Any], T]) -> T:
        raise NotImplementedError

    def _one(self, fn: Callable[[Any], T], *, lazy: bool = False) -> T:
        return self._write(fn)

    def _read(self, fn: Callable[[Any], T]) -> T:
        raise NotImplementedError

    def _runs_sql(self, status: bool, name: bool, after: bool) -> str:
        m = self.mark
        where = [c for c, on in ((f"status = {m}", status), (f"name = {m}", name), (f"id > {m}", after)) if on]
        return (self.sql["select_runs"] + (" WHERE " + " AND ".join(where) if where else "")
                + f" ORDER BY id LIMIT {m}")

    # -- runs ------------------------------------------------------------------------------
    def _create(self, run_id: str, name: str, version: str, input: bytes, *, now: float,
                parent: str | None) -> tuple[bool, RunRecord]:
        params = (run_id, name, version, input, now, parent, now, now)
        rows = self._one(lambda conn: conn.execute(self.sql["create"], params).fetchall())
        if rows:
            return True, _run(rows[0])
        return False, self._get(run_id)   # type: ignore[return-value]   # runs are never deleted

    def _get(self, run_id: str) -> RunRecord | None:
        row = self._read(lambda conn: conn.execute(self.sql["get"], (run_id,)).fetchone())
        return None if row is None else _run(row)

    def _runs(self, *, status: str | None, name: str | None, limit: int, after: str | None) -> list[RunRecord]:
        statement = self._runs_sql(status is not None, name is not None, after is not None)
        params = [p for p in (status, name, after) if p is not None] + [limit]
        return [_run(r) for r in self._read(lambda conn: conn.execute(statement, params).fetchall())]

    # -- one activation ----------------------------------------------------------------------
    def _claim(self, run_id: str, owner: str, *, now: float, lease: float) -> RunRecord | None:
        rows = self._one(lambda conn: conn.execute(self.sql["claim"], (owner, now + lease, now, run_id,
                                                                       now)).fetchall())
        return _run(rows[0]) if rows else None

    def _renew(self, run_id: str, epoch: int, *, now: float, lease: float) -> bool:
        params = (now + lease, now, run_id, epoch)
        return self._one(lambda conn: conn.execute(self.sql["renew"], params).rowcount, lazy=True) > 0

    def _journal(self, run_id: str) -> list[JournalEntry]:
        rows = self._read(lambda conn: conn.execute(self.sql["journal"], (run_id,)).fetchall())
        return [JournalEntry(r[0], r[1], r[2], _bytes(r[3]), _bytes(r[4]), r[5], r[6], r[7]) for r in rows]

    def _append(self, run_id: str, epoch: int, position: int, kind: str, name: str, *, output: bytes | None,
                error: bytes | None, attempt: int, now: float) -> bool:
        entry = (run_id, position, kind, name, output, error, attempt, epoch, now)

        def append(conn) -> bool:
            if conn.execute(self.sql["take_position"], (run_id, epoch, position)).rowcount == 0:
                return False
            conn.execute(self.sql["insert_entry"], entry)
            return True

        return self._write(append)

    def _park(self, run_id: str, epoch: int, *, wake_at: float | None, waiting: bytes | None,
              waits_for: str | None, waits_kind: str | None, inbox_seen: int, now: float) -> ParkOutcome:
        params = (wake_at, waiting, waits_for, waits_kind, inbox_seen, now, run_id, epoch, inbox_seen)
        if self._one(lambda conn: conn.execute(self.sql["park"], params).rowcount, lazy=True) > 0:
            return "parked"
        # Refused: still held at this epoch means the inbox moved (an epoch never comes back, so a
        # run held now was held when the park looked); anything else is a fence.
        held = self._read(lambda conn: conn.execute(self.sql["held"], (run_id, epoch)).fetchone())
        return "inbox" if held is not None else "fenced"

    def _notify_parent(self, conn: Any, parent: str | None, child: str, now: float) -> None:
        """Inside the child's transaction, after its row: the parent's ``"__child__"`` event."""
        if parent is not None:
            self._store_event(conn, parent, "__child__", child, b"", now)

    def _store_event(self, conn: Any, run_id: str, topic: str, event_id: str, payload: bytes,
                     now: float) -> tuple[bool, RunRecord | None]:
        row = conn.execute(self.sql["get_locked"], (run_id,)).fetchone()
        if row is None:
            return False, None
        run = _run(row)
        if run.terminal:
            return False, run
        seq = run.inbox_count + 1
        if conn.execute(self.sql["insert_event"], (run_id, seq, topic, event_id, payload, now)).rowcount == 0:
            return False, run
        return True, _run(conn.execute(self.sql["count_event"], (seq, now, run_id)).fetchall()[0])

    def _finish(self, run_id: str, epoch: int, status: str, *, result: bytes | None, error: bytes | None,
                now: float) -> bool:
        def finish(conn) -> bool:
            rows = conn.execute(self.sql["finish"], (status, result, error, now, run_id, epoch)).fetchall()
            if not rows:
                return False
            self._notify_parent(conn, rows[0][0], run_id, now)
            return True

        return self._write(finish)

    def _attention(self, run_id: str, epoch: int, reason: str, *, now: float) -> bool:
        params = (reason, now, run_id, epoch)
        return self._one(lambda conn: conn.execute(self.sql["attention"], params).rowcount) > 0

    def _continue_as_new(self, run_id: str, epoch: int, input: bytes, *, drop_events: list[int],
                         now: float) -> bool:
        def restart(conn) -> bool:
            if conn.execute(self.sql["continue_as_new"], (input, now, now, run_id, epoch)).rowcount == 0:
                return False
            conn.execute(self.sql["drop_journal"], (run_id, 0))
            if drop_events:
                conn.cursor().executemany(self.sql["drop_event"], [(run_id, seq) for seq in drop_events])
            return True

        return self._write(restart)

    def _release(self, run_id: str, epoch: int, *, now: float) -> bool:
        # lazy: a release lost in a server crash leaves the run to its lease, as without one
        params = (now, now, run_id, epoch)
        return self._one(lambda conn: conn.execute(self.sql["release"], params).rowcount, lazy=True) > 0

    # -- operators -----------------------------------------------------------------------------
    def _cancel(self, run_id: str, *, now: float) -> RunRecord | None:
        def cancel(conn) -> RunRecord | None:
            rows = conn.execute(self.sql["cancel"], (now, run_id)).fetchall()
            if not rows:
                row = conn.execute(self.sql["get"], (run_id,)).fetchone()
                return None if row is None else _run(row)
            run = _run(rows[0])
            self._notify_parent(conn, run.parent, run_id, now)
            return run

        return self._write(cancel)

    def _reset(self, run_id: str, to_position: int, *, now: float) -> RunRecord | None:
        def reset(conn) -> RunRecord | None:
            rows = conn.execute(self.sql["reset"], (now, to_position, to_position, now, run_id)).fetchall()
            if not rows:
                return None
            conn.execute(self.sql["drop_journal"], (run_id, to_position))
            return _run(rows[0])

        return self._write(reset)

    # -- events --------------------------------------------------------------------------------
    def _send(self, run_id: str, topic: str, event_id: str, payload: bytes, *,
              now: float) -> tuple[bool, RunRecord | None]:
        return self._write(lambda conn: self._store_event(conn, run_id, topic, event_id, payload, now))

    def _events(self, run_id: str, topic: str | None, after_seq: int, limit: int) -> list[Event]:
        if topic is None:
            statement, params = self.sql["events"], (run_id, after_seq, limit)
        else:
            statement, params = self.sql["topic_events"], (run_id, topic, after_seq, limit)
        rows = self._read(lambda conn: conn.execute(statement, params).fetchall())
        return [Event(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    # -- the sweeper ---------------------------------------------------------------------------
    def _due(self, *, now: float, limit: int) -> list[DueRun]:
        rows = self._read(lambda conn: conn.execute(self.sql["due"], (now, now, limit)).fetchall())
        return [DueRun(r[0], r[1], r[2], float(r[3])) for r in rows]

    def _parked_on(self, *, limit: int, after: str | None) -> list[ParkedRun]:
        if after is None:
            statement, params = self.sql["parked_on"], (limit,)
        else:
            statement, params = self.sql["parked_on_after"], (after, limit)
        return [ParkedRun(*r) for r in self._read(lambda conn: conn.execute(statement, params).fetchall())]



def _sqlite_statements() -> dict[str, str]:
    sql = {k: v.format(runs="stem_wf_runs", journal="stem_wf_journal", events="stem_wf_events", lock="")
           for k, v in SQL.items()}
    # SQLite's planner, without statistics, pages parked runs through the status index (every run
    # parked on a timer too): name the partial indexes, so that a query one cannot serve fails loudly
    for key, index in (("due", "stem_wf_runs_due"), ("parked_on", "stem_wf_runs_parked_on"),
                       ("parked_on_after", "stem_wf_runs_parked_on")):
        sql[key] = sql[key].replace("FROM stem_wf_runs WHERE", f"FROM stem_wf_runs INDEXED BY {index} WHERE")
    return sql


class SQLiteWorkflowStore(SqlWorkflowStore):
    """In the SQLite file (or in-memory database) of a ``SqliteResultBackend``: its connections
    (one per thread), its errors, its ``BEGIN IMMEDIATE`` write transactions."""

    sql = _sqlite_statements()

    def __init__(self, store: Any):
        self._store = store

    @classmethod
    def for_backend(cls, backend: Any) -> "SQLiteWorkflowStore":
        return cls(backend.sqlite_store)

    def _write(self, fn: Callable[[Any], T]) -> T:
        with self._store.write() as conn:
            return fn(conn)

    def _read(self, fn: Callable[[Any], T]) -> T:
        with self._store.connection() as conn:
            return fn(conn)


class PostgresWorkflowStore(SqlWorkflowStore):
    """In the schema of a ``PostgresResultBackend``: writes on its durable sessions (``park``
    and ``renew`` on its fast ones), each one transaction; reads on its fast sessions."""

    mark = "%s"

    def __init__(self, store: Any):
        self._store = store
        s = quote_schema(store.schema)
        names = dict(runs=f"{s}.stem_wf_runs", journal=f"{s}.stem_wf_journal", events=f"{s}.stem_wf_events")
        self.sql = {k: v.format(lock=" FOR UPDATE", **names).replace("?", "%s") for k, v in SQL.items()}
        # one statement: the fenced length bump (the run row locked first), then the entry
        self.sql["append"] = (
            f"WITH taken AS ({self.sql['take_position']} RETURNING id) "
            f"INSERT INTO {names['journal']} (run_id, position, kind, name, output, error, attempt, epoch, created_at) "
            "SELECT id, %s::int8, %s::text, %s::text, %s::bytea, %s::bytea, %s::int8, %s::int8, %s::float8 FROM taken")

    @classmethod
    def for_backend(cls, backend: Any) -> "PostgresWorkflowStore":
        return cls(backend.pg_store)

    def _append(self, run_id: str, epoch: int, position: int, kind: str, name: str, *, output: bytes | None,
                error: bytes | None, attempt: int, now: float) -> bool:
        params = (run_id, epoch, position, position, kind, name, output, error, attempt, epoch, now)
        return self._one(lambda conn: conn.execute(self.sql["append"], params).rowcount) > 0

    def _one(self, fn: Callable[[Any], T], *, lazy: bool = False) -> T:
        """One statement, its own transaction (autocommit); ``lazy``: on the fast sessions."""
        return (self._store.fast if lazy else self._store.durable).run(fn)

    def _write(self, fn: Callable[[Any], T]) -> T:
        def tx(conn) -> T:
            with conn.transaction():
                return fn(conn)
        return self._store.durable.run(tx)

    def _read(self, fn: Callable[[Any], T]) -> T:
        return self._store.fast.run(fn)
