"""SQLite as stem's broker and backend use it: connections per thread, WAL, busy timeout, errors translated.

One file holds the broker's and the backend's tables (``stem.stores.sqlite_schema``,
created on first use).  Connections: one per thread (``stem.stores.local.PerThread``)
in WAL mode with a busy timeout and ``synchronous=NORMAL`` (a committed
transaction survives a crash of any process; the last ones may be lost on
power loss).  A forked child never uses nor closes a connection it inherited
(closing one could release or checkpoint the parent's WAL): it opens its own.
``sqlite://`` (no path) is an in-memory database for one process: a single
connection behind a lock.

Busy handling is SQLite's own: a writer waits up to ``busy_timeout`` seconds
for the write lock.  Errors: a locked or busy database, a file that cannot be
opened or written, a disk I/O error become the user's connection error
(``BrokerConnectionError`` / ``BackendConnectionError``); every other sqlite3
error (a file that is not a database, a bad statement) the user's error.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import parse_qsl, unquote, urlsplit

from .. import _checks as checks
from ..errors import ConfigurationError, StemError
from . import sqlite_schema
from .base import BROKER_ERRORS, Store, StoreErrors
from .local import PerThread, after_fork_in_child

__all__ = ["SqliteStore", "parse_sqlite_url", "Wake", "SQLITE_ERRORS", "translate"]

#: Every error class sqlite3 raises (``Warning`` does not derive from ``Error``).
SQLITE_ERRORS = (sqlite3.Error, sqlite3.Warning)
# an OperationalError whose message holds one of these: the file cannot be reached now
_UNREACHABLE = ("locked", "busy", "unable to open", "disk i/o", "readonly")


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


def _new_wakes() -> None:
    """In a forked child: the parent's threads are gone, and so are their waits."""
    global _wakes_lock
    _wakes_lock = threading.Lock()
    _wakes.clear()


def translate(exc: BaseException, label: str, errors: StoreErrors) -> StemError:
    """The ``StemError`` for an error sqlite3 raised on the database ``label``."""
    if isinstance(exc, sqlite3.OperationalError):
        if any(w in str(exc).lower() for w in _UNREACHABLE):
            return errors.connection_error(f"SQLite database {label}: {exc}")
        return errors.error(f"SQLite database {label}: {exc}")
    if isinstance(exc, sqlite3.DatabaseError):
        return errors.error(f"SQLite database {label}: {exc} (is it a stem SQLite database?)")
    return errors.error(f"SQLite database {label}: {exc}")


class SqliteStore(Store):
    """Connections to one SQLite file (per thread, per process), or to one in-memory database."""

    def __init__(self, path: str | None, *, busy_timeout: float = 10.0, errors: StoreErrors = BROKER_ERRORS):
        if path is not None and (not isinstance(path, str) or not path or "\0" in path):
            raise ConfigurationError(f"a SQLite path is a file name (or None: in memory), got {path!r}")
        self.path = None if path is None else os.path.abspath(path)
        self.busy_timeout = checks.seconds("busy_timeout", busy_timeout, inclusive=True)
        self.errors = errors
        self.label = self.path or ":memory:"
        self._pid = os.getpid()
        self._migrated = False
        self._memory: sqlite3.Connection | None = None
        self._threads: PerThread[sqlite3.Connection] | None = None
        self._new_locks()
        after_fork_in_child(_new_wakes)
        after_fork_in_child(self._new_locks)
        if self.path is None:
            self._memory = self._open(":memory:")
        else:
            self._threads = PerThread(lambda: self._open(self.path))

    def _new_locks(self) -> None:
        """At construction and in a forked child (a lock held by another thread at fork time
        would never be released there)."""
        self._migrate_lock = threading.Lock()
        self._memory_lock = threading.RLock()
        self.wake = Wake() if self.path is None else _wake_for(self.path)

    def same_store(self, other: Store) -> bool:
        return isinstance(other, SqliteStore) and self.path is not None and other.path == self.path

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
            if self._threads is None:
                if os.getpid() != self._pid:
                    raise ConfigurationError(
                        "an in-memory SQLite database (sqlite://) belongs to one process; "
                        "use a file (sqlite:///stem.db) to share it with forked processes")
                with self._memory_lock:
                    if self._memory is None:
                        raise self.errors.error("the in-memory SQLite database is closed")
                    self._ensure_schema(self._memory)
                    yield self._memory
                return
            conn = self._threads.get()
            self._ensure_schema(conn)
            yield conn

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
        except SQLITE_ERRORS as exc:
            raise translate(exc, self.label, self.errors) from exc

    # -- schema -------------------------------------------------------------------
    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if not self._migrated:
            with self._migrate_lock:
                if not self._migrated:
                    sqlite_schema.migrate(conn, self.label)
                    self._migrated = True

    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent.  Returns the schema version."""
        with self.connection() as conn, self._translate():
            return sqlite_schema.migrate(conn, self.label)

    # -- lifecycle ----------------------------------------------------------------
    def connections(self) -> int:
        """How many connections are open (one per thread that used this store and still runs)."""
        if self._threads is None:
            return int(self._memory is not None)
        return len(self._threads.connections())

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        if self._threads is not None:
            self._threads.close()
            return
        with self._memory_lock:
            conn, self._memory = self._memory, None
        if conn is not None:
            conn.close()
