"""The limit options of a task (``TaskOptions`` fields), checked where the options are made.

The layer of ``stem.task``: no broker here.  ``stem.limits`` (above the brokers) turns the
options into the ``Limit`` a broker enforces; see its docstring for the semantics.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from .errors import InvalidTaskOptionsError

__all__ = ["RATE_SCOPES", "LIMIT_FIELDS", "BURST_SLACK_SECONDS", "MAX_KEY_LENGTH", "check_limit_options",
           "has_global_limit", "worker_rate", "default_burst"]

#: What ``TaskOptions.rate_scope`` takes: one bucket for the cluster (default), or one per worker.
RATE_SCOPES = ("global", "worker")

#: The options a limit is made of (a producer that sets any of them resolves a Limit).
LIMIT_FIELDS = ("rate_limit", "rate_key", "burst", "rate_scope", "concurrency_limit", "concurrency_key")

#: How late a worker may wake for a token without the cluster losing rate (see ``default_burst``).
BURST_SLACK_SECONDS = 0.1

#: The longest key (characters): ``stem.brokers.base.MAX_KEY_LENGTH``, which this layer cannot import
#: (tests/test_limits.py checks that the two agree).
MAX_KEY_LENGTH = 512


def _check_key(field: str, key: Any, options: Any) -> Any:
    """A key option as stored: a str, a tuple of argument names, or a callable."""
    if key is None or callable(key):
        return key
    if isinstance(key, str):
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            raise InvalidTaskOptionsError(f"{field} must be a non-empty string of at most {MAX_KEY_LENGTH} "
                                          f"characters, a list of argument names or a callable, got {key!r}")
        return key
    if isinstance(key, (list, tuple)) and key and all(isinstance(n, str) and n for n in key):
        if len(set(key)) != len(key):
            raise InvalidTaskOptionsError(f"{field} names an argument twice: {list(key)!r}")
        return tuple(key)
    raise InvalidTaskOptionsError(f"{field} must be a string, a non-empty list of argument names or a "
                                  f"callable (args, headers) -> str, got {key!r}")


def check_limit_options(options: Any) -> None:
    """``TaskOptions.__post_init__``'s part for limits: bad values raise
    ``InvalidTaskOptionsError`` when the options are made (at definition time).  A list key
    is stored as a tuple (options stay hashable)."""
    from . import _checks as checks
    from .task import parse_rate_limit
    rate_limit = options.rate_limit
    if rate_limit is not None:
        parse_rate_limit(rate_limit)
    for name in ("rate_key", "burst", "rate_scope"):
        if getattr(options, name) is not None and rate_limit is None:
            raise InvalidTaskOptionsError(f"{name} needs rate_limit")
    if options.rate_scope is not None and options.rate_scope not in RATE_SCOPES:
        raise InvalidTaskOptionsError(f"rate_scope must be one of {RATE_SCOPES}, got {options.rate_scope!r}")
    if options.burst is not None:
        checks.integer("burst", options.burst, minimum=1, error=InvalidTaskOptionsError)
    if options.rate_scope == "worker" and (options.rate_key is not None or options.burst is not None):
        raise InvalidTaskOptionsError(
            "rate_key and burst are options of a global rate limit; rate_scope='worker' is one token "
            "bucket per worker process and task name")
    if options.concurrency_limit is not None:
        checks.integer("concurrency_limit", options.concurrency_limit, minimum=1, error=InvalidTaskOptionsError)
    elif options.concurrency_key is not None:
        raise InvalidTaskOptionsError("concurrency_key needs concurrency_limit")
    for field in ("rate_key", "concurrency_key"):
        value = getattr(options, field)
        checked = _check_key(field, value, options)
        if checked is not value:
            msgspec.structs.force_setattr(options, field, checked)


def has_global_limit(options: Any) -> bool:
    """Whether the broker limits this task (a global rate limit, a concurrency limit)."""
    return (options.concurrency_limit is not None
            or (options.rate_limit is not None and options.rate_scope != "worker"))


def worker_rate(options: Any) -> float | None:
    """The per-worker token bucket's rate (tasks per second) when ``rate_scope="worker"``."""
    if options.rate_limit is None or options.rate_scope != "worker":
        return None
    return options.rate_per_second


def default_burst(rate: float) -> int:
    """``burst`` when the options leave it unset: one token, plus a tenth of a second's worth
    (2 up to 10/s, 6 at 50/s, 11 at 100/s).  Why not 1: with GCRA at burst 1 a lease is
    allowed only once its token is due and the next one is due 1/rate after the lease, so
    every ms a worker wakes late for a token (a network round trip, a blocking read's
    timer, a busy machine) is lost for good, and the cluster runs below its rate (50/s
    with 10 ms of lateness per token is 33/s).  With the slack, a worker that wakes up to
    0.1 s late finds the bucket still ahead of the clock and takes the tokens it missed: the
    overall rate is kept, and any window of ``w`` seconds still holds at most
    ``burst + rate * w`` leases.  ``burst=1`` gives strict spacing instead."""
    return 1 + math.ceil(rate * BURST_SLACK_SECONDS - 1e-9)
