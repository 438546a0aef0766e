"""A lean Redis pipeline for the hot paths: pack a batch in C, one write, read the replies.

redis-py's ``Pipeline`` spends more Python per command (argument encoding,
per-command bookkeeping, response callbacks) than Redis spends running a SET
or an XADD (figures: ``benchmarks/README.md``, "Redis").  Here a batch is packed into one buffer by
``stem._speedups.resp`` (or its pure twin), written with one
``send_packed_command`` on the pool's dedicated connection (checked out once and
kept: ``stem.stores.redis_dedicated``) or, when another thread holds that one, on a
connection borrowed from the pool, and the replies are pulled straight from the
connection's hiredis reader.  A single command on the dedicated connection, when its
socket is blocking with kernel timeouts, is one compiled call (``resp.exchange``:
write, read, and a bulk-string reply's parse; any other reply is fed to that reader).

The connection handling stays redis-py's: the pool hands out a checked
connection, a socket error or timeout disconnects it (so it is never reused
mid-reply) and surfaces as ``redis.ConnectionError``/``TimeoutError``, which
``RedisStore.call`` retries.  Error replies are returned in place (as
redis-py's typed exceptions, e.g. ``NoScriptError``); ``raise_first_error``
raises the first one after every reply was read, as ``Pipeline.execute``
does.

A Redis Cluster client (``stem.stores.redis_cluster.StemCluster``) gets the same calls: each
function hands the packed pipeline to its ``stem_execute``, which splits it by slot (the
single-Redis path pays one type check for it).
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Iterable, Sequence, TypeVar

import redis

from .. import _native
from .redis_dedicated import dedicated as _dedicated_of

try:
    from hiredis import Reader as _Reader
except ImportError:  # pragma: no cover - redis[hiredis] is a core dependency
    _Reader = None

__all__ = ["execute", "execute_last", "execute_one", "execute_packed", "execute_tail", "execute_unread",
           "execute_watched", "pack_commands", "pack_xadds", "read_replies", "raise_first_error"]

_resp = _native.load("resp")
pack_commands = _resp.pack_commands
pack_command = _resp.pack_command
pack_xadds = _resp.pack_xadds
_exchange = _resp.exchange
_scan_replies = _resp.scan_replies
_READ_SIZE = 65536
_Redis = redis.Redis
_T = TypeVar("_T")

try:   # the hiredis parser's "need more bytes" marker (redis-py >= 5)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _MORE
except ImportError:  # pragma: no cover - older or newer redis-py: use the generic reader
    _MORE, _Reader = None, None


def read_replies(conn: Any, n: int) -> list:
    """The next ``n`` replies on ``conn`` (error replies in place, typed); a socket error or
    timeout raises redis-py's ConnectionError / TimeoutError."""
    parser = conn._parser
    reader = getattr(parser, "_reader", None)   # a hiredis Reader behind redis-py's hiredis parser
    out: list = []
    if _Reader is not None and type(reader) is _Reader:
        gets = reader.gets
        more = parser.read_from_socket
        while len(out) < n:
            reply = gets()
            if reply is _MORE or reply is False:
                try:
                    more()
                except socket.timeout as exc:   # what redis-py's read_response would raise
                    raise redis.TimeoutError(f"Timeout reading from Redis: {exc}") from exc
                except OSError as exc:          # e.g. ECONNRESET when the server is killed
                    raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
                continue
            if isinstance(reply, redis.ConnectionError):
                raise reply
            out.append(reply)
        return out
    for _ in range(n):   # any other parser: redis-py's own reader, one reply at a time
        try:
            out.append(conn.read_response())
        except redis.ResponseError as exc:
            out.append(exc)
    return out


def _round_trip(client: "redis.Redis", packed: bytes, read: Callable[[Any], _T]) -> _T:
    """Send ``packed`` on the pool's dedicated connection when it is free
    (``stem.stores.redis_dedicated``), else on a pooled one, and return ``read(conn)`` (its
    replies)."""
    pool = client.connection_pool
    d = _dedicated_of(pool)
    if d is not None and d.lock.acquire(False):
        try:
            conn = d.connection()
            try:
                conn.send_packed_command([packed], check_health=False)
                return read(conn)
            except BaseException:
                d.drop()   # never reuse a connection with replies still in flight
                raise
        finally:
            d.lock.release()
    conn = pool.get_connection()
    try:
        conn.send_packed_command([packed], check_health=False)
        return read(conn)
    except BaseException:
        conn.disconnect()   # never hand back a connection with replies still in flight
        raise
    finally:
        pool.release(conn)


def execute_packed(client: "redis.Redis", packed: bytes, n: int) -> list:
    """Send ``packed`` (``n`` commands) on one pooled connection; return the ``n`` replies."""
    if type(client) is not _Redis and hasattr(client, "stem_execute"):   # a cluster: by slot
        return client.stem_execute(packed, n)
    return _round_trip(client, packed, lambda conn: read_replies(conn, n))


def _read_one(conn: Any) -> Any:
    return read_replies(conn, 1)[0]


def _send_read_one(conn: Any, packed: bytes) -> Any:
    """``send_packed_command`` and ``read_replies(conn, 1)[0]`` with their frames and checks
    folded into one (a single enqueue's round trip): the same errors."""
    sock = conn._sock
    try:
        sock.sendall(packed)
    except socket.timeout as exc:
        raise redis.TimeoutError(f"Timeout writing to Redis: {exc}") from exc
    except OSError as exc:
        raise redis.ConnectionError(f"Error while writing to Redis: {exc}") from exc
    parser = conn._parser
    reader = getattr(parser, "_reader", None)
    if _Reader is None or type(reader) is not _Reader:
        return read_replies(conn, 1)[0]
    reply = reader.gets()
    while reply is _MORE or reply is False:
        try:
            parser.read_from_socket()
        except socket.timeout as exc:
            raise redis.TimeoutError(f"Timeout reading from Redis: {exc}") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
        reply = reader.gets()
    if isinstance(reply, redis.ConnectionError):
        raise reply
    return reply


def execute_one(client: "redis.Redis", packed: bytes, raise_error: bool = False) -> Any:
    """Send one packed command; return its reply: an error reply in place (typed), or
    raised with ``raise_error``.  On the dedicated connection when it is free, with
    ``_round_trip``'s rules; the rest as ``execute_packed``.  When that connection's socket
    is blocking with kernel timeouts (``Dedicated.feed``), the write, the read and a
    bulk-string reply's parse are one compiled call (``resp.exchange``); any other reply
    goes through the connection's hiredis reader, so it comes back as it always did."""
    if type(client) is not _Redis and hasattr(client, "stem_execute"):   # a cluster: by slot
        reply = client.stem_execute(packed, 1)[0]
    else:
        d = _dedicated_of(client.connection_pool)
        if d is not None and d.lock.acquire(False):
            try:
                conn = d.connection()
                try:
                    feed = d.feed
                    if feed is not None and not d.has_data():   # _exchange_one, inlined
                        try:
                            reply = _exchange(conn._sock, packed, feed)
                        except OSError as exc:   # BlockingIOError: a kernel timeout expired
                            raise redis.ConnectionError(f"Error while exchanging with Redis: {exc}") from exc
                        if reply is None:
                            reply = read_replies(conn, 1)[0]
                    else:
                        reply = _send_read_one(conn, packed)
                except BaseException:
                    d.drop()
                    raise
            finally:
                d.lock.release()
        else:
            reply = _round_trip(client, packed, _read_one)
    if raise_error and isinstance(reply, redis.ResponseError):
        raise reply
    return reply


def _skip_replies(conn: Any, n: int) -> Exception | None:
    """Read ``n`` replies straight from the socket and step over them in C without
    building them; the first error reply comes back typed (``parse_error``), else None.
    Only while the connection's hiredis reader holds nothing: the bytes read here
    pass through it only when they run past the ``n``-th reply (fed to it, for the
    replies after).  Otherwise the replies are read the usual way."""
    parser = conn._parser
    reader = getattr(parser, "_reader", None)
    sock = conn._sock
    if _Reader is None or type(reader) is not _Reader or sock is None or reader.has_data():
        return next((r for r in read_replies(conn, n) if isinstance(r, redis.ResponseError)), None)
    buf = bytearray(_READ_SIZE)
    pos = end = done = 0
    error = None
    while True:
        try:
            pos, count, err = _scan_replies(buf, pos, end, n - done)
        except ValueError as exc:
            raise redis.exceptions.InvalidResponse(str(exc)) from exc
        if err is not None and error is None:
            error = parser.parse_error(err[1].decode("utf-8", "replace"))
        done += count
        if done == n:
            if pos < end:   # the start of the replies after these
                reader.feed(bytes(buf[pos:end]))
            return error
        if pos:   # keep the unfinished reply at the front
            buf[:end - pos] = buf[pos:end]
            end -= pos
            pos = 0
        if end == len(buf):   # one reply larger than the buffer
            buf += bytes(len(buf))
        try:
            with memoryview(buf) as view, view[end:] as free:
                got = sock.recv_into(free)
        except socket.timeout as exc:
            raise redis.TimeoutError(f"Timeout reading from Redis: {exc}") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
        if not got:
            raise redis.ConnectionError("Connection closed by server.")
        end += got


def execute_unread(client: "redis.Redis", packed: bytes, n: int) -> None:
    """Send ``packed`` (``n`` commands) whose replies the caller does not need (a batch of
    XADDs: their entry ids) and raise the first error reply among them, as
    ``raise_first_error`` would; the ``n`` replies are read but never built."""
    if type(client) is not _Redis and hasattr(client, "stem_execute"):   # a cluster: by slot
        raise_first_error(client.stem_execute(packed, n))
        return
    error = _round_trip(client, packed, lambda conn: _skip_replies(conn, n))
    if error is not None:
        raise error


def execute_last(client: "redis.Redis", packed: bytes, n: int) -> tuple[Exception | None, Any]:
    """Send ``packed`` (``n`` commands) and build only the last reply: the first ``n - 1``
    (a settle pipeline's SETs, PUBLISHes and ack scripts before its consume) are stepped
    over in C.  Returns (their first error reply, typed, or None; the last reply)."""
    if type(client) is not _Redis and hasattr(client, "stem_execute"):   # a cluster: by slot
        replies = client.stem_execute(packed, n)
        return next((r for r in replies[:-1] if isinstance(r, redis.ResponseError)), None), replies[-1]
    return _round_trip(client, packed, lambda conn: (_skip_replies(conn, n - 1), read_replies(conn, 1)[0]))


def execute_tail(client: "redis.Redis", packed: bytes, n: int, keep: int) -> tuple[Exception | None, list]:
    """``execute_last`` for the last ``keep`` replies: the first ``n - keep`` (a settle's SETs
    and PUBLISHes before its group counts) are stepped over in C.  Returns (their first
    error reply, typed, or None; the last ``keep`` replies, errors in place)."""
    if type(client) is not _Redis and hasattr(client, "stem_execute"):   # a cluster: by slot
        replies = client.stem_execute(packed, n)
        return next((r for r in replies[:n - keep] if isinstance(r, redis.ResponseError)), None), replies[n - keep:]
    return _round_trip(client, packed, lambda conn: (_skip_replies(conn, n - keep), read_replies(conn, keep)))


def execute_watched(client: "redis.Redis", key: str, packed: bytes, n: int) -> tuple[bool, Exception | None, Any]:
    """Optimistic transaction on one connection: ``WATCH key``; if ``key`` exists, ``UNWATCH``
    and return (False, None, None); else send ``packed`` (``n`` commands: a ``MULTI`` ...
    ``EXEC`` and what follows it) and return (True, the first error reply among the first
    ``n - 1``, typed, or None; the last reply, built).  An ``EXEC`` that a change of ``key``
    aborted replies null: the caller's last command tells it what happened.  Not on a
    Redis Cluster (a transaction there stays in one slot)."""
    def run(conn: Any) -> tuple[bool, Exception | None, Any]:
        watch = pack_commands((("WATCH", key), ("EXISTS", key)))
        conn.send_packed_command([watch], check_health=False)
        ok, exists = read_replies(conn, 2)
        if isinstance(ok, Exception):
            raise ok
        if exists:
            conn.send_packed_command([pack_commands((("UNWATCH",),))], check_health=False)
            read_replies(conn, 1)
            return False, None, None
        conn.send_packed_command([packed], check_health=False)
        return True, _skip_replies(conn, n - 1), read_replies(conn, 1)[0]

    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        return run(conn)
    except BaseException:
        conn.disconnect()   # never hand back a connection with replies in flight or a WATCH held
        raise
    finally:
        pool.release(conn)


def execute(client: "redis.Redis", commands: Sequence[Sequence[Any]]) -> list:
    """Run ``commands`` as one pipeline (no MULTI); error replies come back in place."""
    if not commands:
        return []
    return execute_packed(client, pack_commands(commands), len(commands))


def raise_first_error(replies: Iterable[Any]) -> None:
    for r in replies:
        if isinstance(r, redis.ResponseError):
            raise r
