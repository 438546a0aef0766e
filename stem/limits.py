"""Rate and concurrency limits of a task: its options, checked, and resolved into a ``Limit``.

``TaskOptions(rate_limit="100/s", rate_key=..., burst=..., rate_scope="global")`` and
``TaskOptions(concurrency_limit=N, concurrency_key=...)`` describe the limits; the broker
enforces them before it leases a message (see "Limits" in ``stem.brokers.base``), so a limit
holds for the whole cluster, a throttled task never holds a lease, never counts against a
worker's prefetch and never uses up an attempt.

``burst`` is how many leases one key may take at once after an idle spell; unset, one plus
a tenth of a second's worth of tokens (``default_burst``), so that workers waking a little
late for each token still keep the rate.

A key (``rate_key`` / ``concurrency_key``) is one of:

* a ``str``: the key as given.  Tasks that name the same key share one bucket (or one set of
  slots), e.g. every task that calls one API: ``rate_key="stripe"``;
* a list of argument names: the task name plus the canonical values of those arguments, e.g.
  ``["tenant"]`` -> ``"report.build[tenant='acme']"`` (one bucket per tenant);
* a callable ``(args, headers) -> str``: its value is the key as given;
* unset: the task name.

Keys are scoped to the queue by the broker.  ``rate_scope="worker"`` keeps the old per-worker
token bucket (each worker process runs the task at most ``rate_limit``; N workers make N
times that): an opt-in for limits that protect the worker itself, not a shared resource.

``resolve_limit(name, options, args, headers)`` is what the producer calls per task (the
worker too, for a delivery whose producer did not know the task's options); its cost for a
task without limits is one attribute test (``limit_resolver`` returns None once per
(name, options) and the caller caches that).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable

import msgspec

from .brokers.base import MAX_KEY_LENGTH, Limit
from .errors import InvalidTaskOptionsError
from .limit_options import (BURST_SLACK_SECONDS, LIMIT_FIELDS, RATE_SCOPES, check_limit_options, default_burst,
                            has_global_limit, worker_rate)

__all__ = ["RATE_SCOPES", "LIMIT_FIELDS", "BURST_SLACK_SECONDS", "check_limit_options", "limit_resolver",
           "resolve_limit", "has_global_limit", "worker_rate", "default_burst"]

_canonical = msgspec.msgpack.Encoder(order="sorted").encode
_SCALARS = (str, int, float, bool, type(None))


def _render(value: Any) -> str | None:
    """A short readable form of one argument's value, or None when it has none."""
    if isinstance(value, _SCALARS) and not isinstance(value, float):
        text = repr(value)
        return text if len(text) <= 64 else None
    if isinstance(value, float) and value == value:
        return repr(value)
    return None


def _key_maker(field: str, name: str, key: Any) -> Callable[[dict, dict], str]:
    if key is None:
        return lambda args, headers: name
    if isinstance(key, str):
        return lambda args, headers: key
    if callable(key):
        def call(args: dict, headers: dict) -> str:
            try:
                value = key(args, headers)
            except Exception as exc:
                raise InvalidTaskOptionsError(f"{field} of task {name!r} raised {exc!r}") from exc
            if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_LENGTH:
                raise InvalidTaskOptionsError(
                    f"{field} of task {name!r} must return a non-empty string of at most {MAX_KEY_LENGTH} "
                    f"characters, got {value!r}")
            return value
        return call
    names = key

    def from_args(args: dict, headers: dict) -> str:
        missing = [n for n in names if n not in args]
        if missing:
            raise InvalidTaskOptionsError(f"{field} of task {name!r} names {missing}, which the args "
                                          f"{sorted(args)} do not have")
        parts = [_render(args[n]) for n in names]
        if all(p is not None for p in parts):
            text = f"{name}[{','.join(f'{n}={p}' for n, p in zip(names, parts))}]"
            if len(text) <= MAX_KEY_LENGTH:
                return text
        try:
            data = _canonical([args[n] for n in names])
        except (TypeError, msgspec.EncodeError) as exc:
            raise InvalidTaskOptionsError(f"{field} of task {name!r}: the values of {list(names)} must be "
                                          f"msgpack values: {exc}") from None
        return f"{name[:MAX_KEY_LENGTH - 40]}[#{hashlib.blake2b(data, digest_size=16).hexdigest()}]"
    return from_args


@functools.lru_cache(maxsize=1024)
def limit_resolver(name: str, options: Any) -> Callable[[dict, dict], Limit] | None:
    """A function (args, headers) -> Limit for task ``name`` under its merged ``options``,
    or None when the broker does not limit it (no limit, or a per-worker rate only).  Made
    once per (name, options): the per-task cost is the key functions only."""
    if not has_global_limit(options):
        return None
    rate = burst = None
    rate_of = None
    if options.rate_limit is not None and options.rate_scope != "worker":
        rate = options.rate_per_second
        burst = default_burst(rate) if options.burst is None else options.burst
        rate_of = _key_maker("rate_key", name, options.rate_key)
    concurrency = options.concurrency_limit
    concurrency_of = None if concurrency is None else _key_maker("concurrency_key", name, options.concurrency_key)
    new = tuple.__new__

    if concurrency_of is None:
        return lambda args, headers: new(Limit, (rate_of(args, headers), rate, burst, None, 0))
    if rate_of is None:
        return lambda args, headers: new(Limit, (None, 0.0, 1, concurrency_of(args, headers), concurrency))
    return lambda args, headers: new(Limit, (rate_of(args, headers), rate, burst,
                                             concurrency_of(args, headers), concurrency))


def resolve_limit(name: str, options: Any, args: dict[str, Any] | None,
                  headers: dict[str, str] | None = None) -> Limit | None:
    """The Limit task ``name`` with merged ``options`` is leased under, for ``args`` and
    ``headers``; None when the broker does not limit it.  ``InvalidTaskOptionsError`` when a
    key cannot be made (an argument it names is missing, a callable raises or returns
    something else than a non-empty string)."""
    resolver = limit_resolver(name, options)
    if resolver is None:
        return None
    return resolver(args or {}, headers or {})
