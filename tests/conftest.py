"""Shared fixtures: which build is loaded, and reachable services.

A test that needs Redis or PostgreSQL pings first and skips with a reason when
the server is absent, except under ``STEM_REQUIRE_SERVICES=1`` (CI), where a
missing service fails the test.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

REQUIRE_SERVICES = os.environ.get("STEM_REQUIRE_SERVICES") == "1"
REDIS_URL = os.environ.get("STEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("STEM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# The Redis db the CLI and example tests own (they run in stem's default namespace); two test
# runs at once on one server (two checkouts) each need their own.
REDIS_OWN_DB = int(os.environ.get("STEM_TEST_REDIS_OWN_DB", "9"))


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
