"""Every error class a store's driver defines leaves a broker or a backend as the right ``StemError``.

Each case raises one class where the driver talks to its server (redis-py's
``send_packed_command``, sqlite3's ``execute``, psycopg's ``execute``) inside one
call of a broker and one of a backend.  What comes out is the adapter's error
(``BrokerError``/``BackendError``), or its connection error once the store gave up
retrying a lost connection, with the driver's error as its cause; never the
driver's own class.  The classes are found by walking the driver's modules, so a
class a new driver version adds is checked too.
"""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest
import redis
import redis.exceptions

from stem.brokers.base import Message
from stem.errors import BackendConnectionError, BackendError, BrokerConnectionError, BrokerError
from stem.results import TaskState, TaskStatus

Q = "errors"
ERRORS = {"broker": (BrokerError, BrokerConnectionError), "backend": (BackendError, BackendConnectionError)}


def error_classes(*namespaces) -> list[type[Exception]]:
    """Every ``Exception`` subclass the given modules or classes hold, by name."""
    found = {v for ns in namespaces for v in vars(ns).values()
             if isinstance(v, type) and issubclass(v, Exception)}
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


def instance(cls: type[Exception]) -> Exception:
    try:
        return cls("boom")
    except (TypeError, ValueError):   # redis-py's MOVED/ASK errors parse "slot host:port"
        return cls("3999 127.0.0.1:6381")


def expected(side: str, connection_type: bool) -> type[Exception]:
    error, connection_error = ERRORS[side]
    return connection_error if connection_type else error


def check(raised: pytest.ExceptionInfo, side: str, cls: type[Exception], connection_type: bool) -> None:
    assert type(raised.value) is expected(side, connection_type), (cls, raised.value)
    assert isinstance(raised.value.__cause__, cls), raised.value.__cause__


def a_status() -> TaskStatus:
    return TaskStatus(id=uuid.uuid4().hex, state=TaskState.SUCCEEDED, result=1)


# -- Redis ------------------------------------------------------------------------------------
REDIS_CLASSES = error_classes(redis.exceptions)
REDIS_CALLS = {   # each side: a call through the lean pipeline, a call through redis-py's client
    "broker": {"publish": lambda b: b.publish(Message(uuid.uuid4().hex, Q, b"x")), "queues": lambda b: b.queues()},
    "backend": {"store": lambda b: b.store(a_status()), "get": lambda b: b.get("some-id")},
}


@pytest.fixture
def redis_adapters(redis_url, namespace):
    from stem.backends.redis import RedisResultBackend
    from stem.brokers.redis import RedisBroker
    adapters = {"broker": RedisBroker(redis_url, namespace=namespace, retry_attempts=2),
                "backend": RedisResultBackend(redis_url, namespace=namespace, retry_attempts=2)}
    yield adapters
    for a in adapters.values():
        a.close()


def test_the_walk_finds_redis_py_errors_outside_redis_error_too():
    assert redis.exceptions.ChildDeadlockedError in REDIS_CLASSES and len(REDIS_CLASSES) > 30


@pytest.mark.redis
@pytest.mark.parametrize("side, call", [(s, c) for s, calls in REDIS_CALLS.items() for c in calls])
@pytest.mark.parametrize("cls", REDIS_CLASSES, ids=lambda c: c.__name__)
def test_every_redis_error_leaves_a_store_call_as_a_stem_error(redis_adapters, monkeypatch, cls, side, call):
    adapter = redis_adapters[side]
    adapter.ping()                      # connected (handshake done) before the driver fails
    sends = []

    def failing(conn, *args, **kwargs):
        sends.append(1)
        raise instance(cls)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", failing)
    connection_type = issubclass(cls, (redis.ConnectionError, redis.TimeoutError))
    with pytest.raises(Exception) as raised:
        REDIS_CALLS[side][call](adapter)
    check(raised, side, cls, connection_type)
    assert len(sends) >= (2 if connection_type else 1)   # retried (retry_attempts=2) when unreachable


# -- SQLite -----------------------------------------------------------------------------------
SQLITE_CLASSES = error_classes(sqlite3)
SQLITE_CALLS = {   # each side: a write transaction, a read
    "broker": {"publish": lambda b: b.publish(Message(uuid.uuid4().hex, Q, b"x")), "stats": lambda b: b.stats(Q)},
    "backend": {"store": lambda b: b.store(a_status()), "get": lambda b: b.get("some-id")},
}


class _Failing:
    """A sqlite3 connection whose ``execute``/``executemany`` raise ``error`` once armed."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self.error: Exception | None = None
        self.calls = 0

    def _run(self, method, *args):
        if self.error is not None:
            self.calls += 1
            raise self.error
        return method(*args)

    def execute(self, *args):
        return self._run(self._conn.execute, *args)

    def executemany(self, *args):
        return self._run(self._conn.executemany, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


@pytest.fixture
def sqlite_adapters(tmp_path, monkeypatch):
    from stem.backends.sqlite import SqliteResultBackend
    from stem.brokers.sqlite import SqliteBroker
    opened: list[_Failing] = []
    connect = sqlite3.connect

    def failing_connect(*args, **kwargs):
        opened.append(_Failing(connect(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", failing_connect)
    path = str(tmp_path / "errors.db")
    adapters = {"broker": SqliteBroker(path, busy_timeout=0.1), "backend": SqliteResultBackend(path, busy_timeout=0.1)}
    for a in adapters.values():
        a.ping()                        # this thread's connection, and the schema

    def arm(error: Exception) -> None:
        for conn in opened:
            conn.error = error

    yield adapters, arm
    arm(None)
    for a in adapters.values():
        a.close()


def test_the_walk_finds_sqlite3_warning_beside_its_errors():
    assert {sqlite3.Warning, sqlite3.Error, sqlite3.OperationalError} <= set(SQLITE_CLASSES)


@pytest.mark.parametrize("side, call", [(s, c) for s, calls in SQLITE_CALLS.items() for c in calls])
@pytest.mark.parametrize("cls", SQLITE_CLASSES, ids=lambda c: c.__name__)
def test_every_sqlite3_error_leaves_a_store_call_as_a_stem_error(sqlite_adapters, cls, side, call):
    adapters, arm = sqlite_adapters
    arm(instance(cls))
    with pytest.raises(Exception) as raised:
        SQLITE_CALLS[side][call](adapters[side])
    check(raised, side, cls, connection_type=False)


@pytest.mark.parametrize("message", ["database is locked", "database table is locked", "database is busy",
                                     "unable to open database file", "disk I/O error",
                                     "attempt to write a readonly database"])
@pytest.mark.parametrize("side, call", [(s, c) for s, calls in SQLITE_CALLS.items() for c in calls])
def test_a_sqlite_file_that_cannot_be_reached_is_a_connection_error(sqlite_adapters, side, call, message):
    """SQLite's own busy timeout is the bounded retry: what is still locked after it (or cannot be
    opened or written at all) is the connection error."""
    adapters, arm = sqlite_adapters
    arm(sqlite3.OperationalError(message))
    with pytest.raises(Exception) as raised:
        SQLITE_CALLS[side][call](adapters[side])
    check(raised, side, sqlite3.OperationalError, connection_type=True)


# -- Postgres ---------------------------------------------------------------------------------
PG_CALLS = {   # each side: a call on a durable session, one on a fast session
    "broker": {"ping": lambda b: b.ping(), "stats": lambda b: b.stats(Q)},
    "backend": {"store": lambda b: b.store(a_status()), "get": lambda b: b.get("some-id")},
}


def _pg_classes() -> list[type[Exception]]:
    try:
        import psycopg
        import psycopg.errors
    except ImportError:
        return []
    return error_classes(psycopg.errors)


PG_CLASSES = _pg_classes()
PG_BASES = [c for c in PG_CLASSES if not getattr(c, "sqlstate", None)]   # Error, OperationalError, ...


def _pg_connection_type(cls: type[Exception]) -> bool:
    import psycopg
    return issubclass(cls, (psycopg.OperationalError, psycopg.InterfaceError))


@pytest.fixture(scope="module")
def pg_schema():
    """One schema for the module's Postgres error tests, made (migrated) by the first of them:
    each test's adapters only connect to it (a migration per test cost ~0.15 s, 120 times)."""
    from .conftest import POSTGRES_URL
    psycopg = pytest.importorskip("psycopg")
    schema = "stemtest_errors_" + uuid.uuid4().hex[:12]
    yield schema
    try:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    except psycopg.OperationalError:    # no server: the tests skipped (or failed) before making it
        pass


@pytest.fixture
def pg_adapters(postgres_url, pg_schema, monkeypatch):
    psycopg = pytest.importorskip("psycopg")
    from stem.backends.postgres import PostgresResultBackend
    from stem.brokers.postgres import PostgresBroker
    made = []

    def make(reconnect_timeout: float):
        adapters = {"broker": PostgresBroker(postgres_url, schema=pg_schema, reconnect_timeout=reconnect_timeout),
                    "backend": PostgresResultBackend(postgres_url, schema=pg_schema,
                                                     reconnect_timeout=reconnect_timeout)}
        made.extend(adapters.values())
        for side, calls in PG_CALLS.items():   # every session connected, the schema made
            for call in calls.values():
                call(adapters[side])
        return adapters

    calls: list[int] = []
    real = psycopg.Connection.execute

    def arm(error: Exception | None) -> None:
        def execute(conn, *args, **kwargs):
            calls.append(1)
            raise error
        monkeypatch.setattr(psycopg.Connection, "execute", real if error is None else execute)

    yield make, arm, calls
    arm(None)
    for a in made:
        a.close()


def test_the_walk_finds_psycopgs_base_classes_and_its_sqlstate_classes():
    if not PG_CLASSES:
        pytest.skip("psycopg is not installed")
    import psycopg
    names = {c.__name__ for c in PG_BASES}
    assert {"Error", "Warning", "InterfaceError", "DatabaseError", "DataError", "OperationalError",
            "IntegrityError", "InternalError", "ProgrammingError", "NotSupportedError"} <= names
    assert psycopg.errors.UniqueViolation in PG_CLASSES and len(PG_CLASSES) > 200


@pytest.mark.postgres
@pytest.mark.parametrize("side, call", [(s, c) for s, calls in PG_CALLS.items() for c in calls])
@pytest.mark.parametrize("cls", PG_BASES, ids=lambda c: c.__name__)
def test_every_psycopg_base_error_leaves_a_store_call_as_a_stem_error(pg_adapters, cls, side, call):
    make, arm, calls = pg_adapters
    adapters = make(reconnect_timeout=0.3)
    arm(instance(cls))
    connection_type = _pg_connection_type(cls)
    t0 = time.monotonic()
    with pytest.raises(Exception) as raised:
        PG_CALLS[side][call](adapters[side])
    check(raised, side, cls, connection_type)
    if connection_type:   # retried, reconnecting, for about reconnect_timeout
        assert len(calls) >= 2 and time.monotonic() - t0 < 5
        assert "gave up after 0.3s" in str(raised.value)
    else:
        assert len(calls) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("side", sorted(PG_CALLS))
def test_every_psycopg_sqlstate_error_leaves_a_store_call_as_a_stem_error(pg_adapters, side):
    """All of psycopg.errors (hundreds of SQLSTATE classes) in one loop: no retries
    (reconnect_timeout=0), so only the kind of error that comes out is checked."""
    make, arm, _ = pg_adapters
    adapters = make(reconnect_timeout=0)
    wrong = []
    for cls in PG_CLASSES:
        for call in PG_CALLS[side].values():
            arm(instance(cls))
            try:
                call(adapters[side])
            except Exception as e:      # noqa: BLE001 - what comes out is the point
                if type(e) is not expected(side, _pg_connection_type(cls)) or not isinstance(e.__cause__, cls):
                    wrong.append((cls.__name__, type(e).__name__))
            else:
                wrong.append((cls.__name__, "nothing raised"))
    arm(None)
    assert wrong == []
