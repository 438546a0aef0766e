"""Redis for the asyncio producer: one dedicated ``redis.asyncio`` connection, pipelined, retried as the sync store is.

``AsyncRedisStore`` is the asyncio side of ``stem.stores.redis.RedisStore``:

* One command connection, owned by the store (no pool checkout per call).
  Every round trip holds it alone (an ``asyncio.Lock``): the pipeline is
  packed by the same C packer as the sync hot path (``pack_commands``),
  written in one write, and its replies read in order.  Callers that want
  throughput batch their commands (``stem.aio`` coalesces concurrent
  enqueues into one pipeline), rather than opening connections.
* ``call`` retries connection failures and timeouts exactly as
  ``RedisStore.call`` does (``retry_attempts`` in all, capped jittered
  backoff, then the user's connection error); any other redis-py error
  becomes ``BrokerError`` / ``BackendError`` at once.  A connection that
  failed mid-round-trip is dropped, never reused with replies in flight, and
  the next round trip connects again.
* ``run`` loads the scripts and sends again on NOSCRIPT (a restarted Redis),
  as ``RedisStore.run`` does.
* Behind Sentinel (``redis+sentinel://``), connections come from
  ``redis.asyncio.sentinel``: each asks the sentinels for the master's address
  as it connects, so the connection made after a failover reaches the
  promoted replica; a ``READONLY`` reply (a former master) drops the
  connection and is retried like a lost one, as ``RedisStore.call`` does.
* ``connect_new`` opens one more connection for a caller that keeps it (the
  pub/sub listener of ``stem.backends.redis_async``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import redis
import redis.asyncio

from .. import _checks as checks
from ..errors import ConfigurationError
from ..redact import mask_url
from .base import BROKER_ERRORS, Backoff, StoreErrors
try:
    from hiredis import Reader as _Reader
except ImportError:  # pragma: no cover - redis[hiredis] is a core dependency
    _Reader = None
try:   # the hiredis parser's "need more bytes" marker (redis-py >= 5)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _MORE
except ImportError:  # pragma: no cover - older or newer redis-py: one read_response per reply
    _MORE, _Reader = None, None

from .redis import REDIS_ERRORS, NoScriptError, pack_commands, raise_first_error
from .redis_sentinel import async_sentinel_pool, close_async_sentinel_pool, is_sentinel_url, is_stale_master
from .redis_urls import check_plain_options

__all__ = ["AsyncRedisStore", "HIREDIS_READER", "HIREDIS_MORE"]

log = logging.getLogger("stem.stores.redis")
T = TypeVar("T")
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)


async def _read_replies(conn: Any, n: int) -> list:
    """``n`` replies, error replies in place.  With redis-py's hiredis parser they are pulled
    straight from its hiredis reader, one socket read feeding many replies (redis-py's
    ``read_response`` costs a timeout context and several frames per reply, more than the
    rest of an enqueue); with any other parser, one ``read_response`` each."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    more = getattr(parser, "read_from_socket", None)
    out: list = []
    if _Reader is not None and type(reader) is _Reader and more is not None:
        gets = reader.gets
        while len(out) < n:
            reply = gets()
            if reply is _MORE or reply is False:
                await more()
                continue
            if isinstance(reply, redis.ConnectionError):
                raise reply
            out.append(reply)
        return out
    for _ in range(n):
        try:
            out.append(await conn.read_response(disconnect_on_error=True))
        except redis.ResponseError as exc:
            out.append(exc)
    return out


#: hiredis's reader class and redis-py's "need more bytes" marker (None without them), for the
#: pub/sub listener that reads replies the same way.
HIREDIS_READER, HIREDIS_MORE = _Reader, _MORE


class AsyncRedisStore:
    """One dedicated asyncio connection to one Redis server, its scripts, retries and errors."""

    def __init__(self, url: str, *, socket_timeout: float = 5.0, socket_connect_timeout: float = 2.0,
                 retry_attempts: int = 4, errors: StoreErrors = BROKER_ERRORS):
        if not isinstance(url, str):
            raise ConfigurationError(f"a Redis URL is a string (redis://host:port/db), got {url!r}")
        self.url = url
        self.label = mask_url(url)
        self.retry_attempts = checks.integer("retry_attempts", retry_attempts)
        self.errors = errors
        self._sentinel = is_sentinel_url(url)
        pool: Any
        if self._sentinel:
            # connections of this pool's class ask the sentinels for the master's address as
            # they connect; the pool stays referenced (they hold only a weak proxy to it)
            pool = async_sentinel_pool(
                url, socket_timeout=checks.seconds("socket_timeout", socket_timeout),
                socket_connect_timeout=checks.seconds("socket_connect_timeout", socket_connect_timeout))
        else:
            check_plain_options(url)
            try:
                # only for its parsed connection arguments: connections are made and owned here
                pool = redis.asyncio.ConnectionPool.from_url(
                    url, socket_timeout=checks.seconds("socket_timeout", socket_timeout),
                    socket_connect_timeout=checks.seconds("socket_connect_timeout", socket_connect_timeout),
                    socket_keepalive=True)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(f"bad Redis URL {mask_url(url)!r}: {exc}") from exc
        self._pool = pool
        self._socket_timeout = float(socket_timeout)
        self._connection_class = pool.connection_class
        self._connection_kwargs = dict(pool.connection_kwargs)
        self._conn: Any = None
        self._lock: asyncio.Lock | None = None
        self._scripts: dict[str, str] = {}     # sha -> source
        self._closed = False
        #: Round trips made on the command connection (what the coalescing tests and benchmark count).
        self.round_trips = 0

    def script(self, source: str) -> str:
        """Register a Lua script; returns its sha (EVALSHA)."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        self._scripts[sha] = source
        return sha

    def new_connection(self) -> Any:
        """A fresh, unconnected connection to this server (its caller connects and owns it)."""
        return self._connection_class(**self._connection_kwargs)

    async def _connection(self) -> Any:
        if self._closed:
            raise self.errors.error(f"the Redis client ({self.label}) is closed")
        if self._conn is None:
            conn = self.new_connection()
            await conn.connect()
            self._conn = conn
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.disconnect()
            except Exception:  # noqa: BLE001 - a broken socket may fail to close; it is gone either way
                pass

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list:
        """One round trip: ``commands`` as one pipeline; error replies come back in place.
        Raw redis-py errors: run it inside ``call``."""
        if not commands:
            return []
        return await self.execute_packed(pack_commands(list(commands)), len(commands))

    async def execute_packed(self, packed: bytes, n: int) -> list:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = await self._connection()
            try:
                self.round_trips += 1
                await conn.send_packed_command([packed], check_health=False)
                async with asyncio.timeout(self._socket_timeout):
                    return await _read_replies(conn, n)
            except BaseException:
                # never reuse a connection with replies still in flight (a timeout, a
                # cancelled caller): the next round trip connects afresh
                await asyncio.shield(self._drop())
                raise

    async def run(self, commands: Sequence[Sequence[Any]], packed: tuple[bytes, int] = (b"", 0)) -> list:
        """``execute``, then, on NOSCRIPT, load the scripts and send again only the script
        calls that did not run (up to three times; the XADDs beside them ran once), then
        raise the first error reply.  ``packed`` (commands already packed, how many: plain
        XADDs, no script call) goes first in the same round trip; its replies are checked
        for errors and dropped: the replies returned are ``commands``'."""
        head, n_head = packed
        if n_head:
            replies = await self.execute_packed(head + pack_commands(list(commands)) if commands else head,
                                                n_head + len(commands))
            raise_first_error(replies[:n_head])
            replies = replies[n_head:]
        else:
            replies = list(await self.execute(commands))
        for _ in range(3):
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if not missing:
                break
            await self.execute([("SCRIPT", "LOAD", source) for source in self._scripts.values()])
            again = await self.execute([commands[i] for i in missing])
            for i, reply in zip(missing, again):
                replies[i] = reply
        raise_first_error(replies)
        return replies

    async def call(self, fn: Callable[[], Awaitable[T]], what: str, attempts: int | None = None,
                   errors: StoreErrors | None = None) -> T:
        """``RedisStore.call`` for coroutines: retry connection failures and timeouts
        (``attempts`` in all, default ``retry_attempts``) with capped, jittered backoff, then
        raise the connection error; any other redis-py error becomes the user's error."""
        attempts = self.retry_attempts if attempts is None else attempts
        errors = errors or self.errors
        backoff = None
        for attempt in range(1, attempts + 1):
            try:
                return await fn()
            except _UNREACHABLE as exc:
                await self._drop()
                log.debug("Redis %s failed (%s); attempt %d of %d", what, exc, attempt, attempts)
                if attempt == attempts:
                    raise errors.connection_error(
                        f"Redis unreachable during {what} after {attempts} attempt{'s' if attempts > 1 else ''} "
                        f"({self.label}): {exc}") from exc
                backoff = backoff or Backoff()
                await asyncio.sleep(backoff.next())
            except REDIS_ERRORS as exc:
                if not (self._sentinel and is_stale_master(exc)):
                    raise errors.error(f"Redis error during {what} ({self.label}): {exc}") from exc
                # the connection still reaches a former master: the next one asks the sentinels
                await self._drop()
                log.debug("Redis %s reached a former master (%s); attempt %d of %d", what, exc, attempt, attempts)
                if attempt == attempts:
                    raise errors.connection_error(
                        f"Redis master not reachable during {what} after {attempts} attempts "
                        f"({self.label}): {exc}") from exc
                backoff = backoff or Backoff()
                await asyncio.sleep(backoff.next())
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        await self._drop()
        if self._sentinel:
            await close_async_sentinel_pool(self._pool)
