"""SQLite plumbing shared by ``SqliteBroker`` and ``SqliteResultBackend``.

One file holds the broker's and the backend's tables; ``migrate`` creates them
(idempotent, versioned in ``stem_schema_version``, inside one ``BEGIN
IMMEDIATE`` transaction so concurrent processes serialise on SQLite's write
lock).  Schema, version 2::

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

Connections: one per thread (``threading.local``) in WAL mode with a busy
timeout and ``synchronous=NORMAL`` (a committed transaction survives a crash
of any process; the last ones may be lost on power loss).  A connection is
never used in a forked child: the owning pid is checked on every use and a
child opens its own, leaving the inherited ones untouched (closing them could
release or checkpoint the parent's WAL).  ``sqlite://`` (no path) is an
in-memory database for one process: a single connection behind a lock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigurationError, StemError

__all__ = ["SqliteDatabase", "parse_sqlite_url", "SCHEMA_VERSION", "Wake"]

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

# Connections inherited through fork(): kept referenced, never used or closed.
_ABANDONED: list[sqlite3.Connection] = []


def parse_sqlite_url(url: str) -> tuple[str | None, dict[str, str]]:
    """``sqlite:///rel/path.db`` (relative), ``sqlite:////abs/path.db``, ``sqlite://`` (in memory).

    The slashes follow SQLAlchemy's convention.  Returns (path or None, query options).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite":
        raise ConfigurationError(f"not a sqlite URL: {url!r}")
    if parts.netloc:
        raise ConfigurationError(
            f"bad sqlite URL {url!r}: use sqlite:///relative/path.db, sqlite:////absolute/path.db "
            "or sqlite:// for an in-memory database")
    path = unquote(parts.path)
    if path.startswith("/"):
        path = path[1:]
    options = dict(parse_qsl(parts.query))
    if path in ("", ":memory:"):
        return None, options
    return path, options


class Wake:
    """Wakes consumers and waiters of one database file inside this process.

    Other processes are not reached (SQLite has no notifications); their
    consumers poll with a short, growing sleep."""

    __slots__ = ("cond", "seq")

    def __init__(self):
        self.cond = threading.Condition(threading.Lock())
        self.seq = 0

    def notify(self) -> None:
        with self.cond:
            self.seq += 1
            self.cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self.cond:
            if self.seq == seen and timeout > 0:
                self.cond.wait(timeout)


_wakes: dict[str, Wake] = {}
_wakes_lock = threading.Lock()


def _wake_for(key: str) -> Wake:
    with _wakes_lock:
        w = _wakes.get(key)
        if w is None:
            w = _wakes[key] = Wake()
        return w


_databases: "weakref.WeakSet[SqliteDatabase]" = weakref.WeakSet()


def _reset_after_fork() -> None:
    """In a forked child: locks another thread held at fork time would never be released."""
    global _wakes_lock
    _wakes_lock = threading.Lock()
    _wakes.clear()
    for db in list(_databases):
        db._new_locks()


os.register_at_fork(after_in_child=_reset_after_fork)


class _Slot:
    """Holds one thread's connection; closes it when the thread ends (in the owning process only)."""

    __slots__ = ("conn", "pid", "__weakref__")

    def __init__(self, conn: sqlite3.Connection):
        self.conn: sqlite3.Connection | None = conn
        self.pid = os.getpid()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if os.getpid() == self.pid:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        else:
            _ABANDONED.append(conn)

    def __del__(self):
        self.close()


class SqliteDatabase:
    """Connections to one SQLite file (per thread, per process) with error translation."""

    def __init__(self, path: str | None, *, busy_timeout: float, error: type[StemError],
                 connection_error: type[StemError]):
        self.path = None if path is None else os.path.abspath(path)
        self.busy_timeout = float(busy_timeout)
        self._error = error
        self._connection_error = connection_error
        self._pid = os.getpid()
        self._local = threading.local()
        self._slots: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._migrated = False
        self._new_locks()
        if self.path is None:
            self._memory_slot = _Slot(self._open(":memory:"))
        _databases.add(self)

    def _new_locks(self) -> None:
        self._slots_lock = threading.Lock()
        self._migrate_lock = threading.Lock()
        self._memory_lock = threading.RLock()
        self.wake = Wake() if self.path is None else _wake_for(self.path)

    @property
    def label(self) -> str:
        return self.path or ":memory:"

    # -- connections --------------------------------------------------------------
    def _open(self, target: str) -> sqlite3.Connection:
        conn = sqlite3.connect(target, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            # Switching the journal mode needs a lock that the busy timeout does not cover (a
            # process opening the file while a worker writes got an immediate "database is
            # locked"); once the file is in WAL mode, which persists, reading it is enough.
            if target != ":memory:":
                self._ensure_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _ensure_wal(self, conn: sqlite3.Connection) -> None:
        deadline = time.monotonic() + self.busy_timeout
        while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:   # another process is switching or writing
                if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (the shared one, locked, for an in-memory database)."""
        with self._translate():
            if os.getpid() != self._pid:
                self._after_fork()
            if self.path is None:
                with self._memory_lock:
                    if self._memory_slot.conn is None:
                        raise self._error("the in-memory SQLite database is closed")
                    self._ensure_schema(self._memory_slot.conn)
                    yield self._memory_slot.conn
                return
            slot = getattr(self._local, "slot", None)
            if slot is None or slot.conn is None:
                slot = _Slot(self._open(self.path))
                self._local.slot = slot
                with self._slots_lock:
                    self._slots.add(slot)
            self._ensure_schema(slot.conn)
            yield slot.conn

    def _after_fork(self) -> None:
        if self.path is None:
            raise ConfigurationError(
                "an in-memory SQLite database (sqlite://) belongs to one process; "
                "use a file (sqlite:///stem.db) to share it with forked processes")
        for slot in list(self._slots):
            slot.close()          # abandons: the pid differs
        self._pid = os.getpid()
        self._local = threading.local()
        self._slots = weakref.WeakSet()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: atomic, and serialised with every other writer."""
        with self.connection() as conn, self._translate():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            text = str(e).lower()
            if any(w in text for w in ("locked", "busy", "unable to open", "disk i/o", "readonly")):
                raise self._connection_error(f"SQLite database {self.label}: {e}") from e
            raise self._error(f"SQLite database {self.label}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise self._error(f"SQLite database {self.label}: {e} (is it a stem SQLite database?)") from e
        except sqlite3.Error as e:
            raise self._error(f"SQLite database {self.label}: {e}") from e

    # -- schema -------------------------------------------------------------------
    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if not self._migrated:
            with self._migrate_lock:
                if not self._migrated:
                    self._migrate(conn)
                    self._migrated = True

    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent.  Returns the schema version."""
        with self.connection() as conn, self._translate():
            return self._migrate(conn)

    def _migrate(self, conn: sqlite3.Connection) -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS stem_schema_version "
                         "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
            current = conn.execute("SELECT coalesce(max(version), 0) FROM stem_schema_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"SQLite database {self.label} has stem schema version {current}, newer than this "
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

    # -- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        if self.path is None:
            with self._memory_lock:
                self._memory_slot.close()
            return
        with self._slots_lock:
            slots = list(self._slots)
        for slot in slots:
            slot.close()
        self._local = threading.local()
