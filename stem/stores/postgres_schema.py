"""stem's Postgres tables, their notification channels, their migrations, and the key release
that the broker's settles and the backend's fused result+ack share.

Every table lives in the schema given by ``?schema=`` / ``schema=`` (default
``public``).  Version 9, created by ``migrate`` under
``pg_advisory_xact_lock(hashtext('stem-migrate:<schema>'))`` so processes that
start together apply each version once; each version adds to the last (new
tables, ``ADD COLUMN`` of nullable columns: no table rewrite), so a schema of
any older version upgrades in place::

    stem_schema_version  version PRIMARY KEY, applied_at
    stem_jobs            id bigint identity PRIMARY KEY   -- age order; never reused
                         queue, task_id, priority, frame bytea
                         state          0 ready | 1 delayed | 2 leased
                         available_at   epoch s (server clock): delayed -> not_before,
                                        leased -> lease deadline, ready -> publish time
                         visibility_timeout (s; NULL: the consuming broker's default),
                         delivery_count
                         key, key_ttl, key_linger  (publish_keyed's key, NULL: none; its ttl and
                                                   linger in seconds; version 3)
        stem_jobs_ready    (queue, priority DESC, id)     WHERE state = 0    -- claims
        stem_jobs_waiting  (queue, available_at, state)   WHERE state <> 0   -- due, expired, stats
    stem_dead_letters    id identity, queue, task_id, reason, failed_at, priority,
                         visibility_timeout, frame, key, key_ttl, key_linger;  (queue, id)
    stem_keys            (queue, key) PRIMARY KEY, owner (task id), expires_at (epoch s, server
                         clock; a row whose expires_at passed is free), claimed_in (txid_current()
                         of the claiming transaction: publish_keyed's RETURNING tells its own
                         claims from live keys by it);  (expires_at)  (version 3)
    stem_queues          name PRIMARY KEY
    stem_results         task_id PRIMARY KEY, state, expires_at, data bytea (msgpack TaskStatus)
    stem_heartbeats      UNLOGGED; worker_id PRIMARY KEY, seen_at, expires_at, data
    stem_revocations     task_id PRIMARY KEY, expires_at, proof bytea (signed frame or NULL; version 2)
    stem_schedules       id PRIMARY KEY, definition bytea (msgpack Schedule.to_dict() or NULL: a
                         schedule in code), paused boolean, last_fired (epoch s or NULL),
                         last_run_id, updated_at (epoch s, server clock); no expiry (version 4)
    stem_lane_jobs       the jobs with a limit (version 5): the columns of stem_jobs, plus lane
                         (``lane_of``), rate_key, rate, burst, concurrency_key, concurrency;
                         state 0 waiting in its lane | 1 delayed | 2 leased (a live slot while
                         available_at, its lease deadline, is in the future)
        stem_lane_jobs_head     (queue, lane, priority DESC, available_at, id)  WHERE state = 0
        stem_lane_jobs_waiting  (queue, lane, available_at)                    WHERE state <> 0
        stem_lane_jobs_slots    (queue, concurrency_key, available_at)         WHERE state = 2
    stem_lanes           (queue, lane) PRIMARY KEY, rate_key, concurrency_key, next_eligible
                         (epoch s, server clock: the earliest moment it may lease or change),
                         blocked (next_eligible is a throttle time);  (queue, next_eligible),
                         (queue, concurrency_key)
    stem_buckets         (queue, rate_key) PRIMARY KEY, tat (GCRA theoretical arrival time);  (tat)
    stem_dead_letters    + lane and the limit columns (version 5): replay restores the lane
    stem_groups          id PRIMARY KEY, expected, sealed, finished, succeeded, failed, interrupted, data,
                         created_at, seal_by, ttl, expires_at (NULL until it ended, and was released
                         when held); (seal_by) WHERE unsealed  (version 6, stem.backends.groups);
                         held (version 8)
    stem_group_members   (group_id, member_id) PRIMARY KEY, idx, ok, outcome; (group_id, idx)
    stem_wf_runs         id (COLLATE "C": ordered as Python orders str) PRIMARY KEY, the RunRecord
                         columns (stem.workflows.store; times are the engine's clock, not the
                         server's), journal_length (the next append's position), due_at
                         (generated: wake_at of a PENDING run, lease_until of a RUNNING one, wake_at
                         of a PARKED one or -Infinity while it has unread events, else NULL);
                         (due_at) WHERE due_at IS NOT NULL, (id) WHERE status = 'PARKED' AND
                         waits_for IS NOT NULL, (status, id)  (version 7, stem.workflows.store_sql);
                         waits_kind: 'task' or 'child', what waits_for names (version 10)
    stem_wf_journal      (run_id, position bigint) PRIMARY KEY, kind, name, output, error, attempt,
                         epoch, created_at
    stem_wf_events       (run_id, seq) PRIMARY KEY, UNIQUE (run_id, event_id), topic, payload,
                         created_at;  (run_id, topic, seq)
    stem_purge_held      id bigint identity PRIMARY KEY, queue, task_id, frame;  (queue, id):
                         purge_hold's holding area, purged jobs whose REVOKED statuses are not
                         yet stored (version 9, stem.purging)

Acked rows are deleted, so ``stem_jobs`` holds only live messages; the
partial indexes hold only the rows a claim or a wake-up looks at.

Notification channels: ``stem.<schema>.jobs`` (payload: a queue name, sent in
the publishing transaction) and ``stem.<schema>.results`` (payload: task ids
of terminal statuses, comma-separated, sent in the storing transaction).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigurationError

__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "NOW", "migrate", "quote_schema", "release_ctes", "wake_ctes",
           "LIMIT_COLUMNS"]

SCHEMA_VERSION = 10
NOW = "extract(epoch FROM now())::float8"    # the server clock; one value per (autocommit) statement
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE {s}.stem_jobs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            queue text NOT NULL,
            task_id text NOT NULL,
            priority integer NOT NULL DEFAULT 0,
            state smallint NOT NULL DEFAULT 0,
            available_at double precision NOT NULL,
            visibility_timeout double precision,
            delivery_count integer NOT NULL DEFAULT 0,
            frame bytea NOT NULL
        ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
                autovacuum_vacuum_insert_scale_factor = 0.02)""",
        "CREATE INDEX stem_jobs_ready ON {s}.stem_jobs (queue, priority DESC, id) WHERE state = 0",
        "CREATE INDEX stem_jobs_waiting ON {s}.stem_jobs (queue, available_at, state) WHERE state <> 0",
        """CREATE TABLE {s}.stem_dead_letters (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            queue text NOT NULL,
            task_id text NOT NULL,
            reason text NOT NULL,
            failed_at double precision NOT NULL,
            priority integer NOT NULL DEFAULT 0,
            visibility_timeout double precision,
            frame bytea NOT NULL)""",
        "CREATE INDEX stem_dead_letters_queue ON {s}.stem_dead_letters (queue, id)",
        "CREATE TABLE {s}.stem_queues (name text PRIMARY KEY)",
        """CREATE TABLE {s}.stem_results (
            task_id text PRIMARY KEY,
            state text NOT NULL,
            expires_at double precision NOT NULL,
            data bytea NOT NULL
        ) WITH (fillfactor = 90)""",
        "CREATE INDEX stem_results_expires ON {s}.stem_results (expires_at)",
        """CREATE UNLOGGED TABLE {s}.stem_heartbeats (
            worker_id text PRIMARY KEY,
            seen_at double precision NOT NULL,
            expires_at double precision NOT NULL,
            data bytea NOT NULL)""",
        "CREATE TABLE {s}.stem_revocations (task_id text PRIMARY KEY, expires_at double precision NOT NULL)",
    ),
    2: (
        "ALTER TABLE {s}.stem_revocations ADD COLUMN proof bytea",
    ),
    3: (
        """CREATE TABLE {s}.stem_keys (
            queue text NOT NULL,
            key text NOT NULL,
            owner text NOT NULL,
            expires_at double precision NOT NULL,
            claimed_in bigint NOT NULL,
            PRIMARY KEY (queue, key))""",
        "CREATE INDEX stem_keys_expires ON {s}.stem_keys (expires_at)",
        *(f"ALTER TABLE {{s}}.{table} ADD COLUMN key text, ADD COLUMN key_ttl double precision, "
          "ADD COLUMN key_linger double precision" for table in ("stem_jobs", "stem_dead_letters")),
    ),
    4: (
        """CREATE TABLE {s}.stem_schedules (
            id text PRIMARY KEY,
            definition bytea,
            paused boolean NOT NULL DEFAULT false,
            last_fired double precision,
            last_run_id text,
            updated_at double precision NOT NULL)""",
    ),
    5: (
        """CREATE TABLE {s}.stem_lane_jobs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            queue text NOT NULL,
            task_id text NOT NULL,
            priority integer NOT NULL DEFAULT 0,
            state smallint NOT NULL DEFAULT 0,
            available_at double precision NOT NULL,
            visibility_timeout double precision,
            delivery_count integer NOT NULL DEFAULT 0,
            frame bytea NOT NULL,
            key text,
            key_ttl double precision,
            key_linger double precision,
            lane text NOT NULL,
            rate_key text,
            rate double precision,
            burst integer,
            concurrency_key text,
            concurrency integer
        ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
                autovacuum_vacuum_insert_scale_factor = 0.02)""",
        "CREATE INDEX stem_lane_jobs_head ON {s}.stem_lane_jobs (queue, lane, priority DESC, available_at, id) "
        "WHERE state = 0",
        "CREATE INDEX stem_lane_jobs_waiting ON {s}.stem_lane_jobs (queue, lane, available_at) WHERE state <> 0",
        "CREATE INDEX stem_lane_jobs_slots ON {s}.stem_lane_jobs (queue, concurrency_key, available_at) "
        "WHERE state = 2",
        """CREATE TABLE {s}.stem_lanes (
            queue text NOT NULL,
            lane text NOT NULL,
            rate_key text,
            concurrency_key text,
            next_eligible double precision NOT NULL,
            blocked boolean NOT NULL DEFAULT false,
            PRIMARY KEY (queue, lane)
        ) WITH (fillfactor = 50)""",
        "CREATE INDEX stem_lanes_due ON {s}.stem_lanes (queue, next_eligible)",
        "CREATE INDEX stem_lanes_concurrency ON {s}.stem_lanes (queue, concurrency_key)",
        """CREATE TABLE {s}.stem_buckets (
            queue text NOT NULL,
            rate_key text NOT NULL,
            tat double precision NOT NULL,
            PRIMARY KEY (queue, rate_key)
        ) WITH (fillfactor = 50)""",
        "CREATE INDEX stem_buckets_tat ON {s}.stem_buckets (tat)",
        "ALTER TABLE {s}.stem_dead_letters ADD COLUMN lane text, ADD COLUMN rate_key text, "
        "ADD COLUMN rate double precision, ADD COLUMN burst integer, ADD COLUMN concurrency_key text, "
        "ADD COLUMN concurrency integer",
    ),
    6: (
        """CREATE TABLE {s}.stem_groups (
            id text PRIMARY KEY,
            expected integer NOT NULL,
            sealed boolean NOT NULL DEFAULT false,
            finished integer NOT NULL DEFAULT 0,
            succeeded integer NOT NULL DEFAULT 0,
            failed integer NOT NULL DEFAULT 0,
            interrupted boolean NOT NULL DEFAULT false,
            data bytea NOT NULL,
            created_at double precision NOT NULL,
            seal_by double precision NOT NULL,
            ttl double precision NOT NULL,
            expires_at double precision)""",
        "CREATE INDEX stem_groups_unsealed ON {s}.stem_groups (seal_by) WHERE NOT sealed AND NOT interrupted",
        "CREATE INDEX stem_groups_expires ON {s}.stem_groups (expires_at) WHERE expires_at IS NOT NULL",
        """CREATE TABLE {s}.stem_group_members (
            group_id text NOT NULL,
            member_id text NOT NULL,
            idx integer NOT NULL,
            ok boolean NOT NULL,
            outcome bytea NOT NULL,
            PRIMARY KEY (group_id, member_id))""",
        "CREATE INDEX stem_group_members_idx ON {s}.stem_group_members (group_id, idx)",
    ),
    7: (
        """CREATE TABLE {s}.stem_wf_runs (
            id text COLLATE "C" PRIMARY KEY,
            name text NOT NULL,
            version text NOT NULL,
            input bytea NOT NULL,
            status text NOT NULL,
            epoch bigint NOT NULL,
            owner text,
            lease_until double precision,
            wake_at double precision,
            waiting bytea,
            waits_for text,
            inbox_count bigint NOT NULL DEFAULT 0,
            inbox_seen bigint NOT NULL DEFAULT 0,
            parent text,
            result bytea,
            error bytea,
            attention text,
            generation bigint NOT NULL DEFAULT 0,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            journal_length bigint NOT NULL DEFAULT 0,
            due_at double precision GENERATED ALWAYS AS (CASE status WHEN 'PENDING' THEN wake_at
                WHEN 'RUNNING' THEN lease_until
                WHEN 'PARKED' THEN CASE WHEN inbox_count > inbox_seen THEN '-Infinity'::float8 ELSE wake_at END
                END) STORED)""",
        "CREATE INDEX stem_wf_runs_due ON {s}.stem_wf_runs (due_at) WHERE due_at IS NOT NULL",
        "CREATE INDEX stem_wf_runs_parked_on ON {s}.stem_wf_runs (id) "
        "WHERE status = 'PARKED' AND waits_for IS NOT NULL",
        "CREATE INDEX stem_wf_runs_status ON {s}.stem_wf_runs (status, id)",
        """CREATE TABLE {s}.stem_wf_journal (
            run_id text NOT NULL,
            position bigint NOT NULL,
            kind text NOT NULL,
            name text NOT NULL,
            output bytea,
            error bytea,
            attempt bigint NOT NULL,
            epoch bigint NOT NULL,
            created_at double precision NOT NULL,
            PRIMARY KEY (run_id, position))""",
        """CREATE TABLE {s}.stem_wf_events (
            run_id text NOT NULL,
            seq bigint NOT NULL,
            topic text NOT NULL,
            event_id text NOT NULL,
            payload bytea NOT NULL,
            created_at double precision NOT NULL,
            PRIMARY KEY (run_id, seq),
            UNIQUE (run_id, event_id))""",
        "CREATE INDEX stem_wf_events_topic ON {s}.stem_wf_events (run_id, topic, seq)",
    ),
    8: (
        "ALTER TABLE {s}.stem_groups ADD COLUMN held boolean NOT NULL DEFAULT false",
    ),
    9: (
        """CREATE TABLE {s}.stem_purge_held (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            queue text NOT NULL,
            task_id text NOT NULL,
            frame bytea NOT NULL)""",
        "CREATE INDEX stem_purge_held_queue ON {s}.stem_purge_held (queue, id)",
    ),
    10: (
        # what a parked run's waits_for names: 'task' or 'child' (NULL: no waits_for, or parked before 10)
        "ALTER TABLE {s}.stem_wf_runs ADD COLUMN waits_kind text",
    ),
}

#: The limit columns of a lane job (and of a dead letter that had a limit), in ``Limit`` order.
LIMIT_COLUMNS = "rate_key, rate, burst, concurrency_key, concurrency"


def wake_ctes(s: str, left: str) -> str:
    """Two CTEs (``woken_lanes``, ``woken``; to follow a comma) for lane jobs that left their
    lease or their lane, which CTE ``left`` returns (columns queue, lane, concurrency_key): the
    lanes waiting on those concurrency keys are due now (a slot may be free), and so is each
    job's own lane unless it is ``blocked`` (a consume then drops it if it is empty).  ``woken``
    returns the queue of each lane made due, for a notification.  The lanes are locked in key
    order, as every settle locks them, so that two settles queue up instead of deadlocking."""
    return f"""
        woken_lanes AS (
            SELECT l.queue, l.lane FROM {s}.stem_lanes l
            JOIN (SELECT DISTINCT queue, lane, concurrency_key FROM {left}) r ON l.queue = r.queue
                AND (l.concurrency_key = r.concurrency_key OR (l.lane = r.lane AND NOT l.blocked))
            WHERE l.next_eligible > {NOW}
            ORDER BY l.queue, l.lane FOR UPDATE OF l),
        woken AS (
            UPDATE {s}.stem_lanes l SET next_eligible = {NOW}, blocked = false FROM woken_lanes w
            WHERE l.queue = w.queue AND l.lane = w.lane
            RETURNING l.queue)"""


def release_ctes(s: str, removed: str) -> str:
    """Three CTEs (``held``, ``freed``, ``lingered``; to follow a comma) releasing the keys of
    the message rows that CTE ``removed`` returns (columns queue, task_id, key, key_linger): the
    terminal settle's release, owner-checked (a key that expired and was claimed by another task
    is left alone); a positive linger keeps the key that much longer instead of deleting it.
    ``held`` locks the keys in key order, as ``publish_keyed`` claims them, so that a settle and
    a publish over the same keys queue up instead of deadlocking."""
    return f"""
        held AS (
            SELECT k.queue, k.key, k.owner, r.key_linger FROM {s}.stem_keys k
            JOIN {removed} r ON k.queue = r.queue AND k.key = r.key AND k.owner = r.task_id
            ORDER BY k.queue, k.key FOR UPDATE OF k),
        freed AS (
            DELETE FROM {s}.stem_keys k USING held h
            WHERE k.queue = h.queue AND k.key = h.key AND k.owner = h.owner AND coalesce(h.key_linger, 0) <= 0),
        lingered AS (
            UPDATE {s}.stem_keys k SET expires_at = {NOW} + h.key_linger FROM held h
            WHERE k.queue = h.queue AND k.key = h.key AND k.owner = h.owner AND h.key_linger > 0
                AND k.expires_at > {NOW})"""


def quote_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            f"bad Postgres schema name {schema!r}: use a letter or _ then up to 47 of A-Z a-z 0-9 _")
    return f'"{schema}"'


def migrate(conn: Any, schema: str) -> int:
    """Create or upgrade stem's tables in ``schema``; idempotent and safe to run concurrently."""
    s = quote_schema(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"stem-migrate:{schema}",), prepare=False)
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}", prepare=False)
        conn.execute(f"CREATE TABLE IF NOT EXISTS {s}.stem_schema_version (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())", prepare=False)
        current = conn.execute(f"SELECT coalesce(max(version), 0) FROM {s}.stem_schema_version",
                               prepare=False).fetchone()[0]
        if current > SCHEMA_VERSION:
            raise ConfigurationError(f"Postgres schema {schema!r} has stem schema version {current}, newer than "
                                     f"this stem's {SCHEMA_VERSION}: upgrade stem-queue")
        for version in sorted(MIGRATIONS):
            if version > current:
                for statement in MIGRATIONS[version]:
                    conn.execute(statement.format(s=s), prepare=False)
                conn.execute(f"INSERT INTO {s}.stem_schema_version (version) VALUES (%s)", (version,),
                             prepare=False)
    return SCHEMA_VERSION
