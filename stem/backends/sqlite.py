"""The SQLite result backend: statuses, heartbeats, revocations and schedule records in one file.

Same URLs as the SQLite broker (they may share the file; the tables are
separate, see ``stem/stores/sqlite_schema.py``).  Statuses are msgpack
``TaskStatus`` blobs with an ``expires_at``; expired rows read as None and are
deleted now and then.

Waits cannot block on a notification (SQLite has none): one reader thread per
backend instance (the ``WaitHub``'s, ``stem.backends.waiting``) re-reads every
waited id in one query (``json_each`` of the ids, any number) every
``_POLL_S``, for all the instance's waiters at once; a ``store`` through this
instance has it read at once.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import msgspec

from .. import _checks as checks
from ..errors import ConfigurationError
from ..results import TaskStatus, decode_status, encode_status
from ..stores.base import BACKEND_ERRORS
from ..stores.sqlite import SqliteStore, parse_sqlite_url
from ..stores.sqlite_schema import settle_acked
from .groups import GroupRecord, check_create, check_group_id, check_lifetime, check_member
from .waiting import WaitHub
from .base import (DEFAULT_RESULT_EXPIRES, TERMINAL_STATE_NAMES, ResultBackend, ScheduleRecord, check_definition,
                   check_fired, check_non_terminal, check_proofs, check_schedule_ids, status_ttl)

__all__ = ["SqliteResultBackend"]

_POLL_S = 0.05
_SWEEP_EVERY_S = 60.0
_CHUNK = 500

_STORE_IF_NOT_TERMINAL = (
    "INSERT INTO stem_results (task_id, state, expires_at, data) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (task_id) DO UPDATE SET state = excluded.state, expires_at = excluded.expires_at, "
    "data = excluded.data "
    f"WHERE stem_results.state NOT IN ({', '.join(repr(s) for s in TERMINAL_STATE_NAMES)}) "
    "OR stem_results.expires_at <= ?")

_SCHEDULE_COLUMNS = "id, definition, paused, last_fired, last_run_id, updated_at"
# The update applies only over an older (or no) fire time: last_fired never goes back, and
# last_run_id moves with it in the same row write.
_MARK_FIRED = (
    "INSERT INTO stem_schedules (id, last_fired, last_run_id, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET last_fired = excluded.last_fired, last_run_id = excluded.last_run_id, "
    "updated_at = excluded.updated_at "
    "WHERE stem_schedules.last_fired IS NULL OR stem_schedules.last_fired < excluded.last_fired")

_GROUP_COLUMNS = ("id, expected, sealed, finished, succeeded, failed, interrupted, data, created_at, seal_by, ttl, "
                  "held")
# a record lives until its expires_at, which is NULL (forever) until it ended (and was released)
_LIVE_GROUP = f"SELECT {_GROUP_COLUMNS} FROM stem_groups WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)"
# starts the lifetime of a record that just became complete, unless held (and of no other)
_COMPLETE_GROUP = ("UPDATE stem_groups SET expires_at = ? + ttl WHERE id = ? AND expires_at IS NULL "
                   "AND held = 0 AND sealed = 1 AND finished >= expected")
# the reader is done: not held, the lifetime at least the reader's, (re)started if it ended
_RELEASE_GROUP = ("UPDATE stem_groups SET held = 0, ttl = max(ttl, :ttl), "
                  "expires_at = CASE WHEN interrupted = 1 OR (sealed = 1 AND finished >= expected) "
                  "THEN :now + max(ttl, :ttl) END "
                  "WHERE id = :g AND (expires_at IS NULL OR expires_at > :now)")


def _group_row(row: tuple | None) -> GroupRecord | None:
    if row is None:
        return None
    return GroupRecord(row[0], row[1], bool(row[2]), row[3], row[4], row[5], bool(row[6]), bytes(row[7]), row[8],
                       row[9], row[10], bool(row[11]))


_encode = msgspec.msgpack.Encoder().encode
_json_ids = msgspec.json.Encoder().encode
_decode = msgspec.msgpack.Decoder(dict).decode


class SqliteResultBackend(ResultBackend):
    def __init__(self, path: str | None = None, *, result_expires: float = DEFAULT_RESULT_EXPIRES,
                 busy_timeout: float = 10.0, url: str | None = None):
        if path == ":memory:":
            path = None
        self.result_expires = checks.seconds("result_expires", result_expires)
        self._store = SqliteStore(path, busy_timeout=busy_timeout, errors=BACKEND_ERRORS)
        self.url = url or ("sqlite://" if path is None else f"sqlite:///{path}")
        self._next_sweep = time.monotonic() + _SWEEP_EVERY_S
        self._waits = WaitHub(name="sqlite", read=self._read_found, poll=lambda: _POLL_S, label=self._store.label)

    @property
    def sqlite_store(self) -> SqliteStore:
        """The ``SqliteStore`` of the file (the workflow store lives in it too)."""
        return self._store

    @classmethod
    def from_url(cls, url: str = "sqlite://", **kwargs: Any) -> "SqliteResultBackend":
        path, options = parse_sqlite_url(url)
        if "busy_timeout" in options:
            kwargs.setdefault("busy_timeout", float(options.pop("busy_timeout")))
        if options:
            raise ConfigurationError(f"unknown option(s) {sorted(options)} in {url!r}; known: busy_timeout")
        return cls(path, url=url, **kwargs)

    def migrate(self) -> int:
        """Create or upgrade the tables (idempotent; also done on first use).  Returns the version."""
        return self._store.migrate()

    def reopen_recipe(self) -> tuple[str, dict[str, Any]] | None:
        return None if self.url in ("sqlite://", "sqlite:///:memory:") else (self.url, {})

    def workflow_store_recipe(self) -> tuple[str, Any] | None:
        return ("stem.workflows.store_sql:SQLiteWorkflowStore", self)

    # -- statuses ---------------------------------------------------------------------
    def store(self, status: TaskStatus) -> None:
        self.store_many((status,))

    def store_many(self, statuses: Sequence[TaskStatus]) -> None:
        if not statuses:
            return
        rows = self._rows(statuses)
        with self._store.write() as conn:
            self._upsert(conn, rows)
        self._stored()

    def _stored(self) -> None:
        self._store.wake.notify()
        if self._waits.has_waiters():
            self._waits.reset()

    def store_many_and_ack(self, statuses: Sequence[TaskStatus], broker: Any,
                           deliveries: Sequence[Any]) -> bool:
        """Store ``statuses`` and ack ``deliveries`` (releasing their keys, as the broker's ack does)
        in one transaction when ``broker`` keeps its queues in this file (``shares_store_with``);
        returns True.  Otherwise does nothing and returns False: the caller stores, then acks."""
        if not self.shares_store_with(broker):
            return False
        rows = self._rows(statuses)
        with self._store.write() as conn:
            self._upsert(conn, rows)
            settle_acked(conn, deliveries, time.time())       # keyed ones release their keys here too
        self._stored()
        return True

    def _rows(self, statuses: Sequence[TaskStatus]) -> list[tuple]:
        """The upsert's rows, each with its own expiry (``status_ttl``), made before the
        transaction: a status the rule refuses stores nothing of the call."""
        now, default = time.time(), self.result_expires
        return [(s.id, s.state.value, now + status_ttl(s, default), encode_status(s)) for s in statuses]

    def _upsert(self, conn, rows: list[tuple]) -> None:
        now = time.time()
        conn.executemany("INSERT INTO stem_results (task_id, state, expires_at, data) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (task_id) DO UPDATE SET state = excluded.state, "
                         "expires_at = excluded.expires_at, data = excluded.data", rows)
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + _SWEEP_EVERY_S
            for table in ("stem_results", "stem_heartbeats", "stem_revocations"):
                conn.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,))

    def store_if_not_terminal(self, statuses: Sequence[TaskStatus]) -> None:
        """One transaction: an upsert whose update applies only over a non-terminal (or expired) row."""
        if not check_non_terminal(statuses):
            return
        now, default = time.time(), self.result_expires
        rows = [(s.id, s.state.value, now + status_ttl(s, default), encode_status(s), now) for s in statuses]
        with self._store.write() as conn:
            conn.executemany(_STORE_IF_NOT_TERMINAL, rows)

    def get(self, task_id: str) -> TaskStatus | None:
        with self._store.connection() as conn:
            row = conn.execute("SELECT data FROM stem_results WHERE task_id = ? AND expires_at > ?",
                               (task_id, time.time())).fetchone()
        return None if row is None else decode_status(row[0])

    def get_many(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        ids = list(task_ids)
        found: dict[str, TaskStatus] = {}
        now = time.time()
        with self._store.connection() as conn:
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i:i + _CHUNK]
                for task_id, data in conn.execute(
                        f"SELECT task_id, data FROM stem_results WHERE task_id IN ({','.join('?' * len(chunk))}) "
                        "AND expires_at > ?", (*chunk, now)):
                    found[task_id] = decode_status(data)
        return [found.get(t) for t in ids]

    def _read_found(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        """The stored statuses among ``task_ids``, in one query however many (the hub's reads)."""
        with self._store.connection() as conn:
            rows = conn.execute("SELECT r.data FROM json_each(?) AS w JOIN stem_results AS r "
                                "ON r.task_id = w.value WHERE r.expires_at > ?",
                                (_json_ids(list(task_ids)).decode(), time.time())).fetchall()
        return [decode_status(d) for (d,) in rows]

    def forget(self, task_id: str) -> None:
        with self._store.write() as conn:
            conn.execute("DELETE FROM stem_results WHERE task_id = ?", (task_id,))

    # -- heartbeats -------------------------------------------------------------------
    def put_heartbeat(self, worker_id: str, data: dict[str, Any], ttl: float) -> None:
        ttl = checks.seconds("ttl", ttl)
        now = time.time()
        with self._store.write() as conn:
            conn.execute("INSERT INTO stem_heartbeats (worker_id, seen_at, expires_at, data) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (worker_id) DO UPDATE SET seen_at = excluded.seen_at, "
                         "expires_at = excluded.expires_at, data = excluded.data",
                         (worker_id, now, now + ttl, _encode(data)))

    def heartbeats(self) -> list[dict[str, Any]]:
        with self._store.connection() as conn:
            rows = conn.execute("SELECT worker_id, seen_at, data FROM stem_heartbeats WHERE expires_at > ? "
                                "ORDER BY worker_id", (time.time(),)).fetchall()
        return [{**_decode(data), "worker_id": worker_id, "seen_at": seen_at} for worker_id, seen_at, data in rows]

    def remove_heartbeat(self, worker_id: str) -> None:
        with self._store.write() as conn:
            conn.execute("DELETE FROM stem_heartbeats WHERE worker_id = ?", (worker_id,))

    # -- revocations ------------------------------------------------------------------
    def revoke(self, task_ids: Sequence[str], expires: float | None = None,
               proofs: Sequence[bytes | None] | None = None) -> None:
        expires = checks.optional_seconds("expires", expires)
        task_ids = list(task_ids)
        checked = check_proofs(task_ids, proofs)
        until = time.time() + (self.result_expires if expires is None else expires)
        with self._store.write() as conn:
            conn.executemany("INSERT INTO stem_revocations (task_id, expires_at, proof) VALUES (?, ?, ?) "
                             "ON CONFLICT (task_id) DO UPDATE SET expires_at = excluded.expires_at, "
                             "proof = excluded.proof",
                             [(t, until, p) for t, p in zip(task_ids, checked)])

    def revoked(self, task_ids: Sequence[str] | None = None) -> set[str]:
        now = time.time()
        with self._store.connection() as conn:
            if task_ids is None:
                return {r[0] for r in conn.execute(
                    "SELECT task_id FROM stem_revocations WHERE expires_at > ?", (now,))}
            ids = list(task_ids)
            out: set[str] = set()
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i:i + _CHUNK]
                out.update(r[0] for r in conn.execute(
                    f"SELECT task_id FROM stem_revocations WHERE task_id IN ({','.join('?' * len(chunk))}) "
                    "AND expires_at > ?", (*chunk, now)))
            return out

    def revocation_proofs(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        ids = list(task_ids)
        out: dict[str, bytes] = {}
        now = time.time()
        with self._store.connection() as conn:
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i:i + _CHUNK]
                out.update(conn.execute(
                    f"SELECT task_id, proof FROM stem_revocations WHERE task_id IN ({','.join('?' * len(chunk))}) "
                    "AND expires_at > ? AND proof IS NOT NULL", (*chunk, now)))
        return out

    # -- group records (one write transaction each) -------------------------------------
    def group_create(self, group_id: str, expected: int, data: bytes, *, seal_by: float, ttl: float,
                     held: bool = False) -> bool:
        group_id, expected, data, seal_by, ttl, held = check_create(group_id, expected, data, seal_by, ttl, held)
        now = time.time()
        with self._store.write() as conn:
            conn.execute("DELETE FROM stem_groups WHERE id = ? AND expires_at <= ?", (group_id, now))
            cur = conn.execute("INSERT INTO stem_groups (id, expected, data, created_at, seal_by, ttl, held) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                               (group_id, expected, data, now, seal_by, ttl, int(held)))
            if cur.rowcount == 1:     # an expired record's members go with it
                conn.execute("DELETE FROM stem_group_members WHERE group_id = ?", (group_id,))
            return cur.rowcount == 1

    def group_publish(self, group_id: str, expected: int, data: bytes, *, seal_by: float, ttl: float, held: bool,
                      broker: Any, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], priority: int = 0,
                      visibility_timeout: float | None = None) -> bool | None:
        """One write transaction: the record, sealed, and the broker's rows of the members."""
        publish_in = getattr(broker, "publish_frames_in", None)
        if publish_in is None or not self.shares_store_with(broker):
            return None
        group_id, expected, data, seal_by, ttl, held = check_create(group_id, expected, data, seal_by, ttl, held)
        now = time.time()
        with self._store.write() as conn:
            conn.execute("DELETE FROM stem_groups WHERE id = ? AND expires_at <= ?", (group_id, now))
            if conn.execute("INSERT INTO stem_groups (id, expected, sealed, data, created_at, seal_by, ttl, held) "
                            "VALUES (?, ?, 1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                            (group_id, expected, data, now, seal_by, ttl, int(held))).rowcount != 1:
                return False
            conn.execute("DELETE FROM stem_group_members WHERE group_id = ?", (group_id,))
            publish_in(conn, queue, task_ids, frames, priority=priority, visibility_timeout=visibility_timeout)
        broker.store.wake.notify()
        return True

    def group_seal(self, group_id: str) -> GroupRecord | None:
        check_group_id(group_id)
        now = time.time()
        with self._store.write() as conn:
            if conn.execute("UPDATE stem_groups SET sealed = 1 WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
                            (group_id, now)).rowcount:
                conn.execute(_COMPLETE_GROUP, (now, group_id))
            return _group_row(conn.execute(_LIVE_GROUP, (group_id, now)).fetchone())

    def group_record(self, group_id: str, member_id: str, index: int, ok: bool,
                     outcome: bytes, ttl: float | None = None) -> GroupRecord | None:
        return self.group_record_many([(group_id, member_id, index, ok, outcome, ttl)])[0]

    def group_record_many(self, items: Sequence[tuple[str, str, int, bool, bytes, float | None]]
                          ) -> list[GroupRecord | None]:
        return self.store_and_record((), items)

    def store_and_record(self, statuses: Sequence[TaskStatus],
                         members: Sequence[tuple[str, str, int, bool, bytes, float | None]],
                         brief: bool = False) -> list[GroupRecord | bool | None]:
        """One write transaction: the statuses, then the members' counts."""
        default = self.result_expires
        checked = [check_member(g, m, i, o, t, default) + (ok,) for g, m, i, ok, o, t in members]
        rows = self._rows(statuses) if statuses else []
        now = time.time()
        with self._store.write() as conn:
            if rows:
                self._upsert(conn, rows)
            out = [self._record_member(conn, now, *item) for item in checked]
        if rows:
            self._stored()
        return out

    @staticmethod
    def _record_member(conn, now: float, group_id: str, member_id: str, index: int, outcome: bytes, ttl: float,
                       ok: bool) -> GroupRecord | None:
        row = conn.execute(_LIVE_GROUP, (group_id, now)).fetchone()
        if row is None:
            return None
        added = conn.execute("INSERT INTO stem_group_members (group_id, member_id, idx, ok, outcome) "
                             "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             (group_id, member_id, index, int(ok), outcome)).rowcount
        if not added:
            return _group_row(row)
        conn.execute("UPDATE stem_groups SET finished = finished + 1, succeeded = succeeded + ?, "
                     "failed = failed + ?, ttl = CASE WHEN finished = 0 THEN ? ELSE max(ttl, ?) END WHERE id = ?",
                     (int(ok), int(not ok), ttl, ttl, group_id))
        conn.execute(_COMPLETE_GROUP, (now, group_id))
        return _group_row(conn.execute(_LIVE_GROUP, (group_id, now)).fetchone())

    def group_release(self, group_id: str, ttl: float | None = None) -> GroupRecord | None:
        check_group_id(group_id)
        ttl = check_lifetime(ttl, self.result_expires)
        now = time.time()
        with self._store.write() as conn:
            conn.execute(_RELEASE_GROUP, {"g": group_id, "ttl": ttl, "now": now})
            return _group_row(conn.execute(_LIVE_GROUP, (group_id, now)).fetchone())

    def group_get(self, group_id: str) -> GroupRecord | None:
        check_group_id(group_id)
        with self._store.connection() as conn:
            return _group_row(conn.execute(_LIVE_GROUP, (group_id, time.time())).fetchone())

    def group_outcomes(self, group_id: str, start: int, stop: int) -> list[bytes | None]:
        check_group_id(group_id)
        out: list[bytes | None] = [None] * max(0, stop - start)
        if not out or self.group_get(group_id) is None:
            return out
        with self._store.connection() as conn:
            for idx, outcome in conn.execute("SELECT idx, outcome FROM stem_group_members WHERE group_id = ? "
                                             "AND idx >= ? AND idx < ?", (group_id, start, stop)):
                out[idx - start] = bytes(outcome)
        return out

    def group_failed_members(self, group_id: str, limit: int = 100) -> list[str]:
        check_group_id(group_id)
        with self._store.connection() as conn:
            return [r[0] for r in conn.execute("SELECT member_id FROM stem_group_members WHERE group_id = ? "
                                               "AND ok = 0 ORDER BY member_id LIMIT ?", (group_id, limit))]

    def group_interrupt_unsealed(self, now: float | None = None) -> list[GroupRecord]:
        now = time.time() if now is None else now
        with self._store.write() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM stem_groups WHERE sealed = 0 AND interrupted = 0 "
                                              "AND seal_by < ?", (now,))]
            out = []
            for group_id in ids:
                conn.execute("UPDATE stem_groups SET interrupted = 1, expires_at = ? + ttl WHERE id = ?",
                             (now, group_id))
                out.append(_group_row(conn.execute(f"SELECT {_GROUP_COLUMNS} FROM stem_groups WHERE id = ?",
                                                   (group_id,)).fetchone()))
            # completed records past their lifetime go, with their members
            dead = [r[0] for r in conn.execute("SELECT id FROM stem_groups WHERE expires_at <= ?", (now,))]
            for group_id in dead:
                conn.execute("DELETE FROM stem_group_members WHERE group_id = ?", (group_id,))
                conn.execute("DELETE FROM stem_groups WHERE id = ?", (group_id,))
        return out

    # -- schedule records ---------------------------------------------------------------
    def schedule_records(self, ids: Sequence[str] | None = None) -> dict[str, ScheduleRecord]:
        wanted = check_schedule_ids(ids)
        with self._store.connection() as conn:
            if wanted is None:
                rows = conn.execute(f"SELECT {_SCHEDULE_COLUMNS} FROM stem_schedules").fetchall()
            else:
                rows = []
                for i in range(0, len(wanted), _CHUNK):
                    chunk = wanted[i:i + _CHUNK]
                    rows += conn.execute(f"SELECT {_SCHEDULE_COLUMNS} FROM stem_schedules "
                                         f"WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        return {r[0]: ScheduleRecord(r[0], r[1], bool(r[2]), r[3], r[4], r[5]) for r in rows}

    def put_schedule(self, schedule_id: str, definition: bytes | None) -> None:
        checks.schedule_id(schedule_id)
        definition = check_definition(definition)
        with self._store.write() as conn:
            conn.execute("INSERT INTO stem_schedules (id, definition, updated_at) VALUES (?, ?, ?) "
                         "ON CONFLICT (id) DO UPDATE SET definition = excluded.definition, "
                         "updated_at = excluded.updated_at", (schedule_id, definition, time.time()))

    def remove_schedule(self, schedule_id: str) -> bool:
        checks.schedule_id(schedule_id)
        with self._store.write() as conn:
            return conn.execute("DELETE FROM stem_schedules WHERE id = ?", (schedule_id,)).rowcount > 0

    def pause_schedule(self, schedule_id: str, paused: bool) -> bool:
        """One write transaction: create the record if missing, then flip the flag if it differs."""
        checks.schedule_id(schedule_id)
        checks.flag("paused", paused)
        now = time.time()
        with self._store.write() as conn:
            conn.execute("INSERT INTO stem_schedules (id, updated_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                         (schedule_id, now))
            return conn.execute("UPDATE stem_schedules SET paused = ?, updated_at = ? WHERE id = ? AND paused <> ?",
                                (int(paused), now, schedule_id, int(paused))).rowcount > 0

    def mark_fired(self, schedule_id: str, fire_time: float, run_id: str) -> None:
        schedule_id, fire_time, run_id = check_fired(schedule_id, fire_time, run_id)
        with self._store.write() as conn:
            conn.execute(_MARK_FIRED, (schedule_id, fire_time, run_id, time.time()))

    # -- misc -------------------------------------------------------------------------
    def ping(self) -> None:
        with self._store.connection() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        self._waits.stop()
        self._store.wake.notify()
        self._store.close()
