"""The PostgreSQL result backend: statuses with expiry, heartbeats, revocations, schedule records.

Same URLs and schema as the Postgres broker (``stem/stores/postgres_schema.py``).
``store_many`` is one upsert statement over ``unnest(...)`` that also calls
``pg_notify('stem.<schema>.results', '<id>,<id>,...')`` for the terminal
statuses, so the notification leaves with the commit.

Waits from any process: a listener thread (started by the first wait) LISTENs
on the results channel, one connection for the whole backend instance.  A
waiter makes sure the listener is listening, registers its ids with the
backend's ``WaitHub`` (``stem.backends.waiting``), *then* the hub's reader
reads them -- a status stored before that read is seen by the read, one
stored after it is announced to the listener, whose notification names the
ids the reader then reads (in one query per batch).  No polling while the
listener is connected; while it reconnects, the reader re-reads every waited
id once a second, and once more when it is back.

Schedule records are rows of ``stem_schedules``, written on the durable
sessions (read on the fast ones); ``mark_fired`` is one upsert whose update applies only over an
older fire time, which Postgres re-checks on the row it locked, so racing
schedulers serialise on the row and ``last_fired`` never goes back.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import msgspec

from .. import _checks as checks
from ..results import TaskStatus, decode_status, encode_status
from ..stores.base import BACKEND_ERRORS
from ..stores.postgres import PostgresStore, parse_postgres_url
from ..stores.postgres_schema import NOW, quote_schema, release_ctes, wake_ctes
from .groups import GroupRecord, check_create, check_group_id, check_lifetime, check_member
from .waiting import Waiter, WaitHub
from .base import (DEFAULT_RESULT_EXPIRES, TERMINAL_STATE_NAMES, ResultBackend, ScheduleRecord, check_definition,
                   check_fired, check_non_terminal, check_proofs, check_schedule_ids, status_ttl)

__all__ = ["PostgresResultBackend", "group_row"]

_SWEEP_EVERY_S = 60.0
_FALLBACK_POLL_S = 1.0
_PAYLOAD_MAX = 7000          # NOTIFY payloads must stay under 8000 bytes

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(dict).decode


def _store_sql(s: str, ack_schema: str | None = None, keyed: bool = False, limited: bool = False) -> str:
    """Upsert statuses, notify the terminal ones; with ``ack_schema`` (the broker's, quoted) also
    delete acked rows of its jobs table, and with ``keyed`` release their keys as the broker's ack
    does; with ``limited`` also delete acked rows of its lane jobs (a second id array), freeing
    their slots and waking the lanes that wait on them (a notification on the broker's channel,
    the last parameter), as the broker's ack does."""
    ack = ""
    if ack_schema and limited:
        ack = (f", acked AS (DELETE FROM {ack_schema}.stem_jobs WHERE id = ANY(%s::int8[]) "
               f"RETURNING queue, task_id, key, key_linger), "
               f"lane_acked AS (DELETE FROM {ack_schema}.stem_lane_jobs WHERE id = ANY(%s::int8[]) "
               f"RETURNING queue, task_id, key, key_linger, lane, concurrency_key), "
               f"removed AS (SELECT queue, task_id, key, key_linger FROM acked UNION ALL "
               f"SELECT queue, task_id, key, key_linger FROM lane_acked), "
               f"{release_ctes(ack_schema, 'removed')}, {wake_ctes(ack_schema, 'lane_acked')}")
        return f"""
        WITH up AS (
            INSERT INTO {s}.stem_results (task_id, state, expires_at, data)
            SELECT t, st, {NOW} + x, d FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::float8[])
                AS m(t, st, d, x)
            ON CONFLICT (task_id) DO UPDATE
            SET state = EXCLUDED.state, expires_at = EXCLUDED.expires_at, data = EXCLUDED.data){ack}
        SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p
        UNION ALL
        SELECT pg_notify(%s, queue) FROM (SELECT DISTINCT queue FROM woken) w"""
    if ack_schema and keyed:
        ack = (f", acked AS (DELETE FROM {ack_schema}.stem_jobs WHERE id = ANY(%s::int8[]) "
               f"RETURNING queue, task_id, key, key_linger), {release_ctes(ack_schema, 'acked')}")
    elif ack_schema:
        ack = f", acked AS (DELETE FROM {ack_schema}.stem_jobs WHERE id = ANY(%s::int8[]))"
    return f"""
        WITH up AS (
            INSERT INTO {s}.stem_results (task_id, state, expires_at, data)
            SELECT t, st, {NOW} + x, d FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::float8[])
                AS m(t, st, d, x)
            ON CONFLICT (task_id) DO UPDATE
            SET state = EXCLUDED.state, expires_at = EXCLUDED.expires_at, data = EXCLUDED.data){ack}
        SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p"""


def _queries(s: str) -> dict[str, str]:
    results = f"{s}.stem_results"
    return {
        "store": _store_sql(s),
        "store_if_not_terminal": f"""
            INSERT INTO {results} AS r (task_id, state, expires_at, data)
            SELECT t, st, {NOW} + x, d FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::float8[])
                AS m(t, st, d, x)
            ON CONFLICT (task_id) DO UPDATE
            SET state = EXCLUDED.state, expires_at = EXCLUDED.expires_at, data = EXCLUDED.data
            WHERE r.state NOT IN ({', '.join(repr(n) for n in TERMINAL_STATE_NAMES)}) OR r.expires_at <= {NOW}""",
        "get": f"SELECT data FROM {results} WHERE task_id = %s AND expires_at > {NOW}",
        "get_many": f"SELECT task_id, data FROM {results} WHERE task_id = ANY(%s::text[]) AND expires_at > {NOW}",
        "forget": f"DELETE FROM {results} WHERE task_id = %s",
        "sweep": f"""
            WITH r AS (DELETE FROM {results} WHERE expires_at <= {NOW}),
            h AS (DELETE FROM {s}.stem_heartbeats WHERE expires_at <= {NOW})
            DELETE FROM {s}.stem_revocations WHERE expires_at <= {NOW}""",
        "put_heartbeat": f"""
            INSERT INTO {s}.stem_heartbeats (worker_id, seen_at, expires_at, data)
            VALUES (%s, {NOW}, {NOW} + %s, %s)
            ON CONFLICT (worker_id) DO UPDATE
            SET seen_at = EXCLUDED.seen_at, expires_at = EXCLUDED.expires_at, data = EXCLUDED.data""",
        "heartbeats": f"""
            SELECT worker_id, seen_at, data FROM {s}.stem_heartbeats WHERE expires_at > {NOW} ORDER BY worker_id""",
        "remove_heartbeat": f"DELETE FROM {s}.stem_heartbeats WHERE worker_id = %s",
        "revoke": f"""
            INSERT INTO {s}.stem_revocations (task_id, expires_at, proof)
            SELECT t, {NOW} + %s, p FROM unnest(%s::text[], %s::bytea[]) AS m(t, p)
            ON CONFLICT (task_id) DO UPDATE SET expires_at = EXCLUDED.expires_at, proof = EXCLUDED.proof""",
        "revocation_proofs": f"""
            SELECT task_id, proof FROM {s}.stem_revocations
            WHERE task_id = ANY(%s::text[]) AND expires_at > {NOW} AND proof IS NOT NULL""",
        "revoked_all": f"SELECT task_id FROM {s}.stem_revocations WHERE expires_at > {NOW}",
        "revoked": f"""
            SELECT task_id FROM {s}.stem_revocations WHERE task_id = ANY(%s::text[]) AND expires_at > {NOW}""",
        **_schedule_queries(s),
        **_group_queries(s),
    }


_GROUP_COLUMNS = ("id, expected, sealed, finished, succeeded, failed, interrupted, data, created_at, seal_by, ttl, "
                  "held")


def _group_queries(s: str) -> dict[str, str]:
    """One statement each (autocommit: each is its own transaction).  Counters change only in
    UPDATEs, which Postgres re-evaluates on the latest row version it locked: a member's
    count and a seal racing on one record see each other, so one of them sees it complete."""
    groups, members = f"{s}.stem_groups", f"{s}.stem_group_members"
    cols = _GROUP_COLUMNS
    tcols = ", ".join(f"t.{c}" for c in cols.split(", "))
    live = f"(expires_at IS NULL OR expires_at > {NOW})"
    return {
        "group_create": f"""
            WITH gone AS (DELETE FROM {groups} WHERE id = %(g)s AND expires_at <= {NOW} RETURNING id),
            gone_members AS (DELETE FROM {members} WHERE group_id IN (SELECT id FROM gone))
            INSERT INTO {groups} (id, expected, sealed, data, created_at, seal_by, ttl, held)
            SELECT %(g)s, %(n)s, %(sealed)s, %(d)s, {NOW}, %(by)s, %(ttl)s, %(held)s
            WHERE NOT EXISTS (SELECT 1 FROM {groups} WHERE id = %(g)s AND {live})
            ON CONFLICT (id) DO NOTHING""",
        "group_seal": f"""
            UPDATE {groups} t SET sealed = true,
                expires_at = CASE WHEN t.expires_at IS NULL AND NOT t.held AND t.finished >= t.expected
                             THEN {NOW} + t.ttl ELSE t.expires_at END
            WHERE t.id = %(g)s AND (t.expires_at IS NULL OR t.expires_at > {NOW}) RETURNING {tcols}""",
        "group_record": f"""
            WITH g AS (SELECT id FROM {groups} WHERE id = %(g)s AND {live}),
            ins AS (INSERT INTO {members} (group_id, member_id, idx, ok, outcome)
                    SELECT id, %(m)s, %(i)s, %(ok)s, %(o)s FROM g ON CONFLICT DO NOTHING RETURNING ok),
            up AS (UPDATE {groups} t SET finished = t.finished + 1, succeeded = t.succeeded + ins.ok::int,
                       failed = t.failed + (NOT ins.ok)::int,
                       ttl = CASE WHEN t.finished = 0 THEN %(t)s ELSE greatest(t.ttl, %(t)s) END,
                       expires_at = CASE WHEN t.expires_at IS NULL AND NOT t.held AND t.sealed
                                         AND t.finished + 1 >= t.expected
                                    THEN {NOW} + CASE WHEN t.finished = 0 THEN %(t)s ELSE greatest(t.ttl, %(t)s) END
                                    ELSE t.expires_at END
                   FROM ins WHERE t.id = %(g)s RETURNING {tcols})
            SELECT {cols} FROM up
            UNION ALL
            SELECT {cols} FROM {groups} WHERE id = %(g)s AND EXISTS (SELECT 1 FROM g)
                AND NOT EXISTS (SELECT 1 FROM ins)""",
        "group_release": f"""
            UPDATE {groups} t SET held = false, ttl = greatest(t.ttl, %(t)s),
                expires_at = CASE WHEN t.interrupted OR (t.sealed AND t.finished >= t.expected)
                             THEN {NOW} + greatest(t.ttl, %(t)s) END
            WHERE t.id = %(g)s AND (t.expires_at IS NULL OR t.expires_at > {NOW}) RETURNING {tcols}""",
        "group_get": f"SELECT {cols} FROM {groups} WHERE id = %s AND {live}",
        "group_outcomes": f"""
            SELECT idx, outcome FROM {members} WHERE group_id = %s AND idx >= %s AND idx < %s""",
        "group_failed": f"""
            SELECT member_id FROM {members} WHERE group_id = %s AND NOT ok ORDER BY member_id LIMIT %s""",
        "group_interrupt": f"""
            UPDATE {groups} t SET interrupted = true, expires_at = {NOW} + t.ttl
            WHERE NOT t.sealed AND NOT t.interrupted AND t.seal_by < %s RETURNING {tcols}""",
        "group_sweep": f"""
            WITH gone AS (DELETE FROM {groups} WHERE expires_at <= {NOW} RETURNING id)
            DELETE FROM {members} WHERE group_id IN (SELECT id FROM gone)""",
    }


def group_row(row: Any) -> GroupRecord | None:
    """The record in a row of ``sql("group_get")`` (or a group statement), None for no row."""
    if row is None:
        return None
    return GroupRecord(row[0], row[1], bool(row[2]), row[3], row[4], row[5], bool(row[6]), bytes(row[7]),
                       float(row[8]), float(row[9]), float(row[10]), bool(row[11]))


def _schedule_queries(s: str) -> dict[str, str]:
    schedules = f"{s}.stem_schedules"
    columns = "id, definition, paused, last_fired, last_run_id, updated_at"
    return {
        "schedules_all": f"SELECT {columns} FROM {schedules}",
        "schedules": f"SELECT {columns} FROM {schedules} WHERE id = ANY(%s::text[])",
        "put_schedule": f"""
            INSERT INTO {schedules} (id, definition, updated_at) VALUES (%s, %s, {NOW})
            ON CONFLICT (id) DO UPDATE SET definition = EXCLUDED.definition, updated_at = EXCLUDED.updated_at""",
        "remove_schedule": f"DELETE FROM {schedules} WHERE id = %s",
        "create_schedule": f"""
            INSERT INTO {schedules} (id, updated_at) VALUES (%s, {NOW}) ON CONFLICT (id) DO NOTHING""",
        "pause_schedule": f"""
            UPDATE {schedules} SET paused = %s, updated_at = {NOW} WHERE id = %s AND paused <> %s""",
        "mark_fired": f"""
            INSERT INTO {schedules} AS r (id, last_fired, last_run_id, updated_at) VALUES (%s, %s, %s, {NOW})
            ON CONFLICT (id) DO UPDATE
            SET last_fired = EXCLUDED.last_fired, last_run_id = EXCLUDED.last_run_id, updated_at = EXCLUDED.updated_at
            WHERE r.last_fired IS NULL OR r.last_fired < EXCLUDED.last_fired""",
    }


def _payloads(ids: Sequence[str]) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    size = 0
    for i in ids:
        if current and size + len(i) + 1 > _PAYLOAD_MAX:
            out.append(",".join(current))
            current, size = [], 0
        current.append(i)
        size += len(i) + 1
    if current:
        out.append(",".join(current))
    return out


class PostgresResultBackend(ResultBackend):
    def __init__(self, conninfo: str = "postgresql://localhost/postgres", *, schema: str | None = None,
                 result_expires: float = DEFAULT_RESULT_EXPIRES, reconnect_timeout: float = 10.0,
                 url: str | None = None):
        self.result_expires = checks.seconds("result_expires", result_expires)
        conninfo, schema = parse_postgres_url(conninfo, schema)
        self.url = url or conninfo
        self.schema = schema
        self._store = PostgresStore(conninfo, schema, who="PostgresResultBackend", errors=BACKEND_ERRORS,
                                    reconnect_timeout=reconnect_timeout)
        self._pg = self._store.durable
        self._fast = self._store.fast        # reads and heartbeats; see stem.stores.postgres
        self._sql = _queries(quote_schema(schema))
        self.channel = f"stem.{schema}.results"
        self._listener = self._store.listener(self.channel, self._on_notify, self._on_reset)
        self._waits = WaitHub(name=f"postgres-{schema}", read=self._read_found, label=self._store.label,
                              poll=lambda: None if self._listener.listening else _FALLBACK_POLL_S)
        self._next_sweep = 0.0
        self._store_and_ack_sql: dict[tuple[str, bool, bool], str] = {}

    @property
    def pg_store(self) -> PostgresStore:
        """The ``PostgresStore`` (what a broker calls ``store``; here ``store`` stores a status)."""
        return self._store

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "PostgresResultBackend":
        return cls(url, url=url, **kwargs)

    def migrate(self) -> int:
        """Create or upgrade the schema (idempotent, advisory-locked; also done on first use)."""
        return self._store.migrate()

    # -- wake-ups ---------------------------------------------------------------------
    def _on_notify(self, payload: str) -> None:
        if self._waits.has_waiters():
            self._waits.mark(payload.split(","))

    def _on_reset(self) -> None:
        """The listener (re)connected or lost its connection: re-read, and poll while it is down."""
        self._waits.reset()

    def _open_wait(self, ids: list[str], mode: str, keep_latest: bool, deadline: float) -> Waiter:
        """Listening first (or, if it cannot within a few seconds, polling until it does)."""
        self._listener.ensure(min(5.0, max(deadline - time.monotonic(), 0.0)))
        return self._waits.open(ids, mode, keep_latest)

    def reopen_recipe(self) -> tuple[str, dict[str, Any]] | None:
        return (self.url, {"schema": self.schema})

    def workflow_store_recipe(self) -> tuple[str, Any] | None:
        return ("stem.workflows.store_sql:PostgresWorkflowStore", self)

    # -- statuses ---------------------------------------------------------------------
    def store(self, status: TaskStatus) -> None:
        self.store_many((status,))

    def store_many(self, statuses: Sequence[TaskStatus]) -> None:
        if not statuses:
            return
        latest = {s.id: s for s in statuses}        # one upsert may not touch a row twice
        terminal = [i for i, s in latest.items() if s.is_terminal]
        params = (*self._rows(latest), self.channel, _payloads(terminal))
        self._pg.run(lambda conn: conn.execute(self._sql["store"], params))
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + _SWEEP_EVERY_S
            self._pg.run(lambda conn: conn.execute(self._sql["sweep"]))

    def _rows(self, latest: dict[str, TaskStatus]) -> tuple[list, list, list, list]:
        """The upsert's columns (ids, states, encoded statuses, lifetimes: ``status_ttl`` per
        row), made before anything is sent: a status the rule refuses stores nothing."""
        default = self.result_expires
        statuses = latest.values()
        return (list(latest), [s.state.value for s in statuses], [encode_status(s) for s in statuses],
                [status_ttl(s, default) for s in statuses])

    def store_many_and_ack(self, statuses: Sequence[TaskStatus], broker: Any,
                           deliveries: Sequence[Any]) -> bool:
        """Store ``statuses`` and ack ``deliveries`` (releasing their keys, as the broker's ack does)
        in one transaction (one statement, one durable commit) when ``broker`` keeps its queues in
        this database (``shares_store_with``); returns True.  Otherwise does nothing and returns
        False: the caller stores, then acks."""
        if not self.shares_store_with(broker):
            return False
        latest = {s.id: s for s in statuses}
        terminal = [i for i, s in latest.items() if s.is_terminal]
        schema = broker.store.schema
        if any(d.limit is not None for d in deliveries):       # their slots are freed in the same statement
            variant = (schema, True, True)
            params = (*self._rows(latest), [d.receipt for d in deliveries if d.limit is None],
                      [d.receipt for d in deliveries if d.limit is not None], self.channel, _payloads(terminal),
                      f"stem.{schema}.jobs")
        else:
            variant = (schema, any(d.key is not None for d in deliveries), False)
            params = (*self._rows(latest), [d.receipt for d in deliveries], self.channel, _payloads(terminal))
        sql = self._store_and_ack_sql.get(variant)
        if sql is None:
            sql = self._store_and_ack_sql[variant] = _store_sql(quote_schema(self.schema), quote_schema(variant[0]),
                                                                variant[1], variant[2])
        self._pg.run(lambda conn: conn.execute(sql, params))
        return True

    def store_if_not_terminal(self, statuses: Sequence[TaskStatus]) -> None:
        """One upsert whose update applies only over a non-terminal (or expired) row; Postgres
        re-checks that condition on the row it locked, so it holds against a concurrent
        terminal store.  On the fast connection: losing a RUNNING status in a server crash
        costs nothing a terminal status needs."""
        if not check_non_terminal(statuses):
            return
        latest = {s.id: s for s in statuses}        # one upsert may not touch a row twice
        params = self._rows(latest)
        self._fast.run(lambda conn: conn.execute(self._sql["store_if_not_terminal"], params))

    def get(self, task_id: str) -> TaskStatus | None:
        row = self._fast.run(lambda conn: conn.execute(self._sql["get"], (task_id,), binary=True).fetchone())
        return None if row is None else decode_status(row[0])

    def get_many(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        ids = list(task_ids)
        if not ids:
            return []
        rows = self._fast.run(lambda conn: conn.execute(self._sql["get_many"], (ids,), binary=True).fetchall())
        found = {t: decode_status(d) for t, d in rows}
        return [found.get(t) for t in ids]

    def _read_found(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        """The stored statuses among ``task_ids`` (the hub's reads: one query)."""
        rows = self._fast.run(lambda conn: conn.execute(self._sql["get_many"], (list(task_ids),),
                                                        binary=True).fetchall())
        return [decode_status(d) for _, d in rows]

    def forget(self, task_id: str) -> None:
        self._pg.run(lambda conn: conn.execute(self._sql["forget"], (task_id,)))

    # -- heartbeats -------------------------------------------------------------------
    def put_heartbeat(self, worker_id: str, data: dict[str, Any], ttl: float) -> None:
        ttl = checks.seconds("ttl", ttl)
        blob = _encode(data)
        self._fast.run(lambda conn: conn.execute(self._sql["put_heartbeat"], (worker_id, ttl, blob)))

    def heartbeats(self) -> list[dict[str, Any]]:
        rows = self._fast.run(lambda conn: conn.execute(self._sql["heartbeats"], binary=True).fetchall())
        return [{**_decode(data), "worker_id": worker_id, "seen_at": seen_at} for worker_id, seen_at, data in rows]

    def remove_heartbeat(self, worker_id: str) -> None:
        self._fast.run(lambda conn: conn.execute(self._sql["remove_heartbeat"], (worker_id,)))

    # -- revocations ------------------------------------------------------------------
    def revoke(self, task_ids: Sequence[str], expires: float | None = None,
               proofs: Sequence[bytes | None] | None = None) -> None:
        params = self.revoke_params(task_ids, expires, proofs)
        if params is not None:
            self._pg.run(lambda conn: conn.execute(self._sql["revoke"], params))

    def revoke_params(self, task_ids: Sequence[str], expires: float | None = None,
                      proofs: Sequence[bytes | None] | None = None) -> tuple | None:
        """``revoke``'s statement parameters (checked), or None for no ids."""
        expires = checks.optional_seconds("expires", expires)
        task_ids = list(task_ids)
        latest = dict(zip(task_ids, check_proofs(task_ids, proofs)))   # one upsert may not touch a row twice
        if not latest:
            return None
        ttl = float(self.result_expires if expires is None else expires)
        return (ttl, list(latest), list(latest.values()))

    def sql(self, name: str) -> str:
        """One of this backend's statements (for the async producer, ``stem.backends.postgres_async``)."""
        return self._sql[name]

    def revocation_proofs(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        ids = list(task_ids)
        if not ids:
            return {}
        rows = self._fast.run(lambda conn: conn.execute(self._sql["revocation_proofs"], (ids,),
                                                        binary=True).fetchall())
        return {t: bytes(p) for t, p in rows}

    def revoked(self, task_ids: Sequence[str] | None = None) -> set[str]:
        if task_ids is None:
            rows = self._fast.run(lambda conn: conn.execute(self._sql["revoked_all"]).fetchall())
        else:
            ids = list(task_ids)
            if not ids:
                return set()
            rows = self._fast.run(lambda conn: conn.execute(self._sql["revoked"], (ids,)).fetchall())
        return {r[0] for r in rows}

    # -- schedule records ---------------------------------------------------------------
    def schedule_records(self, ids: Sequence[str] | None = None) -> dict[str, ScheduleRecord]:
        wanted = check_schedule_ids(ids)
        if wanted is None:
            rows = self._fast.run(lambda conn: conn.execute(self._sql["schedules_all"], binary=True).fetchall())
        elif not wanted:
            return {}
        else:
            rows = self._fast.run(lambda conn: conn.execute(self._sql["schedules"], (wanted,),
                                                            binary=True).fetchall())
        return {r[0]: ScheduleRecord(r[0], None if r[1] is None else bytes(r[1]), r[2], r[3], r[4], r[5])
                for r in rows}

    def put_schedule(self, schedule_id: str, definition: bytes | None) -> None:
        checks.schedule_id(schedule_id)
        definition = check_definition(definition)
        self._pg.run(lambda conn: conn.execute(self._sql["put_schedule"], (schedule_id, definition)))

    def remove_schedule(self, schedule_id: str) -> bool:
        checks.schedule_id(schedule_id)
        return self._pg.run(lambda conn: conn.execute(self._sql["remove_schedule"], (schedule_id,)).rowcount) > 0

    def pause_schedule(self, schedule_id: str, paused: bool) -> bool:
        """One transaction: create the record if missing, then flip the flag where it differs
        (the UPDATE re-checks that on the row it locks, so of two racing pauses one changes it)."""
        checks.schedule_id(schedule_id)
        checks.flag("paused", paused)

        def pause(conn) -> int:
            with conn.transaction():
                conn.execute(self._sql["create_schedule"], (schedule_id,))
                return conn.execute(self._sql["pause_schedule"], (paused, schedule_id, paused)).rowcount

        return self._pg.run(pause) > 0

    def mark_fired(self, schedule_id: str, fire_time: float, run_id: str) -> None:
        schedule_id, fire_time, run_id = check_fired(schedule_id, fire_time, run_id)
        self._pg.run(lambda conn: conn.execute(self._sql["mark_fired"], (schedule_id, fire_time, run_id)))

    # -- misc -------------------------------------------------------------------------
    # -- group records -------------------------------------------------------------------
    def group_create(self, group_id: str, expected: int, data: bytes, *, seal_by: float, ttl: float,
                     held: bool = False) -> bool:
        group_id, expected, data, seal_by, ttl, held = check_create(group_id, expected, data, seal_by, ttl, held)
        params = {"g": group_id, "n": expected, "d": data, "by": seal_by, "ttl": ttl, "held": held, "sealed": False}
        return self._pg.run(lambda conn: conn.execute(self._sql["group_create"], params).rowcount) == 1

    def group_publish(self, group_id: str, expected: int, data: bytes, *, seal_by: float, ttl: float, held: bool,
                      broker: Any, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], priority: int = 0,
                      visibility_timeout: float | None = None) -> bool | None:
        """One transaction: the record, sealed, then the broker's publish statement (its
        NOTIFY goes out at the commit)."""
        if getattr(broker, "frames_params", None) is None or not self.shares_store_with(broker):
            return None
        group_id, expected, data, seal_by, ttl, held = check_create(group_id, expected, data, seal_by, ttl, held)
        publish = broker.frames_params(queue, task_ids, frames, priority=priority,
                                       visibility_timeout=visibility_timeout)
        if publish is None:
            return None
        params = {"g": group_id, "n": expected, "d": data, "by": seal_by, "ttl": ttl, "held": held, "sealed": True}
        create, statement = self._sql["group_create"], broker.sql("publish")

        def send(conn) -> bool:
            # sent again as a whole after a lost connection: a commit that landed then reads
            # as the record existing (False), and the members were published by it
            with conn.transaction():
                if conn.execute(create, params).rowcount != 1:
                    return False
                conn.execute(statement, publish)
            return True

        created = self._pg.run(send)
        if created:
            broker.published(queue)
        return created

    def group_seal(self, group_id: str) -> GroupRecord | None:
        check_group_id(group_id)
        return group_row(self._pg.run(lambda conn: conn.execute(self._sql["group_seal"], {"g": group_id}).fetchone()))

    def group_record(self, group_id: str, member_id: str, index: int, ok: bool,
                     outcome: bytes, ttl: float | None = None) -> GroupRecord | None:
        group_id, member_id, index, outcome, ttl = check_member(group_id, member_id, index, outcome, ttl,
                                                                self.result_expires)
        params = {"g": group_id, "m": member_id, "i": index, "ok": bool(ok), "o": outcome, "t": ttl}
        return group_row(self._pg.run(lambda conn: conn.execute(self._sql["group_record"], params).fetchone()))

    def group_record_many(self, items: Sequence[tuple[str, str, int, bool, bytes, float | None]]
                          ) -> list[GroupRecord | None]:
        return self.store_and_record((), items)

    def store_and_record(self, statuses: Sequence[TaskStatus],
                         members: Sequence[tuple[str, str, int, bool, bytes, float | None]],
                         brief: bool = False) -> list[GroupRecord | bool | None]:
        """One transaction, pipelined: the statuses' upsert (and NOTIFY, sent at commit), then
        one statement per member."""
        default = self.result_expires
        checked = [check_member(g, m, i, o, t, default) + (ok,) for g, m, i, ok, o, t in members]
        store = None
        if statuses:
            latest = {s.id: s for s in statuses}
            terminal = [i for i, s in latest.items() if s.is_terminal]
            store = (*self._rows(latest), self.channel, _payloads(terminal))
        sql = self._sql["group_record"]

        def send(conn) -> list:
            with conn.transaction(), conn.pipeline():
                if store is not None:
                    conn.execute(self._sql["store"], store)
                cursors = [conn.execute(sql, {"g": g, "m": m, "i": i, "ok": bool(ok), "o": o, "t": t})
                           for g, m, i, o, t, ok in checked]
            return [c.fetchone() for c in cursors]

        return [group_row(r) for r in self._pg.run(send)]   # each statement idempotent: safe to resend

    def group_release(self, group_id: str, ttl: float | None = None) -> GroupRecord | None:
        check_group_id(group_id)
        params = {"g": group_id, "t": check_lifetime(ttl, self.result_expires)}
        return group_row(self._pg.run(lambda conn: conn.execute(self._sql["group_release"], params).fetchone()))

    def group_get(self, group_id: str) -> GroupRecord | None:
        check_group_id(group_id)
        return group_row(self._fast.run(lambda conn: conn.execute(self._sql["group_get"], (group_id,)).fetchone()))

    def group_outcomes(self, group_id: str, start: int, stop: int) -> list[bytes | None]:
        check_group_id(group_id)
        out: list[bytes | None] = [None] * max(0, stop - start)
        if not out or self.group_get(group_id) is None:
            return out
        rows = self._fast.run(lambda conn: conn.execute(self._sql["group_outcomes"], (group_id, start, stop),
                                                        binary=True).fetchall())
        for idx, outcome in rows:
            out[idx - start] = bytes(outcome)
        return out

    def group_failed_members(self, group_id: str, limit: int = 100) -> list[str]:
        check_group_id(group_id)
        return [r[0] for r in self._fast.run(lambda conn: conn.execute(self._sql["group_failed"],
                                                                       (group_id, limit)).fetchall())]

    def group_interrupt_unsealed(self, now: float | None = None) -> list[GroupRecord]:
        now = time.time() if now is None else now
        rows = self._pg.run(lambda conn: conn.execute(self._sql["group_interrupt"], (now,)).fetchall())
        self._pg.run(lambda conn: conn.execute(self._sql["group_sweep"]))
        return [r for r in map(group_row, rows) if r is not None]

    def ping(self) -> None:
        self._pg.run(lambda conn: conn.execute("SELECT 1").fetchone())

    def close(self) -> None:
        self._listener.stop()
        self._waits.stop()
        self._store.close()
