"""Waiting on many results at once: the machinery behind ``wait``, ``wait_many`` and ``watch``.

One ``WaitHub`` per backend instance holds every waiter of the process, by task
id (``id -> set of waiters``), so the cost of waiting does not grow with the
number of waiters:

* A waiter registers its ids *first*; only then are they read, so a status
  stored just before is seen by the read and one stored after is announced
  (pub/sub message, NOTIFY, in-process store) to the hub that already knows
  the id.  An id seen twice (read and announcement) counts once.
* Reads are batched and done by one reader thread (started lazily): the ids of
  new waiters, the ids a notification names (Postgres sends ids only), every
  waited id after a reconnect, and every waited id each ``poll`` interval
  while the backend has no live notifications (SQLite; Postgres or Redis while
  their listener reconnects).  One thread means one command connection, however
  many threads wait.
* A source with per-id subscriptions (Redis) is told which ids changed
  (``take_changes``) and answers with ``confirmed(ids)`` once it can no longer
  miss their announcements; the ids are read then.
* A waiter ends when its condition holds (``ALL``, ``FIRST_COMPLETED``,
  ``FIRST_EXCEPTION``, or any new arrival for ``watch``), at its deadline, or
  with ``BackendConnectionError`` when the backend stayed unreachable for
  ``fail_after`` seconds of its wait.

Each waiter has its own condition on the hub's lock: an arrival wakes the
waiters of that id only.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from .. import _checks as checks
from ..errors import BackendConnectionError, BackendError, ConfigurationError, StemError
from ..results import TaskState, TaskStatus
from ..stores.base import Backoff
from ..stores.local import after_fork_in_child

__all__ = ["RETURN_WHEN", "EXCEPTION_STATES", "WATCH", "Waiter", "WaitHub", "check_wait", "TASK_ID_MAX", "Watch"]

log = logging.getLogger("stem.backends")

#: What ``wait_many(return_when=...)`` takes.
RETURN_WHEN = ("ALL", "FIRST_COMPLETED", "FIRST_EXCEPTION")
#: The mode of a ``watch`` waiter: woken by every arrival.
WATCH = "WATCH"
#: The terminal states ``FIRST_EXCEPTION`` stops at.
EXCEPTION_STATES = frozenset({TaskState.FAILED, TaskState.DEAD, TaskState.REVOKED})
#: A task id's longest length (``Stem.enqueue``'s ``task_id``).
TASK_ID_MAX = 200
_READ_CHUNK = 1000
_FIRST_READ_GRACE_S = 10.0


def check_wait(task_ids: Any, timeout: Any, return_when: Any = "ALL", *,
               error: type[StemError] = ConfigurationError) -> tuple[list[str], float, str]:
    """The arguments of a wait on many ids: the ids (duplicates dropped, in input order), the
    timeout (finite seconds >= 0) and ``return_when``; ``error`` for anything else."""
    if isinstance(task_ids, (str, bytes)) or not isinstance(task_ids, Iterable):
        raise error(f"task_ids must be a collection of task id strings (not one string), got {task_ids!r}")
    ids = list(task_ids)
    for i in ids:
        if not isinstance(i, str) or not 0 < len(i) <= TASK_ID_MAX:
            raise error(f"a task id is a non-empty string of at most {TASK_ID_MAX} chars, got {i!r}")
    timeout = checks.seconds("timeout", timeout, inclusive=True, error=error)
    if return_when not in RETURN_WHEN:
        raise error(f"return_when must be one of {', '.join(RETURN_WHEN)}, got {return_when!r}")
    return list(dict.fromkeys(ids)), timeout, return_when


class Waiter:
    """One wait: its ids, what arrived, and a condition on the hub's lock (only the hub touches it)."""

    __slots__ = ("ids", "pending", "unseen", "done", "fresh", "mode", "cond", "error", "since", "failed",
                 "latest")

    def __init__(self, ids: list[str], mode: str, lock: Any, keep_latest: bool):
        self.ids = ids
        self.pending = set(ids)
        self.unseen = set(ids)                        # not read since it registered
        self.done: dict[str, TaskStatus] = {}        # in arrival order
        self.fresh: list[TaskStatus] = []             # arrived, not yet taken (watch)
        self.mode = mode
        self.cond = self._new_cond(lock)
        self.error: StemError | None = None
        self.since = time.monotonic()
        self.failed = False                           # a FAILED/DEAD/REVOKED arrived
        #: the newest non-terminal status seen (a one-id ``wait`` returns it at its timeout)
        self.latest: TaskStatus | None = None if keep_latest else False   # type: ignore[assignment]

    @staticmethod
    def _new_cond(lock: Any) -> Any:
        """What ``arrive`` and ``seen`` notify (the asyncio hub's waiters wake a future instead)."""
        return threading.Condition(lock)

    @property
    def satisfied(self) -> bool:
        if self.error is not None or not self.pending:
            return True
        if self.mode == "FIRST_COMPLETED":
            return bool(self.done)
        if self.mode == "FIRST_EXCEPTION":
            return self.failed
        if self.mode == WATCH:       # what the first reads found is handed out at once, in input order
            return bool(self.fresh) and not self.unseen
        return False

    def arrive(self, status: TaskStatus) -> None:
        if status.id not in self.pending:
            return
        self.pending.discard(status.id)
        self.done[status.id] = status
        if self.mode == WATCH:
            self.fresh.append(status)
        if status.state in EXCEPTION_STATES:
            self.failed = True
        first_reads_done = False
        if status.id in self.unseen:
            self.unseen.discard(status.id)
            first_reads_done = not self.unseen
            if first_reads_done and self.mode == WATCH and len(self.fresh) > 1:
                self._sort_fresh()     # the end of the first reads: nothing was handed out yet
        # the end of the first reads wakes the waiter as ``seen`` does: it slept past its
        # deadline for them, and must now see that deadline, not sleep out the grace
        if first_reads_done or self.satisfied:
            self.cond.notify()

    def seen(self, task_id: str) -> None:
        """The first read of ``task_id`` since this waiter registered is done."""
        if task_id in self.unseen:
            self.unseen.discard(task_id)
            if not self.unseen:
                if self.mode == WATCH and len(self.fresh) > 1:
                    self._sort_fresh()
                self.cond.notify()

    def _sort_fresh(self) -> None:
        position = {i: n for n, i in enumerate(self.ids)}
        self.fresh.sort(key=lambda s: position[s.id])


class WaitHub:
    """Every waiter of one backend instance, the reader thread, and the hooks of its notification source.

    ``read(ids)`` returns the stored statuses among ``ids`` (any state); ``poll()`` the
    interval to re-read every waited id at (None while notifications are live);
    ``on_change()`` is called (outside the lock) when ids were added or dropped, for a
    source that subscribes per id (it then calls ``take_changes``).  With ``inline`` the
    caller reads for its own waiters under ``lock`` (the memory backend) and there is no
    reader thread."""

    def __init__(self, *, name: str, read: Callable[[list[str]], Iterable[TaskStatus]] | None,
                 poll: Callable[[], float | None] = lambda: None, on_change: Callable[[], None] | None = None,
                 fail_after: float = 0.0, lock: Any = None, label: str = ""):
        self.name = name
        self.label = label
        self._read = read
        self._poll = poll
        self._on_change = on_change
        self._fail_after = fail_after
        self._given_lock = lock
        self._new_state()
        if lock is None:
            after_fork_in_child(self._new_state)

    def _new_state(self) -> None:
        """At construction and in a forked child (the parent's threads and waiters are not there)."""
        self._lock = self._given_lock if self._given_lock is not None else threading.Lock()
        self._work = threading.Condition(self._lock)          # the reader's
        self._waiters: dict[str, set[Waiter]] = {}
        self._dirty: dict[str, None] = {}      # ordered sets: ids are read in the order they came
        self._changed: dict[str, None] = {}
        self._down: dict[str, tuple[float, StemError]] = {}
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._polled_at = 0.0

    @property
    def lock(self) -> Any:
        return self._lock

    # -- waiters ------------------------------------------------------------------------
    def open(self, ids: list[str], mode: str, keep_latest: bool = False) -> Waiter:
        """Register a waiter on ``ids`` and have them read (after the source confirmed them,
        for a source that subscribes).  For an ``inline`` hub the caller holds ``lock`` and
        reads itself, then ``offer_locked``s what it found."""
        waiter = Waiter(ids, mode, self._lock, keep_latest)
        if self._read is None:
            waiter.unseen = set()
            self._add_locked(waiter)
            return waiter
        with self._lock:
            if self._closed:
                raise BackendError(f"the result backend ({self.label}) is closed")
            self._add_locked(waiter)
            if self._on_change is not None:
                self._changed.update(dict.fromkeys(ids))
            else:
                self._dirty.update(dict.fromkeys(ids))
                self._work.notify()
            self._start_reader_locked()
        if self._on_change is not None:
            self._on_change()
        return waiter

    def _add_locked(self, waiter: Waiter) -> None:
        waiters = self._waiters
        for i in waiter.ids:
            s = waiters.get(i)
            if s is None:
                waiters[i] = {waiter}
            else:
                s.add(waiter)

    def close(self, waiter: Waiter) -> None:
        """Unregister ``waiter`` (its ids nobody else waits on are dropped, unsubscribed)."""
        with self._lock:
            for i in waiter.pending:
                s = self._waiters.get(i)
                if s is None:
                    continue
                s.discard(waiter)
                if not s:
                    self._drop_locked(i)
            waiter.pending = set()
            waiter.unseen = set()
        self._changes_made()

    def _drop_locked(self, task_id: str) -> None:
        del self._waiters[task_id]
        self._dirty.pop(task_id, None)
        if self._on_change is not None:
            self._changed[task_id] = None

    def _changes_made(self) -> None:
        if self._on_change is not None and self._changed:
            self._on_change()

    def wait(self, waiter: Waiter, deadline: float) -> None:
        """Block until ``waiter`` is satisfied or ``deadline`` (monotonic) passes; raise its error."""
        with self._lock:
            self._block_locked(waiter, deadline)
            if waiter.error is not None:
                raise waiter.error

    def take(self, waiter: Waiter, deadline: float) -> list[TaskStatus]:
        """For ``watch``: wait for arrivals (as ``wait``) and return them, oldest first; [] when
        every id came or the deadline passed.  An error is raised once the arrivals before it
        were taken."""
        with self._lock:
            if not waiter.fresh:
                self._block_locked(waiter, deadline)
            fresh, waiter.fresh = waiter.fresh, []
            if not fresh and waiter.error is not None:
                raise waiter.error
            return fresh

    def _block_locked(self, waiter: Waiter, deadline: float) -> None:
        """Past the deadline a waiter still waits for the first read of its ids (a wait with
        timeout 0 is a read), for at most ``_FIRST_READ_GRACE_S``."""
        while not waiter.satisfied:
            now = time.monotonic()
            until = deadline if not waiter.unseen else max(deadline, waiter.since + _FIRST_READ_GRACE_S)
            if now >= until:
                return
            fail_at = self._fail_at_locked(waiter)
            if fail_at is not None and fail_at <= now:
                waiter.error = self._down_error_locked()
                return
            waiter.cond.wait((until if fail_at is None else min(until, fail_at)) - now)

    # -- arrivals -----------------------------------------------------------------------
    def offer(self, statuses: Iterable[TaskStatus]) -> None:
        """Hand statuses (read or announced) to the waiters of their ids."""
        with self._lock:
            self.offer_locked(statuses)
        self._changes_made()

    def offer_locked(self, statuses: Iterable[TaskStatus]) -> None:
        """``offer`` for a caller holding ``lock`` (an inline hub's backend; it calls
        ``changes_made`` itself only if it has a subscribing source, which it has not)."""
        waiters = self._waiters
        if not waiters:
            return
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
            self._drop_locked(s.id)

    def _offer_read(self, ids: list[str], statuses: Iterable[TaskStatus]) -> None:
        """A read of ``ids`` found ``statuses``: offer them, and tell the waiters of the ids
        not found that their first read is done."""
        position = {i: n for n, i in enumerate(ids)}
        found = sorted(statuses, key=lambda s: position.get(s.id, 0))     # as asked, not as stored
        with self._lock:
            self.offer_locked(found)
            for i in ids:
                for w in self._waiters.get(i, ()):
                    w.seen(i)
        self._changes_made()

    def waited_ids(self) -> list[str]:
        with self._lock:
            return list(self._waiters)

    def has_waiters(self) -> bool:
        return bool(self._waiters)

    # -- the source's side --------------------------------------------------------------------
    def take_changes(self) -> list[tuple[str, bool]]:
        """The ids added or dropped since the last call, each with whether it is waited on now."""
        with self._lock:
            changed, self._changed = self._changed, {}
            return [(i, i in self._waiters) for i in changed]

    def confirmed(self, ids: Iterable[str]) -> None:
        """Announcements of ``ids`` can no longer be missed: read them (those still waited on)."""
        self._mark(ids)

    def mark(self, ids: Iterable[str]) -> None:
        """A notification named ``ids``: read those still waited on."""
        self._mark(ids)

    def _mark(self, ids: Iterable[str]) -> None:
        with self._lock:
            before = len(self._dirty)
            self._dirty.update(dict.fromkeys(i for i in ids if i in self._waiters))
            if len(self._dirty) != before:
                self._work.notify()

    def reset(self) -> None:
        """The source (re)connected or may have missed announcements: re-read every waited id."""
        with self._lock:
            self._dirty.update(dict.fromkeys(self._waiters))
            self._work.notify()

    def kick(self) -> None:
        """Something changed that ``poll`` depends on (the listener went down or came back)."""
        with self._lock:
            self._work.notify()

    def down(self, who: str, error: StemError) -> None:
        """``who`` (the listener, the reader) cannot reach the backend: waiters that stay
        unable to for ``fail_after`` seconds of their wait end with ``error``."""
        with self._lock:
            first = who not in self._down
            self._down[who] = (self._down[who][0] if not first else time.monotonic(), error)
            if first:
                for ws in self._waiters.values():
                    for w in ws:
                        w.cond.notify()
                self._work.notify()

    def up(self, who: str) -> None:
        if who in self._down:
            with self._lock:
                self._down.pop(who, None)
                self._work.notify()

    def _fail_at_locked(self, waiter: Waiter) -> float | None:
        if not self._down:
            return None
        since = min(t for t, _ in self._down.values())
        return max(since, waiter.since) + self._fail_after

    def _down_error_locked(self) -> StemError:
        since, error = min(self._down.values(), key=lambda v: v[0])
        if isinstance(error, BackendConnectionError):
            return error
        return BackendConnectionError(f"result backend unreachable while waiting ({self.label}): {error}")

    # -- the reader ---------------------------------------------------------------------
    def _start_reader_locked(self) -> None:
        if self._reader is None and not self._stop.is_set():
            self._polled_at = time.monotonic()      # the first poll is one interval away
            self._reader = threading.Thread(target=self._read_loop, name=f"stem-wait-{self.name}", daemon=True)
            self._reader.start()

    def _next_ids_locked(self) -> list[str] | None:
        """Block until there is something to read (None: stopped)."""
        while not self._closed:
            now = time.monotonic()
            interval = self._poll() if self._waiters else None
            if interval is not None and now >= self._polled_at + interval:
                self._dirty.update(dict.fromkeys(self._waiters))
            if self._dirty:
                if len(self._dirty) >= len(self._waiters):
                    self._polled_at = now
                ids = list(self._dirty)
                self._dirty.clear()
                return ids
            self._work.wait(None if interval is None else self._polled_at + interval - now)
        return None

    def _read_loop(self) -> None:
        backoff: Backoff | None = None
        read = self._read
        assert read is not None
        while True:
            with self._lock:
                ids = self._next_ids_locked()
            if ids is None:
                return
            try:
                for start in range(0, len(ids), _READ_CHUNK):
                    with self._lock:    # ids whose waiters all left meanwhile are skipped
                        chunk = [i for i in ids[start:start + _READ_CHUNK] if i in self._waiters]
                    if chunk:
                        self._offer_read(chunk, read(chunk))
            except StemError as exc:
                with self._lock:
                    self._dirty.update(dict.fromkeys(i for i in ids if i in self._waiters))
                self.down("reader", exc)
                log.debug("stem: reading waited statuses failed (%s); retrying", exc)
                backoff = backoff or Backoff()
                if self._stop.wait(backoff.next()):
                    return
                continue
            except Exception:    # noqa: BLE001 - the reader must outlive a bug in one read
                log.exception("stem: reading waited statuses failed")
                with self._lock:
                    self._dirty.update(dict.fromkeys(i for i in ids if i in self._waiters))
                if self._stop.wait(1.0):
                    return
                continue
            backoff = None
            self.up("reader")

    def stop(self) -> None:
        """The backend closes: the reader ends, every waiter ends with ``BackendError``."""
        with self._lock:
            self._closed = True
            self._stop.set()
            self._work.notify_all()
            error = BackendError(f"the result backend ({self.label}) was closed while waiting")
            for ws in self._waiters.values():
                for w in ws:
                    if w.error is None:
                        w.error = error
                    w.cond.notify()
            reader, self._reader = self._reader, None
        if reader is not None and reader is not threading.current_thread():
            reader.join(5.0)


class Watch(Iterator[TaskStatus]):
    """What ``ResultBackend.watch`` returns: each terminal status as it arrives, until every id
    came or the deadline passed.  Its waiter is closed when it ends, on ``close()``, or when
    the iterator is dropped, started or not."""

    def __init__(self, hub: WaitHub, waiter: Waiter, deadline: float):
        self._hub = hub
        self._waiter = waiter
        self._deadline = deadline
        self._ready: collections.deque[TaskStatus] = collections.deque()
        self._closed = False

    def __next__(self) -> TaskStatus:
        while not self._ready:
            if self._closed:
                raise StopIteration
            try:
                got = self._hub.take(self._waiter, self._deadline)
            except BaseException:
                self.close()
                raise
            if not got and (time.monotonic() >= self._deadline or not self._waiter.pending):
                self.close()
                raise StopIteration
            self._ready.extend(got)
        return self._ready.popleft()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub.close(self._waiter)

    def __del__(self) -> None:
        self.close()
