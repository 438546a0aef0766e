"""The supervisor's side of the zygote: the one it forks children from, and its successors.

Why the worker outlives its zygote, and when it does not, is told in
``stem.worker.zygote``; this module holds that policy for the process pool:
the first zygote is forked at start, a dead one is reaped and replaced by a
fresh-interpreter zygote (``Zygote.spawn``), children asked for meanwhile are
owed until it says ``ready``, and the pool is told to stop when replacing
cannot work.  The pidfd helpers below watch and signal the children a dead
zygote left behind.
"""

from __future__ import annotations

import select
import signal
import time
from collections import deque
from typing import Any, Callable

from ..errors import WorkerError
from .channel import ChannelHandle
from .zygote import GONE, Zygote, ZygoteGone

__all__ = ["ZygoteKeeper", "MAX_ZYGOTE_DEATHS", "ZYGOTE_DEATH_WINDOW", "signal_pidfd", "exited_pidfds",
           "wait_pidfds"]

#: The worker stops rather than start another zygote after this many zygote deaths
#: within ZYGOTE_DEATH_WINDOW seconds: something kills them on purpose.
MAX_ZYGOTE_DEATHS = 3
ZYGOTE_DEATH_WINDOW = 60.0


class ZygoteKeeper:
    """The pool's current zygote (``zygote``), and a new one each time it dies.

    Used on the thread that turns the pool, except ``fork``, which the control
    thread may call too (``resize``), under the pool's lock."""

    def __init__(self, child_main: Callable[..., int], registry: Any, *, startup_timeout: float,
                 normal_policy: Callable[[], bool]):
        self._child_main = child_main
        self._registry = registry            # its 'module:attribute' path, else the TaskRegistry
        self._startup_timeout = startup_timeout
        self._normal_policy = normal_policy
        self.zygote: Zygote | None = None
        self.deaths = 0
        self._recent: deque[float] = deque(maxlen=MAX_ZYGOTE_DEATHS)
        self._fatal: str | None = None
        self._deadline = 0.0

    def start(self) -> None:
        """Fork the first zygote (before the supervisor starts threads)."""
        zygote = Zygote(self._child_main)
        zygote.start()
        self.zygote = zygote

    @property
    def pid(self) -> int | None:
        return self.zygote.pid if self.zygote is not None else None

    @property
    def ready(self) -> bool:
        """A zygote can fork now (False while a new one loads, or after one died)."""
        return self.zygote is not None and self.zygote.ready

    def fileno(self) -> int | None:
        """The socket to poll for events, while a zygote is alive."""
        zygote = self.zygote
        return zygote.fileno() if zygote is not None and not zygote.gone else None

    def fork(self, handle: ChannelHandle, params: dict[str, Any]) -> tuple[int, int | None]:
        zygote = self.zygote   # (the pool's thread may replace it meanwhile)
        if zygote is None:
            raise ZygoteGone("no zygote to fork a child from (it died; a new one is not started yet)")
        return zygote.fork(handle, params)

    def events(self) -> tuple[list[tuple[int, int]], str | None]:
        """The exits the zygote reported (pid, exit code), and what became of it:
        "gone" (died: call ``succeed`` or ``bury``), "ready" (a new one can fork now),
        "late" (a new one is not ready within the startup timeout: give up), else None."""
        zygote = self.zygote
        if zygote is None:
            return [], None
        exits, status = [], None
        for event in zygote.events():
            kind = event[0]
            if kind == "exited":
                exits.append((event[1], event[2]))
            elif kind == "ready":
                status = status or "ready"
            elif kind == "fatal":
                self._fatal = event[1]
            elif event is GONE:
                status = "gone"
        if status is None and not zygote.was_ready and time.monotonic() > self._deadline:
            status = "late"
        return exits, status

    def bury(self) -> tuple[int | None, int | None]:
        """Reap the dead (or late) zygote: its pid and exit code.  Counts the death."""
        zygote, self.zygote = self.zygote, None
        if zygote is None:
            return None, None
        pid, was_ready = zygote.pid, zygote.was_ready
        code = zygote.close()
        self.deaths += 1
        self._recent.append(time.monotonic())
        if not was_ready:
            fatal, self._fatal = self._fatal, None
            raise WorkerError(f"the new zygote process (pid {pid}) exited (code {code}) before it was ready"
                              + (f": {fatal}" if fatal else ""))
        return pid, code

    def succeed(self) -> Zygote:
        """Start a new zygote (after ``bury``); raises WorkerError with the reason when the
        worker should stop instead."""
        recent = self._recent
        if len(recent) == MAX_ZYGOTE_DEATHS and recent[-1] - recent[0] < ZYGOTE_DEATH_WINDOW:
            raise WorkerError(f"the zygote process died {MAX_ZYGOTE_DEATHS} times within "
                              f"{ZYGOTE_DEATH_WINDOW:.0f}s")
        try:
            zygote = Zygote.spawn(self._registry, normal_policy=self._normal_policy())
        except Exception as exc:  # noqa: BLE001 - e.g. a registry that cannot be pickled
            raise WorkerError(f"a new zygote cannot be started: {exc!r}; pass the registry as a "
                              f"'module:attribute' path so a fresh process can load it") from None
        self._fatal = None
        self._deadline = time.monotonic() + self._startup_timeout
        self.zygote = zygote
        return zygote

    def late(self) -> str:
        """Give up a new zygote that did not get ready in time: the reason."""
        zygote, self.zygote = self.zygote, None
        if zygote is not None:
            zygote.close(timeout=0)   # alive, but of no use: killed
        return f"the new zygote process did not get ready within {self._startup_timeout:g}s"

    def stop(self, timeout: float) -> None:
        if self.zygote is not None:
            self.zygote.stop(timeout)


# -- pidfds: the children a dead zygote left (Linux) -------------------------------------------
def signal_pidfd(pidfd: int, sig: int) -> None:
    """Signal the very process ``pidfd`` names (nothing if it exited)."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except OSError:   # ESRCH: it exited already
        pass


def exited_pidfds(pidfds: list[int], timeout: float = 0.0) -> set[int]:
    """Those of ``pidfds`` whose process exited (a pidfd turns readable), waiting up to ``timeout``."""
    if not pidfds:
        return set()
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _ in poller.poll(timeout * 1000)}


def wait_pidfds(pidfds: list[int], timeout: float) -> None:
    """Wait until every process of ``pidfds`` exited, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    left = set(pidfds)
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        left -= exited_pidfds(list(left), remaining)
