"""Redis behind Sentinel: ``redis+sentinel://`` URLs and the connection pool they make.

A Sentinel URL names the sentinels, not the master::

    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db][?options]
    rediss+sentinel://...      (TLS to the sentinels and to the master)

The password (and user) in the authority are the master's; a sentinel that has a
password of its own takes ``?sentinel_password=``.  The pool asks the sentinels for the
master's address whenever it opens a connection (redis-py's ``SentinelConnectionPool``),
so after a failover the next connection goes to the promoted replica.  What happens to
the calls in flight during one is ``RedisStore.call``'s: the connection errors are retried
with backoff, like a restart of a plain Redis, and a ``READONLY`` reply (an old master
that came back as a replica, while a pooled connection still points at it) drops the
pool's connections and is retried the same way.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from .. import _checks as checks
from ..errors import ConfigurationError
from ..redact import mask_url
from .redis_urls import AddressError, parse_addresses, split_authority

__all__ = ["SENTINEL_SCHEMES", "SentinelURL", "is_sentinel_url", "parse_sentinel_url", "sentinel_pool",
           "async_sentinel_pool", "close_async_sentinel_pool", "is_stale_master"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_DEFAULT_PORT = 26379
#: Query options a Sentinel URL takes (anything else is refused: a typo must not pass).
_OPTIONS = ("sentinel_password", "sentinel_username", "min_other_sentinels")


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]
    service_name: str
    db: int
    username: str | None
    password: str | None
    ssl: bool
    sentinel_username: str | None
    sentinel_password: str | None
    min_other_sentinels: int


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a Sentinel URL, checked: at least one sentinel, a service name, a db
    number, only known options."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:                  # an unbalanced IPv6 bracket
        raise ConfigurationError(f"bad Sentinel URL {mask_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SENTINEL_SCHEMES:
        raise ConfigurationError(f"not a Sentinel URL: {mask_url(url)!r}")
    username, password, hosts = split_authority(parts.netloc)
    try:
        sentinels = parse_addresses(hosts, _DEFAULT_PORT)
    except AddressError as exc:
        raise ConfigurationError(f"bad Sentinel URL {mask_url(url)!r}: {exc} (expected host:port)") from None
    if not sentinels:
        raise ConfigurationError(f"bad Sentinel URL {mask_url(url)!r}: no sentinel address "
                                 "(expected redis+sentinel://host:port[,host:port...]/service_name/db)")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ConfigurationError(f"bad Sentinel URL {mask_url(url)!r}: the path must be /service_name "
                                 "or /service_name/db")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ConfigurationError(f"bad Sentinel URL {mask_url(url)!r}: db must be a number, got {path[1]!r}")
        db = int(path[1])
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _OPTIONS:
            raise ConfigurationError(f"bad Sentinel URL {mask_url(url)!r}: unknown option {name!r} "
                                     f"(known: {', '.join(_OPTIONS)})")
        options[name] = value
    min_other = options.get("min_other_sentinels", "0")
    if not min_other.isdigit():
        raise ConfigurationError(f"bad Sentinel URL {mask_url(url)!r}: min_other_sentinels must be a number")
    return SentinelURL(sentinels, path[0], db, username, password, scheme == "rediss+sentinel",
                       options.get("sentinel_username") or None, options.get("sentinel_password") or None,
                       int(min_other))


def _pool_arguments(url: str, *, socket_timeout: float,
                    socket_connect_timeout: float) -> tuple[SentinelURL, dict[str, Any], dict[str, Any]]:
    """The parsed URL, the sentinels' connection arguments and the master's."""
    parsed = parse_sentinel_url(url)
    checks.seconds("socket_timeout", socket_timeout)
    common: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    sentinel_kwargs = dict(common)
    if parsed.sentinel_password is not None:
        sentinel_kwargs["password"] = parsed.sentinel_password
    if parsed.sentinel_username is not None:
        sentinel_kwargs["username"] = parsed.sentinel_username
    master_kwargs: dict[str, Any] = dict(common, db=parsed.db, socket_keepalive=True)
    if parsed.password is not None:
        master_kwargs["password"] = parsed.password
    if parsed.username is not None:
        master_kwargs["username"] = parsed.username
    if parsed.ssl:
        sentinel_kwargs["ssl"] = master_kwargs["ssl"] = True
    return parsed, sentinel_kwargs, master_kwargs


def sentinel_pool(url: str, *, socket_timeout: float, socket_connect_timeout: float,
                  retry: Any) -> SentinelConnectionPool:
    """A connection pool to the master that the sentinels of ``url`` name."""
    parsed, sentinel_kwargs, master_kwargs = _pool_arguments(url, socket_timeout=socket_timeout,
                                                             socket_connect_timeout=socket_connect_timeout)
    master_kwargs["retry"] = retry
    manager = Sentinel(parsed.sentinels, min_other_sentinels=parsed.min_other_sentinels,
                       sentinel_kwargs=sentinel_kwargs, **master_kwargs)
    return SentinelConnectionPool(parsed.service_name, manager, **master_kwargs)


def async_sentinel_pool(url: str, *, socket_timeout: float, socket_connect_timeout: float) -> Any:
    """``sentinel_pool`` on ``redis.asyncio``: the pool whose ``connection_class`` (with its
    ``connection_kwargs``) makes connections that ask the sentinels for the master's address
    each time they connect.  ``stem.stores.redis_async`` makes its own connections from it
    and keeps it (the connections hold only a weak proxy to it); closing its sentinel
    clients is ``close_async_sentinel_pool``."""
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel, SentinelConnectionPool as AsyncPool
    parsed, sentinel_kwargs, master_kwargs = _pool_arguments(url, socket_timeout=socket_timeout,
                                                             socket_connect_timeout=socket_connect_timeout)
    manager = AsyncSentinel(parsed.sentinels, min_other_sentinels=parsed.min_other_sentinels,
                            sentinel_kwargs=sentinel_kwargs, **master_kwargs)
    return AsyncPool(parsed.service_name, manager, **master_kwargs)


async def close_async_sentinel_pool(pool: Any) -> None:
    """Close the connections ``pool``'s sentinel manager opened to the sentinels."""
    await pool.sentinel_manager.aclose()
    await pool.disconnect()


def is_stale_master(exc: BaseException) -> bool:
    """A reply that says the connection reached a server that is no master any more."""
    return isinstance(exc, redis.exceptions.ReadOnlyError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(("MASTERDOWN", "LOADING")))
