"""Postgres as stem's broker and backend use it: durable and fast sessions, reconnects, errors translated.

Tables, channels and migrations: ``stem.stores.postgres_schema`` (applied on
first use); the LISTEN thread: ``stem.stores.postgres_listen``.

Connections: autocommit, prepared statements, one per thread and process
(``stem.stores.local.PerThread``).  A store keeps two kinds (``FAST`` below):
``durable`` sessions for what must survive a server crash once the call
returns (publish, retry, dead-letter, results, revocations), and ``fast``
ones with ``synchronous_commit=off`` for claims, acks, lease renewals and
reads -- losing one of those in a server crash only redelivers a task, which
at-least-once allows, and the next durable commit flushes them anyway.  The
fast sessions also turn bitmap and sequential scans off: a queue table's
statistics are always stale, and every stem query is shaped for its index (an
ordered scan of ``stem_jobs_ready`` that stops after ``max_count`` rows),
which the planner must not trade for a scan-and-sort of the whole backlog on
a bad row estimate.  Both kinds use generic plans (``plan_cache_mode``): the
claim is a large statement whose re-planning on every call would cost more
than running it.

After ``fork`` the child never touches an inherited connection: its socket is
pointed at /dev/null and the libpq handle finished, so nothing reaches the
parent's session (the stores' fork hook, registered with the first store).

Errors: a lost connection or an unusable session (``OperationalError``,
``InterfaceError``) is retried, reconnecting, with capped backoff for up to
``reconnect_timeout`` seconds, then raised as the user's connection error
(``BrokerConnectionError`` / ``BackendConnectionError``); every other psycopg
error becomes the user's error at once.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .. import _checks as checks
from ..errors import ConfigurationError, StemError
from . import postgres_schema
from .base import BROKER_ERRORS, Backoff, Store, StoreErrors
from .local import PerThread, after_fork_in_child
from .postgres_listen import Listener

__all__ = ["PostgresStore", "PgSessions", "import_psycopg", "parse_postgres_url", "translate", "DURABLE", "FAST"]

log = logging.getLogger("stem.stores.postgres")
T = TypeVar("T")

DURABLE = {"plan_cache_mode": "force_generic_plan"}
FAST = {**DURABLE, "synchronous_commit": "off", "enable_bitmapscan": "off", "enable_seqscan": "off"}


def import_psycopg(who: str) -> Any:
    try:
        import psycopg
    except ImportError as e:
        raise ConfigurationError(f"{who} needs psycopg: pip install 'stem-queue[postgres]'") from e
    return psycopg


def parse_postgres_url(url: str, schema: str | None = None) -> tuple[str, str]:
    """Split ``postgresql://user@host:port/db?schema=name&...`` into (conninfo URL, schema).

    A ``schema`` argument wins over ``?schema=``; the default is ``public``."""
    if not isinstance(url, str):
        raise ConfigurationError(f"a Postgres URL is a string (postgresql://user@host/db), got {url!r}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("postgres", "postgresql"):
        raise ConfigurationError(f"not a postgresql:// URL: {url!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    from_query = [v for k, v in query if k == "schema"]
    rest = [(k, v) for k, v in query if k != "schema"]
    schema = schema or (from_query[-1] if from_query else None) or "public"
    postgres_schema.quote_schema(schema)
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def translate(exc: BaseException, label: str, errors: StoreErrors, *, gave_up_after: float | None = None) -> StemError:
    """The ``StemError`` for an error psycopg raised at ``label``: the connection error when
    ``gave_up_after`` (seconds of retries) is given, else the plain error."""
    text = f"PostgreSQL at {label}: {str(exc).strip() or type(exc).__name__}"
    if gave_up_after is not None:
        return errors.connection_error(f"{text} (gave up after {gave_up_after:g}s of retries)")
    return errors.error(text)


# -- fork safety ------------------------------------------------------------------------
_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()    # every psycopg connection a store opened


def _disown_inherited() -> None:
    """In a forked child: detach every inherited connection from the parent's socket, then finish it."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for conn in list(_LIVE):
            try:
                pgconn = conn.pgconn
                if pgconn.status == 0:      # CONNECTION_OK
                    os.dup2(devnull, pgconn.socket)
                pgconn.finish()
            except Exception:       # noqa: BLE001 - best effort; the parent's session must survive
                pass
    finally:
        os.close(devnull)
    _LIVE.clear()


class PgSessions:
    """Per-thread autocommit connections with one set of session ``settings``; ``run`` retries,
    reconnects and translates errors."""

    def __init__(self, store: "PostgresStore", settings: dict[str, str]):
        self._store = store
        self.settings = dict(settings)
        self._threads: PerThread[Any] = PerThread(self.connect, usable=_usable)

    def connect(self, *, prepare: bool = True) -> Any:
        """A new autocommit connection with these settings (not held for a thread)."""
        store = self._store
        kwargs: dict[str, Any] = {}
        if self.settings:
            kwargs["options"] = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        conn = store.psycopg.connect(
            store.conninfo, autocommit=True, prepare_threshold=0 if prepare else None,
            connect_timeout=max(1, int(store.connect_timeout)), application_name="stem",
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3, **kwargs)
        _LIVE.add(conn)
        return conn

    def connections(self) -> list[Any]:
        """The connections open now, one per thread that used these sessions."""
        return self._threads.connections()

    def _connection(self) -> Any:
        conn = self._threads.get()
        self._store.ensure_schema(conn)
        return conn

    def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(conn)`` on this thread's connection.  Connection and transient errors are retried
        (reconnecting) for up to ``reconnect_timeout`` seconds, then raised as the connection
        error; other psycopg errors become the error at once."""
        store = self._store
        pg = store.psycopg
        deadline = None
        backoff = None
        while True:
            try:
                return fn(self._connection())
            except (pg.OperationalError, pg.InterfaceError) as e:
                conn = self._threads.current()
                if conn is None or not _usable(conn):
                    self._threads.discard()
                now = time.monotonic()
                if deadline is None:
                    deadline, backoff = now + store.reconnect_timeout, Backoff()
                delay = backoff.next()
                if now + delay > deadline:
                    raise translate(e, store.label, store.errors, gave_up_after=store.reconnect_timeout) from e
                time.sleep(delay)
            except (pg.Error, pg.Warning) as e:
                raise translate(e, store.label, store.errors) from e

    def close(self) -> None:
        self._threads.close()


def _usable(conn: Any) -> bool:
    return not (conn.closed or conn.broken)


class PostgresStore(Store):
    """One adapter's connections to one Postgres database and schema: ``durable`` and ``fast``
    sessions, migrations on first use, ``listener`` threads."""

    def __init__(self, conninfo: str, schema: str, *, who: str, errors: StoreErrors = BROKER_ERRORS,
                 reconnect_timeout: float = 10.0, connect_timeout: float = 5.0):
        self.psycopg = import_psycopg(who)
        self.conninfo = conninfo
        self.schema = schema
        self.errors = errors
        self.reconnect_timeout = checks.seconds("reconnect_timeout", reconnect_timeout, inclusive=True)
        self.connect_timeout = checks.seconds("connect_timeout", connect_timeout)
        try:
            info = self.psycopg.conninfo.conninfo_to_dict(conninfo)
        except self.psycopg.Error as e:
            raise ConfigurationError(f"bad PostgreSQL URL: {e}") from e
        self.label = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        #: (host, port, database, user): two stores with the same identity reach the same tables
        self.identity = (info.get("host", "localhost"), str(info.get("port", 5432)), info.get("dbname", ""),
                         info.get("user", ""))
        self._migrated = False
        after_fork_in_child(_disown_inherited)
        self.durable = PgSessions(self, DURABLE)
        self.fast = PgSessions(self, FAST)

    def same_store(self, other: Store) -> bool:
        return isinstance(other, PostgresStore) and other.identity == self.identity

    def ensure_schema(self, conn: Any) -> None:
        """Create or upgrade the tables once per store, on its first connection."""
        if not self._migrated:
            postgres_schema.migrate(conn, self.schema)
            self._migrated = True

    def migrate(self) -> int:
        """Create or upgrade the schema (idempotent, advisory-locked).  Returns the version."""
        return self.durable.run(lambda conn: postgres_schema.migrate(conn, self.schema))

    def listener(self, channel: str, on_notify: Callable[[str], None], on_reset: Callable[[], None]) -> Listener:
        """A LISTEN thread on ``channel`` (started by its first ``ensure``)."""
        return Listener(lambda: self.durable.connect(prepare=False), channel, on_notify, on_reset)

    def close(self) -> None:
        self.durable.close()
        self.fast.close()
