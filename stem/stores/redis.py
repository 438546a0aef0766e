"""Redis as stem's brokers and backends use it: one pool per URL, bounded retries, Lua scripts, errors translated.

Connections: one ``redis.ConnectionPool`` per (URL, timeouts) in a process,
shared by every ``RedisStore`` made for it (brokers and result backends) and
disconnected when the last one closes; one of its connections stays checked out
for the round trips that find it free (``stem.stores.redis_dedicated``).  redis-py resets a pool in a forked
child (it checks the pid), so a child never reuses its parent's sockets; the
registry's lock is made anew in a child (``stem.stores.local``).

Calls: ``RedisStore.call`` runs one call under the socket timeouts and
retries connection failures and timeouts with capped, jittered backoff
(``retry_attempts`` in all), then raises the user's connection error
(``BrokerConnectionError`` or ``BackendConnectionError``); any other error of
redis-py becomes ``BrokerError`` / ``BackendError`` at once.  Callers never
see a redis-py exception.

Scripts: ``RedisStore.script`` registers a Lua script (EVALSHA by its sha);
``run`` sends a pipeline and, when Redis answers NOSCRIPT (a restart or
``SCRIPT FLUSH`` emptied its script cache), loads this store's scripts and
sends the pipeline once more.  The hot paths pipeline through
``stem.stores.redis_pipe`` (re-exported here).

URLs: ``redis://``, ``rediss://``, ``unix://`` (their query options checked first:
``stem.stores.redis_urls``); ``redis+sentinel://`` (the pool asks the
sentinels for the master: ``stem.stores.redis_sentinel``); ``redis+cluster://`` (the
client is a ``StemCluster``, whose pipelines ``redis_pipe`` splits by slot:
``stem.stores.redis_cluster``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

try:
    import redis
    import redis.exceptions
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - redis is a core dependency
    raise ImportError("stem's Redis broker and backend need redis-py: pip install 'redis[hiredis]'") from exc

from .. import _checks as checks
from ..errors import ConfigurationError
from ..redact import mask_url
from .base import BROKER_ERRORS, Backoff, Store, StoreErrors
from .local import after_fork_in_child
from .redis_cluster import BARRIER, cluster_client, is_cluster_transient, is_cluster_url
from .redis_dedicated import dedicate, undedicate
from .redis_group import forget as forget_group
from .redis_sentinel import is_sentinel_url, is_stale_master, sentinel_pool
from .redis_urls import check_plain_options
from .redis_pipe import execute, execute_last, execute_one, execute_packed, execute_tail, execute_unread, \
    execute_watched, pack_commands, pack_xadds, raise_first_error

__all__ = ["BARRIER", "RedisStore", "validate_namespace", "REDIS_ERRORS", "ReplyError", "NoScriptError", "execute",
           "execute_last", "execute_one", "execute_packed", "execute_tail", "execute_unread", "execute_watched",
           "pack_commands", "pack_xadds", "raise_first_error"]

log = logging.getLogger("stem.stores.redis")
T = TypeVar("T")

#: An error reply in place among a pipeline's replies, and the one a missing script gets.
ReplyError = redis.ResponseError
NoScriptError = redis.exceptions.NoScriptError

#: Every error class redis-py defines: most derive from ``RedisError``, a few (the pool's
#: ``ChildDeadlockedError``, the cluster client's) straight from ``Exception``.
REDIS_ERRORS: tuple[type[Exception], ...] = tuple(
    {redis.RedisError, *(v for v in vars(redis.exceptions).values()
                         if isinstance(v, type) and issubclass(v, Exception) and not issubclass(v, redis.RedisError))})
#: What is retried, then raised as the connection error.
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


def validate_namespace(namespace: str) -> str:
    """A key prefix: 1-64 characters from A-Z a-z 0-9 _ . : - (no braces: they are hash tags)."""
    if not isinstance(namespace, str) or not checks.QUEUE_NAME.fullmatch(namespace) or len(namespace) > 64:
        raise ConfigurationError(
            f"bad Redis namespace {namespace!r}: use 1-64 characters from A-Z a-z 0-9 _ . : -")
    return namespace


# -- one pool per URL and timeouts -------------------------------------------------------

_pools_lock = threading.Lock()
_pools: dict[tuple[str, float, float], list] = {}   # key -> [client, users]
_client_scripts: dict[int, dict[str, str]] = {}   # id(client) -> sha -> source, of every store on it


def _new_pools_lock() -> None:
    global _pools_lock
    _pools_lock = threading.Lock()


def _acquire(url: str, socket_timeout: float, connect_timeout: float) -> "redis.Redis":
    after_fork_in_child(_new_pools_lock)
    key = (url, socket_timeout, connect_timeout)
    with _pools_lock:
        entry = _pools.get(key)
        if entry is None:
            try:
                if is_cluster_url(url):
                    client = cluster_client(url, socket_timeout=socket_timeout,
                                            socket_connect_timeout=connect_timeout)
                    entry = _pools[key] = [client, 1]
                    return client
                if is_sentinel_url(url):
                    pool = sentinel_pool(url, socket_timeout=socket_timeout,
                                         socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 1))
                else:
                    check_plain_options(url)
                    pool = redis.ConnectionPool.from_url(
                        url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                        socket_keepalive=True, retry=Retry(NoBackoff(), 1))
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(f"bad Redis URL {mask_url(url)!r}: {exc}") from exc
            entry = _pools[key] = [redis.Redis(connection_pool=pool), 0]
            dedicate(pool)
        entry[1] += 1
        return entry[0]


def _release(client: "redis.Redis") -> None:
    with _pools_lock:
        for key, entry in list(_pools.items()):
            if entry[0] is client:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _pools[key]
                    _client_scripts.pop(id(client), None)
                    if is_cluster_url(key[0]):
                        client.close()
                    else:
                        undedicate(client.connection_pool)
                        forget_group(client.connection_pool)
                        client.connection_pool.disconnect()
                return


class RedisStore(Store):
    """One adapter's connections to one Redis server: the process-wide pool of its URL, its
    scripts, and its calls with retries and error translation."""

    def __init__(self, url: str, *, socket_timeout: float = 5.0, socket_connect_timeout: float = 2.0,
                 retry_attempts: int = 4, errors: StoreErrors = BROKER_ERRORS):
        if not isinstance(url, str):
            raise ConfigurationError(f"a Redis URL is a string (redis://host:port/db), got {url!r}")
        self.url = url
        self.socket_timeout = checks.seconds("socket_timeout", socket_timeout)
        self.socket_connect_timeout = checks.seconds("socket_connect_timeout", socket_connect_timeout)
        self.retry_attempts = checks.integer("retry_attempts", retry_attempts)
        self.errors = errors
        self.label = mask_url(url)
        #: The pooled redis-py client (shared with every store of this URL and timeouts); a
        #: ``StemCluster`` (a ``redis.cluster.RedisCluster``) for a ``redis+cluster://`` URL.
        try:
            self.client: redis.Redis = _acquire(url, self.socket_timeout, self.socket_connect_timeout)
        except _UNREACHABLE as exc:   # a cluster reads its slot map at once
            raise errors.connection_error(f"Redis unreachable ({self.label}): {exc}") from exc
        self._scripts: list[Any] = []
        self._closed = False
        #: Behind Sentinel a READONLY reply means a failover moved the master: retried.
        self._sentinel = is_sentinel_url(url)
        #: A Redis Cluster (``stem.stores.redis_cluster``): pipelines are split by slot, and
        #: the errors of slots changing hands (CLUSTERDOWN, TRYAGAIN...) are retried after a
        #: fresh slot map.  Callers put ``BARRIER`` in a pipeline whose order matters
        #: across slots only when this is true.
        self.cluster = is_cluster_url(url)

    def same_store(self, other: Store) -> bool:
        return isinstance(other, RedisStore) and other.client is self.client

    # -- calls -----------------------------------------------------------------------
    def call(self, fn: Callable[[], T], what: str, attempts: int | None = None,
             failed: Exception | None = None) -> T:
        """Run ``fn``; retry connection failures and timeouts (``attempts`` in all, default
        ``retry_attempts``) with capped, jittered backoff, then raise the connection error.
        Any other redis-py error becomes the user's error at once.  ``failed``: the first
        attempt already ran (a hot path's own, without this call's frame) and raised it;
        it is handled as that attempt's error."""
        attempts = self.retry_attempts if attempts is None else attempts
        backoff = None
        for attempt in range(1, attempts + 1):
            try:
                if failed is not None:
                    exc, failed = failed, None
                    raise exc
                return fn()
            except _UNREACHABLE as exc:
                log.debug("Redis %s failed (%s); attempt %d of %d", what, exc, attempt, attempts)
                if self.cluster:
                    self.client.stem_refresh_later()
                if attempt == attempts:
                    raise self.errors.connection_error(
                        f"Redis unreachable during {what} after {attempts} attempt{'s' if attempts > 1 else ''} "
                        f"({self.label}): {exc}") from exc
                backoff = backoff or Backoff()
                time.sleep(backoff.next())
            except REDIS_ERRORS as exc:
                if self.cluster and is_cluster_transient(exc):
                    # a failover or a resharding moves slots: a fresh slot map, then again
                    log.debug("Redis %s met a cluster change (%s); attempt %d of %d", what, exc, attempt, attempts)
                    self.client.stem_refresh_later()
                    if attempt == attempts:
                        raise self.errors.connection_error(
                            f"Redis Cluster slots unavailable during {what} after {attempts} attempts "
                            f"({self.label}): {exc}") from exc
                    backoff = backoff or Backoff()
                    time.sleep(backoff.next())
                    continue
                if not (self._sentinel and is_stale_master(exc)):
                    raise self.errors.error(f"Redis error during {what} ({self.label}): {exc}") from exc
                # a pooled connection still reaches the old master: drop them all, so the
                # next one asks the sentinels where the master is now
                log.debug("Redis %s reached a former master (%s); attempt %d of %d", what, exc, attempt, attempts)
                self.client.connection_pool.disconnect()
                if attempt == attempts:
                    raise self.errors.connection_error(
                        f"Redis master not reachable during {what} after {attempts} attempts "
                        f"({self.label}): {exc}") from exc
                backoff = backoff or Backoff()
                time.sleep(backoff.next())
        raise AssertionError("unreachable")

    # -- scripts and pipelines ---------------------------------------------------------
    def script(self, source: str) -> Any:
        """Register a Lua script (its ``sha`` for EVALSHA); ``load_scripts`` loads it again."""
        script = self.client.register_script(source)
        self._scripts.append(script)
        with _pools_lock:
            _client_scripts.setdefault(id(self.client), {})[script.sha] = script.script
        return script

    def load_scripts(self) -> None:
        """Load every script of every store on this client (after a Redis restart emptied
        the script cache): a pipeline one store sends may hold another's script calls (the
        backend's results in the broker's settle pipeline)."""
        with _pools_lock:
            sources = list(_client_scripts.get(id(self.client), {}).values())
        for source in sources or [s.script for s in self._scripts]:
            self.client.script_load(source)

    def run(self, commands: Sequence[Sequence[Any]]) -> list:
        """Send ``commands`` (which may hold this store's EVALSHAs) as one pipeline and return
        the replies, raising the first error reply.  When a script was missing, the scripts
        are loaded and the whole pipeline is sent again (up to three times): its commands must be safe to
        repeat (SETs, idempotent scripts).  Raw redis-py errors: run it inside ``call``."""
        replies = execute(self.client, commands)
        for _ in range(3):   # a cache emptied again between the load and the resend: load again
            if not any(isinstance(r, NoScriptError) for r in replies):
                break
            self.load_scripts()
            replies = execute(self.client, commands)
        raise_first_error(replies)
        return replies

    def run_tail(self, commands: Sequence[Sequence[Any]], keep: int) -> list:
        """``run``, building only the last ``keep`` replies (the ones before are stepped over in
        C, and only an error among them is raised): a settle's statuses, then its group
        counts.  Not on a Redis Cluster (a ``BARRIER`` needs ``run``)."""
        packed, n = pack_commands(commands), len(commands)
        for _ in range(3):   # a cache emptied again between the load and the resend: load again
            error, tail = execute_tail(self.client, packed, n, keep)
            if error is None and not any(isinstance(r, NoScriptError) for r in tail):
                break
            if error is not None and not isinstance(error, NoScriptError):
                raise error
            self.load_scripts()
        else:
            error, tail = execute_tail(self.client, packed, n, keep)
        if error is not None:
            raise error
        raise_first_error(tail)
        return tail

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _release(self.client)
