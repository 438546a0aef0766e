"""Waiting on results from asyncio: ``WaitHub``'s rules on one event loop, no thread.

``AsyncWaitHub`` keeps the contract of ``stem.backends.waiting`` (register the
ids first, read them after, so nothing stored around the call is missed; one
set of waiters per id; ``ALL`` / ``FIRST_COMPLETED`` / ``FIRST_EXCEPTION`` /
``WATCH``; a first read even for a wait of timeout 0; ``BackendConnectionError``
after ``fail_after`` seconds of an unreachable backend) and reuses its
``Waiter`` (the same ``arrive`` / ``satisfied`` logic); only the blocking
differs: a waiter awaits an ``asyncio.Event`` instead of a condition.

Its source (``stem.backends.redis_async``, ``stem.backends.postgres_async``,
or none: polling) plugs in through three hooks:

* ``read(ids)``: a coroutine returning the stored statuses among ``ids``;
  run by one reader task, in chunks, for every id marked dirty.
* ``on_change()``: called when ids were added or dropped (the source then
  ``take_changes()`` and subscribes / unsubscribes); a source that has it
  calls ``confirmed(ids)`` once an id's announcements can no longer be missed,
  and only then is it read.  Without it, new ids are read at once.
* ``poll()``: the interval to re-read every waited id at, or None while
  announcements are live.

A cancelled waiting coroutine unregisters its waiter in ``finally`` (``close``):
its ids nobody else waits on are dropped and unsubscribed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

from ..errors import BackendConnectionError, BackendError, StemError
from ..results import TaskStatus
from ..stores.base import Backoff
from .waiting import Waiter

__all__ = ["AsyncWaitHub", "AsyncWaiter", "wait_event"]

log = logging.getLogger("stem.backends")

_READ_CHUNK = 1000
_FIRST_READ_GRACE_S = 10.0


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds (None: no limit); whether it was set.
    (``asyncio.timeout``, not ``wait_for``: no inner task, so a cancel lands at once.)"""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False


class _Wake:
    """What ``Waiter`` notifies: the future its waiting coroutine awaits, made only while it
    waits (10,000 pending waits are 10,000 small objects, not 10,000 events)."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future | None = None

    def notify(self) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until notified or ``timeout`` seconds pass (check the condition before: no await
        lies between that check and this future, so no notification is lost)."""
        self.future = future = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            pass
        finally:
            self.future = None


class AsyncWaiter(Waiter):
    """A ``Waiter`` whose ``cond`` wakes the coroutine waiting on it."""

    __slots__ = ()

    def __init__(self, ids: list[str], mode: str, keep_latest: bool):
        super().__init__(ids, mode, None, keep_latest)

    @staticmethod
    def _new_cond(lock: Any) -> _Wake:
        return _Wake()


class AsyncWaitHub:
    """Every asyncio waiter of one ``AsyncStem`` on one backend, and the reader task."""

    def __init__(self, *, read: Callable[[list[str]], Awaitable[list[TaskStatus]]],
                 poll: Callable[[], float | None] = lambda: None, on_change: Callable[[], None] | None = None,
                 fail_after: float = 10.0, label: str = ""):
        self.label = label
        self._read = read
        self._poll = poll
        self._on_change = on_change
        self._fail_after = fail_after
        self._waiters: dict[str, set[AsyncWaiter]] = {}
        self._dirty: dict[str, None] = {}
        self._changed: dict[str, None] = {}
        self._down: dict[str, tuple[float, StemError]] = {}
        self._work: asyncio.Event | None = None
        self._reader: asyncio.Task | None = None
        self._closed = False

    # -- waiters ------------------------------------------------------------------------
    def open(self, ids: list[str], mode: str, keep_latest: bool = False) -> AsyncWaiter:
        if self._closed:
            raise BackendError(f"the result backend ({self.label}) is closed")
        waiter = AsyncWaiter(ids, mode, keep_latest)
        for i in ids:
            s = self._waiters.get(i)
            if s is None:
                self._waiters[i] = {waiter}
            else:
                s.add(waiter)
        if self._on_change is not None:
            self._changed.update(dict.fromkeys(ids))
            self._on_change()
        else:
            self._mark(ids)
        self._start_reader()
        return waiter

    def close(self, waiter: AsyncWaiter) -> None:
        """Unregister ``waiter`` (its ids nobody else waits on are dropped, unsubscribed)."""
        for i in waiter.pending:
            s = self._waiters.get(i)
            if s is None:
                continue
            s.discard(waiter)
            if not s:
                self._drop(i)
        waiter.pending = set()
        waiter.unseen = set()
        if self._on_change is not None and self._changed:
            self._on_change()

    def _drop(self, task_id: str) -> None:
        del self._waiters[task_id]
        self._dirty.pop(task_id, None)
        if self._on_change is not None:
            self._changed[task_id] = None

    async def wait(self, waiter: AsyncWaiter, deadline: float) -> None:
        """Until ``waiter`` is satisfied or ``deadline`` (monotonic) passes; raise its error.
        Past the deadline it still waits for the first read of its ids (at most
        ``_FIRST_READ_GRACE_S``), as ``WaitHub`` does."""
        wake = waiter.cond
        while not waiter.satisfied:
            now = time.monotonic()
            until = deadline if not waiter.unseen else max(deadline, waiter.since + _FIRST_READ_GRACE_S)
            if now >= until:
                break
            fail_at = self._fail_at(waiter)
            if fail_at is not None and fail_at <= now:
                waiter.error = self._down_error()
                break
            await wake.wait((until if fail_at is None else min(until, fail_at)) - now)
        if waiter.error is not None:
            raise waiter.error

    async def take(self, waiter: AsyncWaiter, deadline: float) -> list[TaskStatus]:
        """For ``as_completed``: the arrivals (after waiting for some, as ``wait``), oldest first;
        [] when every id came or the deadline passed."""
        if not waiter.fresh:
            try:
                await self.wait(waiter, deadline)
            except StemError:
                if not waiter.fresh:
                    raise
        fresh, waiter.fresh = waiter.fresh, []
        return fresh

    # -- arrivals -----------------------------------------------------------------------
    def offer(self, statuses: Iterable[TaskStatus]) -> None:
        """Statuses read or announced: to the waiters of their ids."""
        waiters = self._waiters
        for s in statuses:
            ws = waiters.get(s.id)
            if not ws:
                continue
            if not s.is_terminal:
                for w in ws:
                    if w.latest is not False:
                        w.latest = s
                continue
            for w in ws:
                w.arrive(s)
            self._drop(s.id)
        if self._on_change is not None and self._changed:
            self._on_change()

    def _offer_read(self, ids: list[str], statuses: Iterable[TaskStatus]) -> None:
        position = {i: n for n, i in enumerate(ids)}
        self.offer(sorted(statuses, key=lambda s: position.get(s.id, 0)))
        for i in ids:
            for w in self._waiters.get(i, ()):
                w.seen(i)

    def waited_ids(self) -> list[str]:
        return list(self._waiters)

    def has_waiters(self) -> bool:
        return bool(self._waiters)

    # -- the source's side --------------------------------------------------------------------
    def take_changes(self) -> list[tuple[str, bool]]:
        """The ids added or dropped since the last call, each with whether it is waited on now."""
        changed, self._changed = self._changed, {}
        return [(i, i in self._waiters) for i in changed]

    def confirmed(self, ids: Iterable[str]) -> None:
        """Announcements of ``ids`` can no longer be missed: read them (those still waited on)."""
        self._mark(ids)

    def mark(self, ids: Iterable[str]) -> None:
        """A notification named ``ids``: read those still waited on."""
        self._mark(ids)

    def reset(self) -> None:
        """The source (re)connected or may have missed announcements: re-read every waited id."""
        self._mark(list(self._waiters))

    def _mark(self, ids: Iterable[str]) -> None:
        before = len(self._dirty)
        self._dirty.update(dict.fromkeys(i for i in ids if i in self._waiters))
        if len(self._dirty) != before:
            self.kick()

    def kick(self) -> None:
        if self._work is not None:
            self._work.set()

    def down(self, who: str, error: StemError) -> None:
        if who not in self._down:
            self._down[who] = (time.monotonic(), error)
            for ws in self._waiters.values():
                for w in ws:
                    w.cond.notify()
            self.kick()

    def up(self, who: str) -> None:
        if self._down.pop(who, None) is not None:
            self.kick()

    def _fail_at(self, waiter: AsyncWaiter) -> float | None:
        if not self._down:
            return None
        since = min(t for t, _ in self._down.values())
        return max(since, waiter.since) + self._fail_after

    def _down_error(self) -> StemError:
        _, error = min(self._down.values(), key=lambda v: v[0])
        if isinstance(error, BackendConnectionError):
            return error
        return BackendConnectionError(f"result backend unreachable while waiting ({self.label}): {error}")

    # -- the reader ---------------------------------------------------------------------
    def _start_reader(self) -> None:
        if self._reader is None and not self._closed:
            self._work = asyncio.Event()
            self._work.set()
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="stem-aio-wait-reader")

    async def _next_ids(self, polled_at: float) -> tuple[list[str], float]:
        work = self._work
        assert work is not None
        while True:
            now = time.monotonic()
            interval = self._poll() if self._waiters else None
            if interval is not None and now >= polled_at + interval:
                self._dirty.update(dict.fromkeys(self._waiters))
                polled_at = now
            if self._dirty:
                ids = list(self._dirty)
                self._dirty.clear()
                return ids, polled_at
            work.clear()
            await wait_event(work, None if interval is None else polled_at + interval - now)

    async def _read_loop(self) -> None:
        backoff: Backoff | None = None
        polled_at = time.monotonic()
        while True:
            ids, polled_at = await self._next_ids(polled_at)
            try:
                for start in range(0, len(ids), _READ_CHUNK):
                    chunk = [i for i in ids[start:start + _READ_CHUNK] if i in self._waiters]
                    if chunk:
                        self._offer_read(chunk, await self._read(chunk))
            except StemError as exc:
                self._dirty.update(dict.fromkeys(i for i in ids if i in self._waiters))
                self.down("reader", exc)
                log.debug("stem: reading waited statuses failed (%s); retrying", exc)
                backoff = backoff or Backoff()
                await asyncio.sleep(backoff.next())
                continue
            except Exception:    # noqa: BLE001 - the reader must outlive a bug in one read
                log.exception("stem: reading waited statuses failed")
                self._dirty.update(dict.fromkeys(i for i in ids if i in self._waiters))
                await asyncio.sleep(1.0)
                continue
            backoff = None
            self.up("reader")

    async def stop(self) -> None:
        """The producer closes: the reader ends, every waiter ends with ``BackendError``."""
        self._closed = True
        error = BackendError(f"the result backend ({self.label}) was closed while waiting")
        for ws in self._waiters.values():
            for w in ws:
                if w.error is None:
                    w.error = error
                w.cond.notify()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - it is being stopped
                pass
