"""The checks every public entry point runs on what it is given, written once.

Each check raises the ``StemError`` subclass its caller names (``error``:
``ConfigurationError`` for settings and constructors, ``InvalidTaskOptionsError``
for task options and enqueue arguments, ``ControlError`` for commands), with a
message that names the value and what would be accepted.  ``bool`` is never a
number here (``True`` is an ``int`` to Python, not to a user), and neither is
NaN or an infinity.  The defaults several modules share live here too.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ConfigurationError, StemError

__all__ = ["QUEUE_NAME", "TASK_NAME", "DEFAULT_QUEUE", "DEFAULT_RESULT_EXPIRES", "DEFAULT_PREFETCH_MULTIPLIER",
           "SCHEDULE_ID", "is_number", "seconds", "optional_seconds", "integer", "flag", "queue_name", "task_name",
           "schedule_id", "ms"]

#: Queue names: 1-128 characters, safe in Redis keys, SQL values and file names.
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
#: Schedule ids: the same alphabet and length as queue names (they become Redis keys, SQL values
#: and parts of run ids).
SCHEDULE_ID = QUEUE_NAME
#: Task names: a letter or _, then letters, digits and _ . : - (200 at most).
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,199}")

DEFAULT_QUEUE = "default"
#: How long a stored status lives (one day).
DEFAULT_RESULT_EXPIRES = 86400.0
#: The fewest tasks per child a worker leases (the prefetch window's floor).
DEFAULT_PREFETCH_MULTIPLIER = 4


def is_number(value: Any) -> bool:
    """An int or a float that is finite; never a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:           # an int too large for a float
        return False


def seconds(name: str, value: Any, *, minimum: float = 0.0, inclusive: bool = False,
            error: type[StemError] = ConfigurationError) -> float:
    """``value`` as float seconds, finite and > ``minimum`` (>= with ``inclusive``)."""
    if not is_number(value) or (value < minimum if inclusive else value <= minimum):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise error(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return float(value)


def optional_seconds(name: str, value: Any, *, minimum: float = 0.0, inclusive: bool = False,
                     error: type[StemError] = ConfigurationError) -> float | None:
    """``seconds``, or None when ``value`` is None (not set)."""
    return None if value is None else seconds(name, value, minimum=minimum, inclusive=inclusive, error=error)


def integer(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None,
            error: type[StemError] = ConfigurationError) -> int:
    """``value`` as an int within ``minimum``..``maximum``; never a bool or a float."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f">= {minimum}" if maximum is None else f"{minimum}..{maximum}"
        raise error(f"{name} must be an integer {bound}, got {value!r}")
    return value


def flag(name: str, value: Any, *, error: type[StemError] = ConfigurationError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, got {value!r}")
    return value


def queue_name(name: Any, *, error: type[StemError] = ConfigurationError) -> str:
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise error(f"bad queue name {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -")
    return name


def task_name(name: Any, *, error: type[StemError] = ConfigurationError) -> str:
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise error(f"bad task name {name!r}: start with a letter or _, then letters, digits, _ . : - "
                    "(max 200)")
    return name


def schedule_id(value: Any, *, error: type[StemError] = ConfigurationError) -> str:
    if not isinstance(value, str) or not SCHEDULE_ID.fullmatch(value):
        raise error(f"bad schedule id {value!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -")
    return value


def ms(value: float) -> int:
    """Seconds as whole milliseconds, at least 1 (a lease or TTL of 0 ms means "none" to Redis)."""
    return max(int(round(value * 1000)), 1)
