"""The LISTEN thread: one connection of its own that LISTENs on one channel and calls back.

Brokers listen on ``stem.<schema>.jobs`` to wake idle consumers, result
backends on ``stem.<schema>.results`` to wake ``wait``; a listener reconnects
(capped backoff) and calls ``on_reset`` whenever it (re)connects or loses its
connection, so waiters re-check instead of trusting a stream that may have
had a gap.  A forked child starts its own thread on first ``ensure``.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Any, Callable

from .base import Backoff
from .local import after_fork_in_child

__all__ = ["Listener"]

log = logging.getLogger("stem.stores.postgres")


class Listener:
    """A thread with its own connection that LISTENs on one channel.

    ``on_notify(payload)`` runs for each notification; ``on_reset()`` whenever
    the listener (re)connects or loses its connection, so that waiters
    re-check instead of trusting a stream that may have had a gap."""

    def __init__(self, connect: Callable[[], Any], channel: str, on_notify: Callable[[str], None],
                 on_reset: Callable[[], None]):
        """``connect()`` opens a fresh autocommit psycopg connection for the thread."""
        self._connect = connect
        self.channel = channel
        self._on_notify = on_notify
        self._on_reset = on_reset
        self._pid = 0
        self._thread: threading.Thread | None = None
        self._new_locks()
        after_fork_in_child(self._new_locks)
        self._start_state()

    def _new_locks(self) -> None:
        """At construction and in a forked child (where another thread may have held it)."""
        self._lock = threading.Lock()

    def _start_state(self) -> None:
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def ensure(self, timeout: float) -> bool:
        """Start the thread if needed; wait up to ``timeout`` s until it listens.  True once listening."""
        with self._lock:
            if self._pid != os.getpid():
                if self._pid:               # forked: the thread and pipe belong to the parent
                    self._start_state()
                self._pid = os.getpid()
                self._thread = None
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=f"stem-listen-{self.channel}", daemon=True)
                self._thread.start()
        return self._listening.wait(max(timeout, 0.0))

    def _run(self) -> None:
        backoff = Backoff()
        failing = False
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._connect()
                # notifications psycopg reads itself (during execute) reach us through the handler
                conn.add_notify_handler(lambda n: self._on_notify(n.payload))
                conn.execute(f'LISTEN "{self.channel}"')
                self._listening.set()
                if failing:
                    log.warning("stem: listener on %s reconnected", self.channel)
                failing = False
                self._on_reset()
                backoff = Backoff()
                self._pump(conn)
            except Exception as e:     # noqa: BLE001 - the listener must outlive any error
                if not self._stop.is_set():
                    (log.debug if failing else log.warning)(
                        "stem: listener on %s lost its connection (%s); reconnecting", self.channel,
                        str(e).strip())
                    failing = True
            finally:
                self._listening.clear()
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:      # noqa: BLE001
                        pass
            if not self._stop.is_set():
                self._on_reset()
                self._stop.wait(backoff.next())

    def _pump(self, conn: Any) -> None:
        pgconn = conn.pgconn
        fd = pgconn.socket
        poller = select.poll()      # not select: a process's descriptors may run past 1024
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            readable = {ready for ready, _ in poller.poll(30_000)}
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
                continue
            if fd in readable:
                pgconn.consume_input()
                if pgconn.status != 0:
                    raise ConnectionError("connection lost")
                while (n := pgconn.notifies()) is not None:
                    self._on_notify(n.extra.decode())
            else:
                conn.execute("SELECT 1")    # idle for 30 s: prove the connection is alive

    def stop(self) -> None:
        self._stop.set()
        if not self._pid:                   # never started: only the pipe made at construction
            self._close_pipe()
        elif self._pid == os.getpid():
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(5.0)
            self._close_pipe()

    def _close_pipe(self) -> None:
        """Close the wake-up pipe once (a second ``stop`` must not close descriptors that
        were numbered anew since)."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1
