"""Shared fixtures: both builds of the hot path, and reachable services.

Builds (as multidict does): ``twin`` runs a test once on the compiled modules
(id ``c``) and once on their pure twins (id ``py``), side by side in one
process, whichever build stem itself selected; ``compiled_twin`` is the
compiled build alone, for what only it has and for cross-checks against the
twin.  When the compiled build does not load, its tests skip with a reason --
and fail under ``STEM_EXPECT_COMPILED=1`` (``make test`` sets it for the
compiled run), so a broken build never passes quietly.
``compiled_ring_in_use`` guards tests of what only the compiled ring the
worker selected can do (offers).

A test that needs Redis or PostgreSQL pings first and skips with a reason when
the server is absent, except under ``STEM_REQUIRE_SERVICES=1`` (CI), where a
missing service fails the test.
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
import socket
import uuid
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest

EXPECT_COMPILED = os.environ.get("STEM_EXPECT_COMPILED") == "1"
REQUIRE_SERVICES = os.environ.get("STEM_REQUIRE_SERVICES") == "1"

# `make test` runs the two builds as background jobs, which a shell starts with SIGINT and
# SIGQUIT ignored; every program a test starts would inherit that (a Python one would then
# never raise KeyboardInterrupt).  A handler here is reset to the default by exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
REDIS_URL = os.environ.get("STEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("STEM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# The Redis db the CLI and example tests own (they run in stem's default namespace); two test
# runs at once on one server (two checkouts) each need their own.
# Under pytest-xdist each worker (gw0, gw1, ...) is such a run too: worker N takes the db 2N
# above the run's (make test: the compiled build 9 and 11, the pure twin 8 and 10).
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
REDIS_OWN_DB = int(os.environ.get("STEM_TEST_REDIS_OWN_DB", "9")) + (
    2 * int(_XDIST_WORKER[2:]) if _XDIST_WORKER.startswith("gw") else 0)


@dataclass(frozen=True)
class Twin:
    """One build of the hot path, a module per name in ``_native.MODULES``."""

    id: str   # "c" or "py"
    codec: ModuleType
    signer: ModuleType
    ring: ModuleType
    resp: ModuleType


def load_twin(twin_id: str, *, expect_compiled: bool = EXPECT_COMPILED,
              import_compiled: Callable[[str], ModuleType] | None = None) -> Twin:
    """The build ``twin_id`` ("c" or "py"); "c" skips the test when it does not load, or
    fails it when ``expect_compiled``.  ``import_compiled`` stands in for
    ``_native.compiled`` (the tests of this function)."""
    from stem import _native
    import_compiled = import_compiled or _native.compiled
    if twin_id == "py":
        return Twin("py", **{name: _native.pure(name) for name in _native.MODULES})
    if twin_id != "c":
        raise ValueError(f"twin id is 'c' or 'py', got {twin_id!r}")
    try:
        modules = {name: import_compiled(name) for name in _native.MODULES}
    except ImportError as exc:
        if expect_compiled:
            pytest.fail(f"STEM_EXPECT_COMPILED=1 but the compiled build does not load ({exc}); "
                        "run `make build`", pytrace=False)
        pytest.skip(f"the compiled build does not load ({exc}); only the pure twin is tested "
                    "(make build)")
    return Twin("c", **modules)


@pytest.fixture(scope="module", params=["c", "py"])
def twin(request) -> Twin:
    """Each build of the hot path in turn: compiled (``c``), then pure (``py``)."""
    return load_twin(request.param)


def pytest_collection_modifyitems(items):
    """Mark ``build_independent`` the tests that load both builds themselves (``twin``,
    ``compiled_twin``): they test the same modules whatever ``STEM_PURE`` selects, so
    ``make test`` runs them in its compiled run only (``-m 'not build_independent'`` in the
    pure one)."""
    for item in items:
        if {"twin", "compiled_twin"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.build_independent)


@pytest.fixture(scope="module")
def compiled_twin() -> Twin:
    """The compiled build alone (the pure one is ``_native.pure(name)``, always there)."""
    return load_twin("c")


def require_compiled_in_use(name: str, *, expect_compiled: bool = EXPECT_COMPILED) -> None:
    """Skip unless stem itself runs the compiled ``name`` (``_native.implementation``); fail
    instead when the compiled build was expected and did not load."""
    from stem import _native
    if _native.implementation(name) == _native.COMPILED:
        return
    if _native.FORCED_PURE:
        pytest.skip(f"STEM_PURE=1: stem runs the pure {name} twin, which cannot do this")
    if expect_compiled:
        pytest.fail(f"STEM_EXPECT_COMPILED=1 but stem runs the pure {name} twin; run `make build`",
                    pytrace=False)
    pytest.skip(f"the compiled {name} does not load; stem runs the pure twin (make build)")


@pytest.fixture
def compiled_ring_in_use() -> None:
    """For what only the compiled ring can do (offers: an atomic compare-and-swap)."""
    require_compiled_in_use("ring")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _port_open(host, port):
        return
    msg = f"{name} is not reachable at {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(msg + " and STEM_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(msg)


@pytest.fixture
def redis_url() -> str:
    from urllib.parse import urlsplit
    u = urlsplit(REDIS_URL)
    require_service("Redis", u.hostname or "127.0.0.1", u.port or 6379)
    return REDIS_URL


def require_redis_server(*programs: str) -> None:
    """Skip (fail under ``STEM_REQUIRE_SERVICES=1``) when there is no redis-server to start
    (or another of ``programs``, e.g. redis-cli for a cluster)."""
    import shutil
    for program in ("redis-server", *programs):
        if shutil.which(program) is None:
            if REQUIRE_SERVICES:
                pytest.fail(f"{program} is not on PATH and STEM_REQUIRE_SERVICES=1", pytrace=False)
            pytest.skip(f"{program} is not on PATH")


@pytest.fixture(scope="session")
def private_redis_url(tmp_path_factory) -> Iterator[str]:
    """A redis-server of this test run alone, for tests that change the whole server (SCRIPT
    FLUSH empties every client's script cache, the other build's run included)."""
    from .support import RedisServer
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("private-redis")).start()
    yield server.url
    server.kill()


@pytest.fixture(scope="session")
def sentinel_setup(tmp_path_factory):
    """A master, a replica and a sentinel of this test run alone (tests/support.py), shared by
    the tests that only read and write through it; a test that fails over starts its own."""
    from .support import SentinelSetup
    require_redis_server()
    setup = SentinelSetup(tmp_path_factory.mktemp("sentinel")).start()
    yield setup
    setup.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A Redis Cluster of three primaries of this test run alone (tests/support.py
    ``ClusterSetup``), shared by the tests that only read and write on it."""
    from .support import ClusterSetup
    require_redis_server("redis-cli")
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster"), masters=3, replicas=0).start()
    yield setup
    setup.stop()


@pytest.fixture(scope="session")
def warm_redis_cluster(redis_cluster):
    """``redis_cluster``, with stem's client of its URL held open for the session: stem pools
    one client per URL in a process and closes it with its last user, so a test's brokers and
    backends would otherwise each start one (a connection and ``CLUSTER SLOTS``) and close it
    again.  For the tests that make many short-lived adapters (the contract suite)."""
    from stem.stores.redis import RedisStore
    keeper = RedisStore(redis_cluster.url())
    yield redis_cluster
    keeper.close()


@pytest.fixture(scope="session")
def raw_clients():
    """``raw_client(url)`` made once per URL for the session (a ``RedisCluster`` reads its slot
    map when made): for cleanups and fault hooks that run after every test."""
    from .support import raw_client
    clients: dict[str, Any] = {}

    def get(url: str) -> Any:
        client = clients.get(url)
        if client is None:
            client = clients[url] = raw_client(url)
        return client

    yield get
    for client in clients.values():
        client.close()


@pytest.fixture
def own_cluster(tmp_path):
    """Three primaries with a replica each, of this test alone: for a test that fails over."""
    from .support import ClusterSetup
    require_redis_server("redis-cli")
    setup = ClusterSetup(tmp_path / "cluster", masters=3, replicas=1).start()
    yield setup
    setup.stop()


@pytest.fixture
def own_sentinel(tmp_path):
    """A master, a replica and a sentinel of this test alone: for a test that fails over."""
    from .support import SentinelSetup
    require_redis_server()
    setup = SentinelSetup(tmp_path / "sentinel").start()
    yield setup
    setup.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test alone (tests/support.py ``RedisServer``), to kill and restart."""
    from .support import RedisServer
    require_redis_server()
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


def _namespace_client(url: str, namespace: str) -> Iterator[Any]:
    import redis

    from .support import drop_namespace
    client = redis.Redis.from_url(url)
    yield client
    drop_namespace(client, namespace)
    client.close()


@pytest.fixture
def raw(redis_url, namespace):
    """A plain redis-py client on the test server; the test's namespace is dropped afterwards."""
    yield from _namespace_client(redis_url, namespace)


@pytest.fixture
def private_raw(private_redis_url, namespace):
    """``raw`` on a server of this run alone: for the tests that flush its script cache."""
    yield from _namespace_client(private_redis_url, namespace)


@pytest.fixture
def redis_own_db_url(redis_url):
    """Redis db 9 (``STEM_TEST_REDIS_OWN_DB``) of the test server, emptied before and after:
    for what runs in stem's default namespace (the CLI, the examples), which a test cannot
    rename.  Tests run one at a time, so one db serves them all."""
    import redis
    url = redis_url.rsplit("/", 1)[0] + f"/{REDIS_OWN_DB}"
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    yield url
    with redis.Redis.from_url(url) as r:
        r.flushdb()


@pytest.fixture
def postgres_url() -> str:
    from urllib.parse import urlsplit
    u = urlsplit(POSTGRES_URL)
    require_service("PostgreSQL", u.hostname or "127.0.0.1", u.port or 5432)
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_url(request, tmp_path):
    """A SQLite file's URL, or a Postgres schema's of the test's own (``?schema=``, dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sql.db'}"
        return
    import psycopg
    url, schema = request.getfixturevalue("postgres_url"), request.getfixturevalue("namespace")
    yield f"{url}?schema={schema}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def namespace(request):
    """A key/schema namespace no other test uses; on Redis, its keys go when the test ends
    (queues, lanes, control streams and revocations have no expiry)."""
    ns = "stemtest_" + uuid.uuid4().hex[:12]
    yield ns
    if "redis_url" in request.fixturenames:
        import redis
        from .support import drop_namespace
        try:
            with redis.Redis.from_url(REDIS_URL) as r:
                drop_namespace(r, ns)
        except redis.ConnectionError:   # the test skipped (no Redis) before it wrote anything
            pass


# A stock PostgreSQL takes 100 connections.  make test runs up to four test processes at once
# (two builds, TEST_WORKERS each), and a few tests open dozens of connections on their own (several
# worker processes with their children, racing producers); two of those at once, or four, would
# use the server up ("too many clients").  Such a test is marked ``pg_heavy``; on PostgreSQL it
# runs alone among the test processes of this machine: it takes an exclusive lock on one file
# before its setup (and before pytest-timeout's clock starts, so waiting for the lock is not
# counted against its timeout).  Every other test stays under ~12 connections.
PG_HEAVY_LOCK = os.path.join(tempfile.gettempdir(), "stem-tests-postgres-heavy.lock")


def _uses_postgres(item) -> bool:
    return ("postgres" in item.nodeid.lower()
            or bool({"postgres_url", "pg_url"} & set(getattr(item, "fixturenames", ()))))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("pg_heavy") is None or not _uses_postgres(item):
        yield
        return
    with open(PG_HEAVY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """Every channel segment this test process created is gone when the session ends."""
    prefix = f"stmr_{os.getpid():x}_"
    yield
    import gc
    gc.collect()
    try:
        left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except FileNotFoundError:  # no /dev/shm on this platform
        return
    assert not left, f"shared-memory segments leaked: {left}"
