"""The one pub/sub connection of a ``RedisResultBackend``, shared by every wait in the process.

A thread (started by the first wait) holds one connection of its own, taken
from the backend's pool.  It keeps that connection's channels in step with the
ids the backend's ``WaitHub`` waits on: the hub reports ids added and dropped
(``take_changes``) and the thread sends them as SUBSCRIBE / UNSUBSCRIBE
commands of up to ``_BATCH`` channels each.  Each subscribe confirmation tells
the hub that the id's announcements can no longer be missed, so the hub reads
it then; each message (a terminal status, published by ``store``) goes to the
hub as it is.

On a lost connection the thread reports the hub ``down`` (waiters then poll
once a second, and fail after the backend's ``reconnect_timeout``), reconnects
with capped backoff, subscribes every waited id again and so has the hub
re-read all of them: a status stored while it was away is found by that read.

Only this thread touches the connection.  A wake-up pipe lets ``kick`` break
its ``select`` when the hub has changes; an idle connection is PINGed every
``_PING_EVERY_S`` so a dead peer is noticed.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Any, Callable

import redis

from ..errors import BackendConnectionError, StemError
from ..results import decode_status
from ..stores.base import Backoff
from ..stores.local import after_fork_in_child
from ..stores.redis import REDIS_ERRORS, pack_commands
from .waiting import WaitHub

__all__ = ["Subscriber"]

log = logging.getLogger("stem.backends.redis")

_BATCH = 5000            # channels per SUBSCRIBE / UNSUBSCRIBE command
_FLUSH = 1000            # messages handed to the hub at once
_PING_EVERY_S = 30.0


class Subscriber:
    """The pub/sub thread of one backend instance (see the module docstring)."""

    def __init__(self, *, pool: Callable[[], Any], hub: WaitHub, channel: Callable[[str], str], prefix: str,
                 suffix: str, label: str):
        """``channel(id)`` names an id's channel, which is ``prefix + id + suffix``; ``pool()``
        is the connection pool to take the connection from (asked again at each reconnect:
        on a Redis Cluster it may name another node)."""
        self._pools = pool
        self._hub = hub
        self._channel = channel
        self._prefix = prefix.encode()
        self._suffix = suffix.encode()
        self._label = label
        self._new_state()
        after_fork_in_child(self._new_state)

    def _new_state(self) -> None:
        """At construction and in a forked child (the parent's thread and pipe are not its own)."""
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r = self._wake_w = -1          # the pipe is made with the thread
        self.listening = False

    def kick(self) -> None:
        """The hub has changes: start the thread if needed and have it look."""
        with self._lock:
            if self._stop.is_set():
                return
            if self._thread is None:
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_r, False)
                os.set_blocking(self._wake_w, False)
                self._thread = threading.Thread(target=self._run, name="stem-redis-wait", daemon=True)
                self._thread.start()
        self._poke()

    def _poke(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):     # full: a wake-up is pending anyway; closed: stopping
            pass

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = Backoff()
        failing = False
        while not self._stop.is_set():
            conn = pool = None
            try:
                pool = self._pools()
                conn = pool.get_connection()
                subscribed: set[bytes] = set()
                self.listening = True
                self._hub.up("listener")
                if failing:
                    log.warning("stem: Redis wait listener reconnected (%s)", self._label)
                failing = False
                backoff = Backoff()
                self._hub.take_changes()    # a new connection subscribes every waited id anyway
                self._sync(conn, subscribed, [(i, True) for i in self._hub.waited_ids()])
                self._pump(conn, subscribed)
            except (*REDIS_ERRORS, OSError, ValueError) as exc:
                if self._stop.is_set():
                    break
                (log.debug if failing else log.warning)(
                    "stem: Redis wait listener lost its connection (%s): %s; reconnecting", self._label, exc)
                failing = True
                self._hub.down("listener", BackendConnectionError(
                    f"Redis unreachable while waiting for results ({self._label}): {exc}"))
            finally:
                self.listening = False
                self._hub.kick()                 # the reader polls while nothing is announced
                if conn is not None:
                    conn.disconnect()
                    pool.release(conn)
            self._stop.wait(backoff.next())

    def _pump(self, conn: Any, subscribed: set[bytes]) -> None:
        while not self._stop.is_set():
            self._sync(conn, subscribed, self._hub.take_changes())
            self._drain(conn)
            sock = conn._sock       # redis-py keeps it private; as stem.stores.redis_pipe reads it
            if sock is None:
                raise redis.ConnectionError("the pub/sub connection was closed")
            poller = select.poll()   # not select: a process's descriptors may run past 1024
            poller.register(sock, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            readable = {fd for fd, _ in poller.poll(_PING_EVERY_S * 1000)}
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            elif not readable:
                conn.send_command("PING", check_health=False)   # idle: prove the peer is alive

    def _sync(self, conn: Any, subscribed: set[bytes], changes: list[tuple[str, bool]]) -> None:
        """Send the (un)subscriptions ``changes`` call for; ids already subscribed are read now."""
        to_sub: list[bytes] = []
        to_unsub: list[bytes] = []
        ready: list[str] = []
        for task_id, wanted in changes:
            ch = self._channel(task_id).encode()
            if wanted:
                if ch in subscribed:
                    ready.append(task_id)
                else:
                    subscribed.add(ch)
                    to_sub.append(ch)
            elif ch in subscribed:
                subscribed.discard(ch)
                to_unsub.append(ch)
        for command, channels in (("SUBSCRIBE", to_sub), ("UNSUBSCRIBE", to_unsub)):
            for i in range(0, len(channels), _BATCH):
                conn.send_packed_command([pack_commands([(command, *channels[i:i + _BATCH])])], check_health=False)
                self._drain(conn)
        if ready:
            self._hub.confirmed(ready)

    def _drain(self, conn: Any) -> None:
        """Hand every reply already received to the hub: statuses and subscribe confirmations."""
        statuses: list = []
        confirmed: list[str] = []
        while conn.can_read(0):
            reply = conn.read_response(disconnect_on_error=False, push_request=True)
            if not isinstance(reply, (list, tuple)) or len(reply) < 3:
                continue        # PONG
            kind = reply[0]
            if kind == b"message":
                try:
                    statuses.append(decode_status(reply[2]))
                except (StemError, ValueError, TypeError) as exc:   # msgspec's errors are ValueErrors
                    log.warning("stem: ignored a message on %r that is no task status: %s", reply[1], exc)
            elif kind == b"subscribe":
                confirmed.append(self._task_id(reply[1]))
            if len(statuses) + len(confirmed) >= _FLUSH:
                self._flush(statuses, confirmed)
                statuses, confirmed = [], []
        self._flush(statuses, confirmed)

    def _flush(self, statuses: list, confirmed: list[str]) -> None:
        if statuses:
            self._hub.offer(statuses)
        if confirmed:
            self._hub.confirmed(confirmed)

    def _task_id(self, channel: bytes) -> str:
        return channel[len(self._prefix):len(channel) - len(self._suffix)].decode()

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._poke()
        if thread is not threading.current_thread():
            thread.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
