"""Connections that belong to one thread of one process, and what a forked child does with its parent's.

``PerThread`` holds one connection per thread (SQLite and psycopg connections
are not for sharing between threads), opens it on first use and closes it
when its thread ends.  A forked child never uses nor closes a connection it
inherited: those are the parent's sessions (a closed SQLite handle may
checkpoint or drop the parent's WAL; a psycopg close would end the parent's
session), so the child keeps them referenced in ``_INHERITED`` and opens its own.

``after_fork_in_child`` is the one ``os.register_at_fork`` hook of the stores,
registered when the first store asks for it (never at import): a lock another
thread held at fork time would never be released in the child, so each
holder of such a lock makes new ones there.
"""

from __future__ import annotations

import logging
import os
import threading
import types
import weakref
from typing import Any, Callable, Generic, TypeVar

__all__ = ["PerThread", "after_fork_in_child"]

log = logging.getLogger("stem.stores")
C = TypeVar("C")

# Connections inherited through fork(): kept referenced, never used or closed.
_INHERITED: list[Any] = []

_hooks: dict[Any, Callable[[], Any]] = {}    # key -> a function or a WeakMethod
_hooks_lock = threading.Lock()
_registered = False


def after_fork_in_child(callback: Callable[[], None]) -> None:
    """Call ``callback()`` in every child forked from now on (a bound method is held weakly:
    it stops when its object is gone; a function is registered once however often given)."""
    global _registered
    with _hooks_lock:
        if not _registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_run_hooks)
            _registered = True
        if isinstance(callback, types.MethodType):
            key = object()
            _hooks[key] = weakref.WeakMethod(callback, lambda _ref, key=key: _hooks.pop(key, None))
        else:
            _hooks[callback] = callback


def _run_hooks() -> None:
    global _hooks_lock
    _hooks_lock = threading.Lock()
    for key, hook in _hooks.copy().items():    # copied in C: a weakref callback may drop a key
        fn = hook() if isinstance(hook, weakref.WeakMethod) else hook
        if fn is None:
            _hooks.pop(key, None)
            continue
        try:
            fn()
        except Exception:      # noqa: BLE001 - a fork must never fail in a store's hook
            log.exception("stem: after-fork reset %r failed", fn)


class _Slot:
    """One thread's connection; closed when the thread ends, in the process that opened it."""

    __slots__ = ("conn", "pid", "__weakref__")

    def __init__(self, conn: Any):
        self.conn = conn
        self.pid = os.getpid()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if os.getpid() != self.pid:
            _INHERITED.append(conn)
            return
        try:
            conn.close()
        except Exception:      # noqa: BLE001 - closing a broken connection
            pass

    def __del__(self):
        self.close()


class PerThread(Generic[C]):
    """One connection per thread and process: ``open()`` makes it on first use (or when
    ``usable(conn)`` says the one held is done for); it is closed (``conn.close()``) when its
    thread ends, on ``discard`` or on ``close``."""

    def __init__(self, open: Callable[[], C], usable: Callable[[C], bool] | None = None):
        self._open = open
        self._usable = usable
        self._start()
        after_fork_in_child(self._start)

    def _start(self) -> None:
        """Nothing held yet: at construction and in a forked child (whose inherited
        connections are dropped from here, and abandoned by their slots)."""
        self._pid = os.getpid()
        self._local = threading.local()
        self._slots: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._lock = threading.Lock()

    def get(self) -> C:
        """This thread's connection, opened if there is none (or it is not usable)."""
        if self._pid != os.getpid():   # forked without the hook (it runs on os.fork)
            self._start()
        slot = getattr(self._local, "slot", None)
        if slot is not None and slot.conn is not None and (self._usable is None or self._usable(slot.conn)):
            return slot.conn
        if slot is not None:
            slot.close()
        slot = _Slot(self._open())
        self._local.slot = slot
        with self._lock:
            self._slots.add(slot)
        return slot.conn

    def current(self) -> C | None:
        """This thread's connection if it has one open, else None."""
        slot = getattr(self._local, "slot", None)
        return None if slot is None or self._pid != os.getpid() else slot.conn

    def discard(self) -> None:
        """Close this thread's connection; the next ``get`` opens a new one."""
        slot = getattr(self._local, "slot", None)
        if slot is not None:
            slot.close()
            self._local.slot = None

    def connections(self) -> list[C]:
        """The connections open now, one per thread that used this holder."""
        with self._lock:
            slots = list(self._slots)
        return [s.conn for s in slots if s.conn is not None]

    def close(self) -> None:
        """Close every thread's connection (in the process that opened them)."""
        if self._pid != os.getpid():
            return
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            slot.close()
        self._local = threading.local()
