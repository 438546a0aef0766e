"""Worker lifecycle settings, shutdown modes, and the OS signal handlers.

Shutdown timeline: the graceful phase (WARM: running tasks finish; SOFT:
running tasks are asked to stop) lasts at most ``soft_grace_period``; then the
worker goes HARD (children killed, every in-flight delivery requeued), and
that last phase is bounded by ``force_shutdown_after``.  A second SIGTERM or
SIGINT escalates one step at once.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import signal
import threading
from typing import Callable

from .. import _checks as checks
from ..errors import ConfigurationError

__all__ = ["ShutdownMode", "WorkerLifecycleConfig", "install_signal_handlers"]

log = logging.getLogger("stem.worker")


class ShutdownMode(str, enum.Enum):
    WARM = "warm"   # stop fetching, requeue what has not started, let running tasks finish
    SOFT = "soft"   # as WARM, and raise WorkerShutdown inside running tasks
    HARD = "hard"   # kill running tasks, requeue every in-flight delivery

    def escalate(self) -> "ShutdownMode":
        return {ShutdownMode.WARM: ShutdownMode.SOFT, ShutdownMode.SOFT: ShutdownMode.HARD}.get(
            self, ShutdownMode.HARD)

    @property
    def rank(self) -> int:
        return ("warm", "soft", "hard").index(self.value)


@dataclasses.dataclass(frozen=True)
class WorkerLifecycleConfig:
    install_signal_handlers: bool = True
    soft_grace_period: float = 30.0
    force_shutdown_after: float = 10.0
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None   # bytes of RSS

    def __post_init__(self) -> None:
        checks.flag("install_signal_handlers", self.install_signal_handlers)
        for name in ("soft_grace_period", "force_shutdown_after"):
            checks.seconds(name, getattr(self, name), inclusive=True)
        for name in ("max_tasks_per_child", "max_memory_per_child"):
            if getattr(self, name) is not None:
                checks.integer(name, getattr(self, name))


def install_signal_handlers(request_shutdown: Callable[[ShutdownMode], None]) -> Callable[[], None]:
    """SIGTERM -> WARM, SIGINT -> SOFT, SIGQUIT -> HARD; a repeat escalates.

    Only possible from the main thread; returns a function restoring the
    previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        raise ConfigurationError(
            "signal handlers can only be installed from the main thread; pass "
            "WorkerLifecycleConfig(install_signal_handlers=False) when embedding")
    state = {"mode": None}

    def handler(signum, frame):
        wanted = {signal.SIGTERM: ShutdownMode.WARM, signal.SIGINT: ShutdownMode.SOFT,
                  signal.SIGQUIT: ShutdownMode.HARD}[signum]
        current = state["mode"]
        if current is not None and wanted.rank <= current.rank:
            wanted = current.escalate()
        state["mode"] = wanted
        log.warning("received %s: %s shutdown", signal.Signals(signum).name, wanted.value)
        request_shutdown(wanted)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass

    return restore
