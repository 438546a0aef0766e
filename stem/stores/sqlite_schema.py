"""stem's SQLite tables and their migrations (one file holds the broker's and the backend's).

``migrate`` creates or upgrades them: idempotent, versioned in
``stem_schema_version``, inside one ``BEGIN IMMEDIATE`` transaction so
concurrent processes serialise on SQLite's write lock.  Schema, version 2::

    stem_messages       id INTEGER PRIMARY KEY AUTOINCREMENT  -- age order; never reused, so a
                                                              -- stale receipt cannot hit a new row
                        queue, task_id, priority, frame
                        state          0 ready | 1 delayed | 2 leased
                        available_at   epoch s: delayed -> not_before, leased -> lease deadline
                        visibility_timeout  seconds, the message's own (NULL: the consuming
                                            broker's default_visibility_timeout)
                        delivery_count
        ix ready    (queue, priority DESC, id)        WHERE state = 0    -- claims, in order
        ix waiting  (queue, available_at, state)      WHERE state <> 0   -- due / expired, stats
    stem_dead_letters   id AUTOINCREMENT, queue, task_id, reason, failed_at, priority,
                        visibility_timeout, frame;  ix (queue, id)
    stem_queues         name PRIMARY KEY
    stem_results        task_id PRIMARY KEY, state, expires_at, data (msgpack TaskStatus); ix expires_at
    stem_heartbeats     worker_id PRIMARY KEY, seen_at, expires_at, data (msgpack dict)
    stem_revocations    task_id PRIMARY KEY, expires_at, proof (signed frame or NULL; version 2)
"""

from __future__ import annotations

import sqlite3
import time

from ..errors import ConfigurationError

__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "migrate"]

SCHEMA_VERSION = 2

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
}


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
