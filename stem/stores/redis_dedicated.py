"""One connection of a Redis pool kept by stem's round trips, so a call pays no pool checkout.

Why: redis-py's ``ConnectionPool.get_connection`` and ``release`` cost 5-6 us of CPU a
call (the pool's lock, its fork check, a readiness ``poll`` on the socket, observability
counters), a third of a single ``enqueue`` (``benchmarks/README.md``, "Single enqueue").
``stem.stores.redis_pipe`` sends each round trip on the pool's dedicated connection when
it is free, and on a pooled connection as before when it is not.

The rules, and what each one is for:

* **From the pool.**  The connection is checked out with ``get_connection`` and stays
  checked out (one of the pool's in-use connections).  So a Sentinel pool connects it to
  the master the sentinels name, the pool counts it against ``max_connections``, and
  ``pool.disconnect()`` (stem's answer to a ``READONLY`` reply, or the last store's
  close) closes it with the others.
* **One caller at a time.**  A round trip takes the lock without waiting; a thread that
  finds it held takes a pooled connection, so no caller queues behind another.
* **Dropped on error.**  Any exception during a round trip disconnects it (replies may be
  in flight) and releases it to the pool, which keeps it only while it still owns it
  (a Sentinel pool whose master moved disconnects it); the next round trip checks out
  again.  The error itself goes up to ``RedisStore.call``, which retries as before.
* **Checked out again when stale**, before a round trip uses it: disconnected
  (``pool.disconnect()`` from any thread), checked out by another process (the pid: a
  forked child never writes on its parent's socket, and drops it without closing it,
  as redis-py's own reset after a fork does), the pool reset (a new in-use set: the
  connection is no longer the pool's), or, behind Sentinel, connected to another
  address than the master the pool last learned (another connection of the pool asked
  the sentinels after a failover; redis-py then drops only its idle connections).
* **Its socket's timeout is the kernel's** (``_kernel_timeouts``) on a plain TCP or Unix
  socket on Linux; then, with hiredis replies as bytes, ``feed`` is set and a single
  command's round trip is one compiled call (``stem.stores.redis_pipe.execute_one``).
* **After a fork** the locks are made anew in the child (a thread of the parent may
  have held one), through the stores' one fork hook.

A Redis Cluster client is not covered: ``StemCluster.stem_execute`` sends each node's
share of a pipeline on that node's pool as before.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from typing import Any

from redis.sentinel import SentinelConnectionPool

try:
    from hiredis import Reader as _Reader
except ImportError:  # pragma: no cover - redis[hiredis] is a core dependency
    _Reader = None

from .local import after_fork_in_child

__all__ = ["Dedicated", "dedicate", "dedicated", "undedicate"]


class Dedicated:
    """The dedicated connection of one pool (module docstring)."""

    __slots__ = ("pool", "lock", "conn", "pid", "in_use", "proxy", "address", "feed", "has_data")

    def __init__(self, pool: Any):
        self.pool = pool
        self.lock = threading.Lock()
        self.conn: Any = None
        self.pid = 0
        self.in_use: Any = None
        #: A Sentinel pool's proxy: where it last found the master (``master_address``).
        self.proxy = pool.proxy if isinstance(pool, SentinelConnectionPool) else None
        self.address: Any = None
        #: The connection's hiredis ``Reader.feed`` when its socket is blocking with kernel
        #: timeouts and its replies are bytes: a single command's round trip may then be
        #: one compiled call (``stem.stores.redis_pipe``); None otherwise.
        self.feed: Any = None
        self.has_data: Any = None      #: that reader's ``has_data`` (None with ``feed``)

    def connection(self) -> Any:
        """The connection to send on, checked out anew when the one held is stale.  The
        caller holds ``lock``; the checks are the round trip's whole overhead."""
        conn = self.conn
        if (conn is None or conn._sock is None or self.pid != os.getpid()
                or self.pool._in_use_connections is not self.in_use
                or (self.proxy is not None and self.proxy.master_address != self.address)):
            conn = self._checkout()
        return conn

    def _checkout(self) -> Any:
        self.drop()
        pool = self.pool
        conn = pool.get_connection()
        self.conn, self.pid, self.in_use = conn, os.getpid(), pool._in_use_connections
        self.address = (conn.host, conn.port) if self.proxy is not None else None
        reader = getattr(conn._parser, "_reader", None)
        direct = (_kernel_timeouts(conn._sock) and _Reader is not None and type(reader) is _Reader
                  and not conn.encoder.decode_responses)
        self.feed, self.has_data = (reader.feed, reader.has_data) if direct else (None, None)
        return conn

    def drop(self) -> None:
        """Let the connection go: disconnected and released to the pool in the process that
        checked it out; only forgotten in a forked child.  The caller holds ``lock``."""
        conn, self.conn, self.feed, self.has_data = self.conn, None, None, None
        if conn is None or self.pid != os.getpid():
            return
        try:
            conn.disconnect()
        finally:
            self.pool.release(conn)   # a reset pool no longer knows it: then a no-op


def _kernel_timeouts(sock: Any) -> bool:
    """Move a plain TCP or Unix socket's timeout into the kernel (``SO_RCVTIMEO`` and
    ``SO_SNDTIMEO``) and make it blocking: Python polls a socket that has a timeout before
    every ``send`` and ``recv`` (two syscalls a round trip, ~1 us of CPU); the kernel's
    timeout bounds each call the same way without them.  A call that times out raises
    ``BlockingIOError`` (EAGAIN), which the round trip's readers report as redis-py's
    ``ConnectionError`` (retried like a timeout), and the connection is dropped with its
    socket.  Linux only (the timeval layout); TLS sockets keep Python's timeout.  Whether
    the timeouts moved."""
    timeout = sock.gettimeout() if type(sock) is socket.socket else None
    if not timeout or not sys.platform.startswith("linux"):
        return False
    seconds = int(timeout)
    tv = struct.pack("@ll", seconds, int((timeout - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.settimeout(None)
    return True


_DEDICATED: dict[Any, Dedicated] = {}     # pool -> its Dedicated; read without a lock (one dict get)
_lock = threading.Lock()


#: ``dedicated(pool)``: its Dedicated, or None (the dict's own ``get``: no Python frame per round trip).
dedicated = _DEDICATED.get


def dedicate(pool: Any) -> None:
    """Give ``pool``'s round trips a dedicated connection (``stem.stores.redis`` does, per pool)."""
    after_fork_in_child(_renew_in_child)
    with _lock:
        if pool not in _DEDICATED:
            _DEDICATED[pool] = Dedicated(pool)


def undedicate(pool: Any) -> None:
    """Release ``pool``'s dedicated connection (before the pool is disconnected)."""
    with _lock:
        d = _DEDICATED.pop(pool, None)
    if d is not None:
        with d.lock:
            d.drop()


def _renew_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for d in list(_DEDICATED.values()):
        d.lock = threading.Lock()
        d.conn = None          # the parent's socket: never written to, never closed here
