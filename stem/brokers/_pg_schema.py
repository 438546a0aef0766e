"""PostgreSQL plumbing shared by ``PostgresBroker`` and ``PostgresResultBackend``.

Schema (every table in the schema given by ``?schema=`` / ``schema=``, default
``public``), version 2, created by ``migrate`` under
``pg_advisory_xact_lock(hashtext('stem-migrate:<schema>'))`` so processes that
start together apply each version once::

    stem_schema_version  version PRIMARY KEY, applied_at
    stem_jobs            id bigint identity PRIMARY KEY   -- age order; never reused
                         queue, task_id, priority, frame bytea
                         state          0 ready | 1 delayed | 2 leased
                         available_at   epoch s (server clock): delayed -> not_before,
                                        leased -> lease deadline, ready -> publish time
                         visibility_timeout (s; NULL: the consuming broker's default),
                         delivery_count
        stem_jobs_ready    (queue, priority DESC, id)     WHERE state = 0    -- claims
        stem_jobs_waiting  (queue, available_at, state)   WHERE state <> 0   -- due, expired, stats
    stem_dead_letters    id identity, queue, task_id, reason, failed_at, priority,
                         visibility_timeout, frame;  (queue, id)
    stem_queues          name PRIMARY KEY
    stem_results         task_id PRIMARY KEY, state, expires_at, data bytea (msgpack TaskStatus)
    stem_heartbeats      UNLOGGED; worker_id PRIMARY KEY, seen_at, expires_at, data
    stem_revocations     task_id PRIMARY KEY, expires_at, proof bytea (signed frame or NULL; version 2)

Acked rows are deleted, so ``stem_jobs`` holds only live messages; the
partial indexes hold only the rows a claim or a wake-up looks at.

Notification channels: ``stem.<schema>.jobs`` (payload: a queue name, sent in
the publishing transaction) and ``stem.<schema>.results`` (payload: task ids
of terminal statuses, comma-separated, sent in the storing transaction).

Connections: autocommit, prepared statements, one per thread and process.
Each adapter keeps two kinds (``FAST`` below): durable ones for what must
survive a server crash once the call returns (publish, retry, dead-letter,
results, revocations), and fast ones with ``synchronous_commit=off`` for
claims, acks, lease renewals and reads -- losing one of those in a server
crash only redelivers a task, which at-least-once allows, and the next durable
commit flushes them anyway.  The fast sessions also turn bitmap and
sequential scans off: a queue table's statistics are always stale, and every
stem query is shaped for its index (an ordered scan of ``stem_jobs_ready``
that stops after ``max_count`` rows), which the planner must not trade for a
scan-and-sort of the whole backlog on a bad row estimate.  Both kinds use
generic plans (``plan_cache_mode``): the claim is a large statement whose
re-planning on every call would cost more than running it.
After ``fork`` the child never touches an inherited connection: its socket is
pointed at /dev/null and the libpq handle finished, so nothing reaches the
parent's session.
"""

from __future__ import annotations

import logging
import os
import re
import select
import threading
import time
import weakref
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError, StemError

__all__ = ["import_psycopg", "parse_postgres_url", "PgConnections", "Listener", "migrate", "SCHEMA_VERSION",
           "NOW", "FAST", "DURABLE"]

log = logging.getLogger("stem.broker.postgres")
T = TypeVar("T")

SCHEMA_VERSION = 2
NOW = "extract(epoch FROM now())::float8"    # the server clock; one value per (autocommit) statement
DURABLE = {"plan_cache_mode": "force_generic_plan"}
FAST = {**DURABLE, "synchronous_commit": "off", "enable_bitmapscan": "off", "enable_seqscan": "off"}
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,47}$")

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
}


def import_psycopg(who: str):
    try:
        import psycopg
    except ImportError as e:
        raise ConfigurationError(f"{who} needs psycopg: pip install 'stem-queue[postgres]'") from e
    return psycopg


def quote_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
        raise ConfigurationError(
            f"bad Postgres schema name {schema!r}: use a letter or _ then up to 47 of A-Z a-z 0-9 _")
    return f'"{schema}"'


def parse_postgres_url(url: str, schema: str | None = None) -> tuple[str, str]:
    """Split ``postgresql://user@host:port/db?schema=name&...`` into (conninfo URL, schema).

    A ``schema`` argument wins over ``?schema=``; the default is ``public``."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("postgres", "postgresql"):
        raise ConfigurationError(f"not a postgresql:// URL: {url!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    from_query = [v for k, v in query if k == "schema"]
    rest = [(k, v) for k, v in query if k != "schema"]
    schema = schema or (from_query[-1] if from_query else None) or "public"
    quote_schema(schema)
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


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


# -- fork safety ------------------------------------------------------------------------
_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
_RESET_IN_CHILD: "weakref.WeakSet[Any]" = weakref.WeakSet()


def reset_in_child(obj: Any) -> None:
    """Call ``obj._new_locks()`` in every forked child: a lock another thread held at fork
    time would never be released there."""
    _RESET_IN_CHILD.add(obj)


def _disown_after_fork() -> None:
    """In a forked child: detach every inherited connection from the parent's socket, then finish it."""
    for obj in list(_RESET_IN_CHILD):
        obj._new_locks()
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


os.register_at_fork(after_in_child=_disown_after_fork)


class _Slot:
    """One thread's connection; closed when the thread ends (in the owning process)."""

    __slots__ = ("conn", "pid", "__weakref__")

    def __init__(self, conn: Any):
        self.conn = conn
        self.pid = os.getpid()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and os.getpid() == self.pid:
            try:
                conn.close()
            except Exception:       # noqa: BLE001 - closing a broken connection
                pass

    def __del__(self):
        self.close()


class PgConnections:
    """Per-thread autocommit connections with retry, reconnect and error translation."""

    def __init__(self, conninfo: str, schema: str, *, who: str, error: type[StemError],
                 connection_error: type[StemError], reconnect_timeout: float, connect_timeout: float = 5.0,
                 settings: dict[str, str] | None = None, _schema_state: dict[str, bool] | None = None):
        self.psycopg = import_psycopg(who)
        self.conninfo = conninfo
        self.schema = schema
        self.reconnect_timeout = float(reconnect_timeout)
        self.connect_timeout = connect_timeout
        self.settings = dict(settings or {})
        self._who = who
        self._error = error
        self._connection_error = connection_error
        self._pid = os.getpid()
        self._local = threading.local()
        self._slots: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._new_locks()
        reset_in_child(self)
        self._schema_state = {"migrated": False} if _schema_state is None else _schema_state
        try:
            info = self.psycopg.conninfo.conninfo_to_dict(conninfo)
        except self.psycopg.Error as e:
            raise ConfigurationError(f"bad PostgreSQL URL: {e}") from e
        self.label = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        self.identity = (info.get("host", "localhost"), str(info.get("port", 5432)), info.get("dbname", ""),
                         info.get("user", ""))

    def _new_locks(self) -> None:
        self._lock = threading.Lock()

    def sibling(self, settings: dict[str, str]) -> "PgConnections":
        """Connections to the same database and schema with other session ``settings``."""
        return PgConnections(self.conninfo, self.schema, who=self._who, error=self._error,
                             connection_error=self._connection_error, reconnect_timeout=self.reconnect_timeout,
                             connect_timeout=self.connect_timeout, settings=settings,
                             _schema_state=self._schema_state)

    def connect(self, *, prepare: bool = True) -> Any:
        kwargs: dict[str, Any] = {}
        if self.settings:
            kwargs["options"] = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        conn = self.psycopg.connect(
            self.conninfo, autocommit=True, prepare_threshold=0 if prepare else None,
            connect_timeout=max(1, int(self.connect_timeout)), application_name="stem",
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3, **kwargs)
        _LIVE.add(conn)
        return conn

    def _connection(self) -> Any:
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._local = threading.local()
            self._slots = weakref.WeakSet()
        slot = getattr(self._local, "slot", None)
        if slot is None or slot.conn is None or slot.conn.closed or slot.conn.broken:
            if slot is not None:
                slot.close()
            slot = _Slot(self.connect())
            self._local.slot = slot
            with self._lock:
                self._slots.add(slot)
        if not self._schema_state["migrated"]:
            migrate(slot.conn, self.schema)
            self._schema_state["migrated"] = True
        return slot.conn

    def _discard(self) -> None:
        slot = getattr(self._local, "slot", None)
        if slot is not None:
            slot.close()
            self._local.slot = None

    def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(conn)`` on this thread's connection.  Connection and transient errors are retried
        (reconnecting) for up to ``reconnect_timeout`` seconds, then raised as ``connection_error``;
        other driver errors become ``error``."""
        pg = self.psycopg
        deadline = None
        delay = 0.05
        while True:
            try:
                return fn(self._connection())
            except (pg.OperationalError, pg.InterfaceError) as e:
                slot = getattr(self._local, "slot", None)
                if slot is None or slot.conn is None or slot.conn.closed or slot.conn.broken:
                    self._discard()
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                if now + delay > deadline:
                    raise self._connection_error(
                        f"PostgreSQL at {self.label}: {str(e).strip()} "
                        f"(gave up after {self.reconnect_timeout:g}s of retries)") from e
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except pg.Error as e:
                raise self._error(f"PostgreSQL at {self.label}: {str(e).strip()}") from e

    def migrate(self) -> int:
        return self.run(lambda conn: migrate(conn, self.schema))

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            slot.close()
        self._local = threading.local()


class Listener:
    """A thread with its own connection that LISTENs on one channel.

    ``on_notify(payload)`` runs for each notification; ``on_reset()`` whenever
    the listener (re)connects or loses its connection, so that waiters
    re-check instead of trusting a stream that may have had a gap."""

    def __init__(self, pg: PgConnections, channel: str, on_notify: Callable[[str], None],
                 on_reset: Callable[[], None]):
        self._pg = pg
        self.channel = channel
        self._on_notify = on_notify
        self._on_reset = on_reset
        self._pid = 0
        self._thread: threading.Thread | None = None
        self._new_locks()
        reset_in_child(self)
        self._start_state()

    def _new_locks(self) -> None:
        self._lock = threading.Lock()

    def _start_state(self) -> None:
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def ensure(self, timeout: float) -> bool:
        """Start the thread if needed; wait up to ``timeout`` s until it listens.  True once listening."""
        with self._lock:
            if self._pid != os.getpid():
                if self._pid:               # forked: the thread and pipe belong to the parent
                    self._start_state()
                self._pid = os.getpid()
                self._thread = None
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=f"stem-listen-{self.channel}", daemon=True)
                self._thread.start()
        return self._listening.wait(max(timeout, 0.0))

    def _run(self) -> None:
        backoff = 0.05
        failing = False
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._pg.connect(prepare=False)
                # notifications psycopg reads itself (during execute) reach us through the handler
                conn.add_notify_handler(lambda n: self._on_notify(n.payload))
                conn.execute(f'LISTEN "{self.channel}"')
                self._listening.set()
                if failing:
                    log.warning("stem: listener on %s reconnected", self.channel)
                failing = False
                self._on_reset()
                backoff = 0.05
                self._pump(conn)
            except Exception as e:     # noqa: BLE001 - the listener must outlive any error
                if not self._stop.is_set():
                    (log.debug if failing else log.warning)(
                        "stem: listener on %s lost its connection (%s); reconnecting", self.channel,
                        str(e).strip())
                    failing = True
            finally:
                self._listening.clear()
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:      # noqa: BLE001
                        pass
            if not self._stop.is_set():
                self._on_reset()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)

    def _pump(self, conn: Any) -> None:
        pgconn = conn.pgconn
        fd = pgconn.socket
        while not self._stop.is_set():
            readable, _, _ = select.select([fd, self._wake_r], [], [], 30.0)
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
                continue
            if fd in readable:
                pgconn.consume_input()
                if pgconn.status != 0:
                    raise self._pg.psycopg.OperationalError("connection lost")
                while (n := pgconn.notifies()) is not None:
                    self._on_notify(n.extra.decode())
            else:
                conn.execute("SELECT 1")    # idle for 30 s: prove the connection is alive

    def stop(self) -> None:
        self._stop.set()
        if self._pid == os.getpid():
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(5.0)
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
