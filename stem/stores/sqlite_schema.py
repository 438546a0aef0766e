"""stem's SQLite tables, their migrations, and the settle statements broker and backend share.

One file holds the broker's and the backend's tables.  ``migrate`` creates or
upgrades them: idempotent, versioned in ``stem_schema_version``, inside one
``BEGIN IMMEDIATE`` transaction so concurrent processes serialise on SQLite's
write lock; each version adds to the last (``ALTER TABLE ... ADD COLUMN``,
new tables), so a file of any older version upgrades in place.  Schema,
version 10::

    stem_messages       id INTEGER PRIMARY KEY AUTOINCREMENT  -- age order; never reused, so a
                                                              -- stale receipt cannot hit a new row
                        queue, task_id, priority, frame
                        state          0 ready | 1 delayed | 2 leased
                        available_at   epoch s: delayed -> not_before, leased -> lease deadline
                        visibility_timeout  seconds, the message's own (NULL: the consuming
                                            broker's default_visibility_timeout)
                        delivery_count
                        key, key_ttl, key_linger   -- publish_keyed's key (NULL: none), its ttl and
                                                   -- linger in seconds (version 3)
        ix ready    (queue, priority DESC, id)        WHERE state = 0    -- claims, in order
        ix waiting  (queue, available_at, state)      WHERE state <> 0   -- due / expired, stats
    stem_dead_letters   id AUTOINCREMENT, queue, task_id, reason, failed_at, priority,
                        visibility_timeout, frame, key, key_ttl, key_linger;  ix (queue, id)
    stem_keys           (queue, key) PRIMARY KEY, owner (task id), expires_at;  ix expires_at
                        -- a row whose expires_at passed is free (version 3)
    stem_queues         name PRIMARY KEY
    stem_results        task_id PRIMARY KEY, state, expires_at, data (msgpack TaskStatus); ix expires_at
    stem_heartbeats     worker_id PRIMARY KEY, seen_at, expires_at, data (msgpack dict)
    stem_revocations    task_id PRIMARY KEY, expires_at, proof (signed frame or NULL; version 2)
    stem_schedules      id PRIMARY KEY, definition (msgpack Schedule.to_dict() or NULL: a schedule
                        in code), paused 0|1, last_fired (epoch s or NULL), last_run_id, updated_at
                        -- no expiry (version 4)
    stem_lane_messages  the messages with a limit (version 5): the columns of stem_messages, plus
                        lane (``lane_of``), rate_key, rate, burst, concurrency_key, concurrency;
                        state 0 waiting in its lane | 1 delayed | 2 leased (a live slot while
                        available_at, its lease deadline, is in the future)
        ix head     (queue, lane, priority DESC, available_at, id)  WHERE state = 0
        ix waiting  (queue, lane, available_at)                    WHERE state <> 0
        ix slots    (queue, concurrency_key, available_at)         WHERE state = 2
    stem_lanes          (queue, lane) PRIMARY KEY, rate_key, concurrency_key, next_eligible (epoch s:
                        the earliest moment it may lease or change), blocked (0|1: next_eligible
                        is a throttle time);  ix (queue, next_eligible), ix (queue, concurrency_key)
    stem_buckets        (queue, rate_key) PRIMARY KEY, tat (GCRA theoretical arrival time);  ix tat
    stem_dead_letters   + lane and the limit columns (version 5): replay restores the lane
    stem_groups         id PRIMARY KEY, expected, sealed, finished, succeeded, failed, interrupted,
                        data, created_at, seal_by, ttl, expires_at (NULL until it ended, and was
                        released when held: a group never expires in flight); ix unsealed
                        (seal_by) (version 6, stem.backends.groups); held 0|1 (version 8)
    stem_group_members  (group_id, member_id) PRIMARY KEY, idx, ok, outcome; ix (group_id, idx)
    stem_wf_runs        id PRIMARY KEY, the RunRecord columns (stem.workflows.store), journal_length
                        (the next append's position), due_at (generated: wake_at of a PENDING run,
                        lease_until of a RUNNING one, wake_at of a PARKED one or minus infinity
                        while it has unread events, else NULL)  (version 7, stem.workflows.store_sql);
                        waits_kind: 'task' or 'child', what waits_for names (version 10)
        ix due        (due_at)  WHERE due_at IS NOT NULL                     -- the sweeper's due
        ix parked_on  (id)      WHERE status = 'PARKED' AND waits_for IS NOT NULL
        ix status     (status, id)                                          -- listing by status
    stem_wf_journal     (run_id, position INTEGER) PRIMARY KEY, kind, name, output, error, attempt,
                        epoch, created_at
    stem_wf_events      (run_id, seq) PRIMARY KEY, UNIQUE (run_id, event_id), topic, payload,
                        created_at;  ix (run_id, topic, seq)
    stem_purge_held     id AUTOINCREMENT, queue, task_id, frame;  ix (queue, id) -- purge_hold's
                        holding area: purged messages whose REVOKED statuses are not yet
                        stored (version 9, stem.purging)

``settle_acked``, ``release_keys`` and ``left_lanes`` are the ack, the key release and
the slot release that the broker's ``ack`` and the backend's fused result+ack
transaction both run.  Times are the process's clock (SQLite has none of its own).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Sequence

from ..errors import ConfigurationError

__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "migrate", "settle_acked", "release_keys", "enter_lanes", "left_lanes",
           "LIMIT_COLUMNS"]

SCHEMA_VERSION = 10
_CHUNK = 500            # ids per IN (...) list

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE stem_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL,
            task_id TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            state INTEGER NOT NULL DEFAULT 0,
            available_at REAL NOT NULL,
            visibility_timeout REAL,
            delivery_count INTEGER NOT NULL DEFAULT 0,
            frame BLOB NOT NULL)""",
        "CREATE INDEX stem_messages_ready ON stem_messages (queue, priority DESC, id) WHERE state = 0",
        "CREATE INDEX stem_messages_waiting ON stem_messages (queue, available_at, state) WHERE state <> 0",
        """CREATE TABLE stem_dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL,
            task_id TEXT NOT NULL,
            reason TEXT NOT NULL,
            failed_at REAL NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            visibility_timeout REAL,
            frame BLOB NOT NULL)""",
        "CREATE INDEX stem_dead_letters_queue ON stem_dead_letters (queue, id)",
        "CREATE TABLE stem_queues (name TEXT PRIMARY KEY) WITHOUT ROWID",
        """CREATE TABLE stem_results (
            task_id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            expires_at REAL NOT NULL,
            data BLOB NOT NULL)""",
        "CREATE INDEX stem_results_expires ON stem_results (expires_at)",
        """CREATE TABLE stem_heartbeats (
            worker_id TEXT PRIMARY KEY,
            seen_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            data BLOB NOT NULL)""",
        "CREATE TABLE stem_revocations (task_id TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID",
    ),
    2: (
        "ALTER TABLE stem_revocations ADD COLUMN proof BLOB",
    ),
    3: (
        """CREATE TABLE stem_keys (
            queue TEXT NOT NULL,
            key TEXT NOT NULL,
            owner TEXT NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (queue, key)) WITHOUT ROWID""",
        "CREATE INDEX stem_keys_expires ON stem_keys (expires_at)",
        *(f"ALTER TABLE {table} ADD COLUMN {column}"
          for table in ("stem_messages", "stem_dead_letters")
          for column in ("key TEXT", "key_ttl REAL", "key_linger REAL")),
    ),
    4: (
        """CREATE TABLE stem_schedules (
            id TEXT PRIMARY KEY,
            definition BLOB,
            paused INTEGER NOT NULL DEFAULT 0,
            last_fired REAL,
            last_run_id TEXT,
            updated_at REAL NOT NULL) WITHOUT ROWID""",
    ),
    5: (
        """CREATE TABLE stem_lane_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL,
            task_id TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            state INTEGER NOT NULL DEFAULT 0,
            available_at REAL NOT NULL,
            visibility_timeout REAL,
            delivery_count INTEGER NOT NULL DEFAULT 0,
            frame BLOB NOT NULL,
            key TEXT,
            key_ttl REAL,
            key_linger REAL,
            lane TEXT NOT NULL,
            rate_key TEXT,
            rate REAL,
            burst INTEGER,
            concurrency_key TEXT,
            concurrency INTEGER)""",
        "CREATE INDEX stem_lane_messages_head ON stem_lane_messages (queue, lane, priority DESC, available_at, id) "
        "WHERE state = 0",
        "CREATE INDEX stem_lane_messages_waiting ON stem_lane_messages (queue, lane, available_at) WHERE state <> 0",
        "CREATE INDEX stem_lane_messages_slots ON stem_lane_messages (queue, concurrency_key, available_at) "
        "WHERE state = 2",
        """CREATE TABLE stem_lanes (
            queue TEXT NOT NULL,
            lane TEXT NOT NULL,
            rate_key TEXT,
            concurrency_key TEXT,
            next_eligible REAL NOT NULL,
            blocked INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (queue, lane)) WITHOUT ROWID""",
        "CREATE INDEX stem_lanes_due ON stem_lanes (queue, next_eligible)",
        "CREATE INDEX stem_lanes_concurrency ON stem_lanes (queue, concurrency_key)",
        """CREATE TABLE stem_buckets (
            queue TEXT NOT NULL,
            rate_key TEXT NOT NULL,
            tat REAL NOT NULL,
            PRIMARY KEY (queue, rate_key)) WITHOUT ROWID""",
        "CREATE INDEX stem_buckets_tat ON stem_buckets (tat)",
        *(f"ALTER TABLE stem_dead_letters ADD COLUMN {column}"
          for column in ("lane TEXT", "rate_key TEXT", "rate REAL", "burst INTEGER", "concurrency_key TEXT",
                         "concurrency INTEGER")),
    ),
    6: (
        """CREATE TABLE stem_groups (
            id TEXT PRIMARY KEY,
            expected INTEGER NOT NULL,
            sealed INTEGER NOT NULL DEFAULT 0,
            finished INTEGER NOT NULL DEFAULT 0,
            succeeded INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            interrupted INTEGER NOT NULL DEFAULT 0,
            data BLOB NOT NULL,
            created_at REAL NOT NULL,
            seal_by REAL NOT NULL,
            ttl REAL NOT NULL,
            expires_at REAL) WITHOUT ROWID""",
        "CREATE INDEX stem_groups_unsealed ON stem_groups (seal_by) WHERE sealed = 0 AND interrupted = 0",
        "CREATE INDEX stem_groups_expires ON stem_groups (expires_at) WHERE expires_at IS NOT NULL",
        """CREATE TABLE stem_group_members (
            group_id TEXT NOT NULL,
            member_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            ok INTEGER NOT NULL,
            outcome BLOB NOT NULL,
            PRIMARY KEY (group_id, member_id)) WITHOUT ROWID""",
        "CREATE INDEX stem_group_members_idx ON stem_group_members (group_id, idx)",
    ),
    7: (
        # due_at: when the run next needs an activation (-9e999 is minus infinity: unread events)
        """CREATE TABLE stem_wf_runs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            input BLOB NOT NULL,
            status TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            owner TEXT,
            lease_until REAL,
            wake_at REAL,
            waiting BLOB,
            waits_for TEXT,
            inbox_count INTEGER NOT NULL DEFAULT 0,
            inbox_seen INTEGER NOT NULL DEFAULT 0,
            parent TEXT,
            result BLOB,
            error BLOB,
            attention TEXT,
            generation INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            journal_length INTEGER NOT NULL DEFAULT 0,
            due_at REAL GENERATED ALWAYS AS (CASE status WHEN 'PENDING' THEN wake_at
                WHEN 'RUNNING' THEN lease_until
                WHEN 'PARKED' THEN CASE WHEN inbox_count > inbox_seen THEN -9e999 ELSE wake_at END END) STORED)""",
        "CREATE INDEX stem_wf_runs_due ON stem_wf_runs (due_at) WHERE due_at IS NOT NULL",
        "CREATE INDEX stem_wf_runs_parked_on ON stem_wf_runs (id) WHERE status = 'PARKED' AND waits_for IS NOT NULL",
        "CREATE INDEX stem_wf_runs_status ON stem_wf_runs (status, id)",
        """CREATE TABLE stem_wf_journal (
            run_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            output BLOB,
            error BLOB,
            attempt INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (run_id, position))""",
        """CREATE TABLE stem_wf_events (
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            topic TEXT NOT NULL,
            event_id TEXT NOT NULL,
            payload BLOB NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (run_id, seq),
            UNIQUE (run_id, event_id))""",
        "CREATE INDEX stem_wf_events_topic ON stem_wf_events (run_id, topic, seq)",
    ),
    8: (
        "ALTER TABLE stem_groups ADD COLUMN held INTEGER NOT NULL DEFAULT 0",
    ),
    9: (
        """CREATE TABLE stem_purge_held (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL,
            task_id TEXT NOT NULL,
            frame BLOB NOT NULL)""",
        "CREATE INDEX stem_purge_held_queue ON stem_purge_held (queue, id)",
    ),
    10: (
        # what a parked run's waits_for names: 'task' or 'child' (NULL: no waits_for, or parked before 10)
        "ALTER TABLE stem_wf_runs ADD COLUMN waits_kind TEXT",
    ),
}

#: The limit columns of a lane message (and of a dead letter that had a limit), in ``Limit`` order.
LIMIT_COLUMNS = "rate_key, rate, burst, concurrency_key, concurrency"


def enter_lanes(conn: sqlite3.Connection, entries: Sequence[tuple]) -> None:
    """Messages entered lanes, given as (queue, lane, rate_key, concurrency_key, due time): each
    lane is created, or made due by the earliest of them unless it is ``blocked`` (messages wait
    in it already, and its score is the throttle time: a newcomer cannot be leased sooner)."""
    earliest: dict[tuple, list] = {}
    for queue, lane, rate_key, concurrency_key, due in entries:
        seen = earliest.get((queue, lane))
        if seen is None:
            earliest[(queue, lane)] = [queue, lane, rate_key, concurrency_key, due]
        elif due < seen[4]:
            seen[4] = due
    conn.executemany(
        "INSERT INTO stem_lanes (queue, lane, rate_key, concurrency_key, next_eligible, blocked) "
        "VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (queue, lane) DO UPDATE SET next_eligible = excluded.next_eligible "
        "WHERE NOT stem_lanes.blocked AND stem_lanes.next_eligible > excluded.next_eligible",
        list(earliest.values()))


def left_lanes(conn: sqlite3.Connection, rows: Sequence[tuple], now: float) -> None:
    """Lane messages left their lease or their lane (settled, requeued, purged), given as (queue,
    lane, concurrency_key): the lanes waiting on those concurrency keys are due now (a slot may
    be free), and lanes left without any message are dropped."""
    keys = {(q, k) for q, _, k in rows if k is not None}
    if keys:
        conn.executemany("UPDATE stem_lanes SET next_eligible = ?, blocked = 0 WHERE queue = ? AND concurrency_key = ? "
                         "AND next_eligible > ?", [(now, q, k, now) for q, k in keys])
    conn.executemany(
        "DELETE FROM stem_lanes WHERE queue = ?1 AND lane = ?2 "
        "AND NOT EXISTS (SELECT 1 FROM stem_lane_messages WHERE queue = ?1 AND lane = ?2 AND state = 0) "
        "AND NOT EXISTS (SELECT 1 FROM stem_lane_messages WHERE queue = ?1 AND lane = ?2 AND state <> 0)",
        list({(q, lane) for q, lane, _ in rows}))


def release_keys(conn: sqlite3.Connection, rows: Sequence[tuple], now: float) -> None:
    """The terminal settle's release, for removed message rows given as (queue, task_id, key,
    key_linger): owner-checked (a key that expired and was claimed by another task is left
    alone); a positive linger keeps the key that much longer instead of deleting it."""
    gone = [(q, k, t) for q, t, k, linger in rows if k is not None and not linger]
    stay = [(now + linger, q, k, t, now) for q, t, k, linger in rows if k is not None and linger]
    if gone:
        conn.executemany("DELETE FROM stem_keys WHERE queue = ? AND key = ? AND owner = ?", gone)
    if stay:
        conn.executemany("UPDATE stem_keys SET expires_at = ? WHERE queue = ? AND key = ? AND owner = ? "
                         "AND expires_at > ?", stay)


def settle_acked(conn: sqlite3.Connection, deliveries: Sequence[Any], now: float) -> None:
    """Delete the rows of acked ``deliveries`` inside the caller's transaction, releasing the keys
    of the keyed ones and the slots of the limited ones.  A delivery without a key or a limit
    costs what it did before keys existed."""
    plain: list[int] = []
    keyed: list[int] = []
    limited: list[int] = []
    for d in deliveries:
        if d.limit is not None:
            limited.append(d.receipt)
        else:
            (plain if d.key is None else keyed).append(d.receipt)
    for i in range(0, len(plain), _CHUNK):
        chunk = plain[i:i + _CHUNK]
        conn.execute(f"DELETE FROM stem_messages WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    for i in range(0, len(keyed), _CHUNK):
        chunk = keyed[i:i + _CHUNK]
        rows = conn.execute(f"DELETE FROM stem_messages WHERE id IN ({','.join('?' * len(chunk))}) "
                            "RETURNING queue, task_id, key, key_linger", chunk).fetchall()
        release_keys(conn, rows, now)
    for i in range(0, len(limited), _CHUNK):
        chunk = limited[i:i + _CHUNK]
        rows = conn.execute(f"DELETE FROM stem_lane_messages WHERE id IN ({','.join('?' * len(chunk))}) "
                            "RETURNING queue, task_id, key, key_linger, lane, concurrency_key", chunk).fetchall()
        release_keys(conn, [r[:4] for r in rows], now)
        left_lanes(conn, [(r[0], r[4], r[5]) for r in rows], now)


def migrate(conn: sqlite3.Connection, label: str) -> int:
    """Create or upgrade the schema on ``conn`` (autocommit mode) in one write transaction;
    idempotent.  Returns the schema version.  ``label`` names the file in errors."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS stem_schema_version "
                     "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        current = conn.execute("SELECT coalesce(max(version), 0) FROM stem_schema_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise ConfigurationError(
                f"SQLite database {label} has stem schema version {current}, newer than this "
                f"stem's {SCHEMA_VERSION}: upgrade stem-queue")
        for version in sorted(MIGRATIONS):
            if version > current:
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO stem_schema_version VALUES (?, ?)", (version, time.time()))
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    conn.execute("COMMIT")
    return SCHEMA_VERSION
