"""A lean Redis pipeline for the hot paths: pack a batch in C, one write, read the replies.

redis-py's ``Pipeline`` costs ~15-20 µs of Python per command (argument
encoding, per-command bookkeeping, response callbacks), more than Redis
spends running a SET or an XADD.  Here a batch is packed into one buffer by
``stem._speedups.resp`` (or its pure twin), written with one
``send_packed_command`` on a connection borrowed from the client's pool, and
the replies are pulled straight from the connection's hiredis reader.

The connection handling stays redis-py's: the pool hands out a checked
connection, a socket error or timeout disconnects it (so it is never reused
mid-reply) and surfaces as ``redis.ConnectionError``/``TimeoutError``, which
``call_with_retry`` retries.  Error replies are returned in place (as
redis-py's typed exceptions, e.g. ``NoScriptError``); ``raise_first_error``
raises the first one after every reply was read, as ``Pipeline.execute``
does.
"""

from __future__ import annotations

import socket
from typing import Any, Iterable, Sequence

import redis

from .. import _native

__all__ = ["execute", "execute_packed", "pack_commands", "raise_first_error"]

pack_commands = _native.load("resp").pack_commands

try:   # the hiredis parser's "need more bytes" marker (redis-py >= 5)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _MORE
    from redis._parsers.hiredis import _HiredisParser
except ImportError:  # pragma: no cover - older or newer redis-py: use the generic reader
    _MORE, _HiredisParser = None, None


def _read_replies(conn: Any, n: int) -> list:
    parser = conn._parser
    reader = getattr(parser, "_reader", None)
    out: list = []
    if _HiredisParser is not None and type(parser) is _HiredisParser and reader is not None:
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


def execute_packed(client: "redis.Redis", packed: bytes, n: int) -> list:
    """Send ``packed`` (``n`` commands) on one pooled connection; return the ``n`` replies."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([packed], check_health=False)
        return _read_replies(conn, n)
    except BaseException:
        conn.disconnect()   # never hand back a connection with replies still in flight
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
