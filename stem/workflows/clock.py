"""The workflows' clock: wall time, plus an offset that tests can move (a test facility).

Durable sleeps, event deadlines, leases and the sweeper's "what is due" all read
``now()``, never ``time.time()`` directly, so a test can make two days pass without
waiting two days, in every process at once: set ``STEM_WF_CLOCK_FILE`` to a file's
path in the environment of the test and of the workers it starts (their children
inherit it), then ``advance(seconds)`` writes the new offset there and every
process reads it on its next ``now()``.  Without the variable (production) ``now()``
is ``time.time()`` and no file is read.

The broker's own delays (a timer's wake-up published with an ``eta``) stay in real
time: under a moved clock the sweeper, which reads this clock, is what wakes a
sleep that is due.
"""

from __future__ import annotations

import math
import os
import time

from ..errors import ConfigurationError

__all__ = ["ENV", "now", "offset", "set_offset", "advance"]

#: The environment variable naming the offset file (read on every call, never at import).
ENV = "STEM_WF_CLOCK_FILE"


def _path() -> str | None:
    return os.environ.get(ENV) or None


def offset() -> float:
    """Seconds the clock is ahead of wall time (0.0 without the variable or the file)."""
    path = _path()
    if path is None:
        return 0.0
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0.0
    except OSError as exc:
        raise ConfigurationError(f"cannot read the workflow clock file {path!r} ({ENV}): {exc}") from None
    try:
        value = float(text) if text else 0.0
    except ValueError:
        raise ConfigurationError(f"the workflow clock file {path!r} ({ENV}) holds {text[:40]!r}, "
                                 "not a number of seconds") from None
    if not math.isfinite(value):
        raise ConfigurationError(f"the workflow clock file {path!r} ({ENV}) holds {value!r}")
    return value


def now() -> float:
    """Epoch seconds: ``time.time()`` plus the test offset, if one is set."""
    if not os.environ.get(ENV):
        return time.time()
    return time.time() + offset()


def set_offset(seconds: float) -> None:
    """Write the offset (atomically: a reader sees the old value or the new one)."""
    path = _path()
    if path is None:
        raise ConfigurationError(f"set {ENV} to a file path before moving the workflow clock")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ConfigurationError(f"a clock offset is a finite number of seconds, got {seconds!r}")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(repr(float(seconds)))
    os.replace(tmp, path)


def advance(seconds: float) -> float:
    """Move the clock ``seconds`` ahead; returns the new offset."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ConfigurationError(f"advance takes a finite number of seconds, got {seconds!r}")
    new = offset() + float(seconds)
    set_offset(new)
    return new
