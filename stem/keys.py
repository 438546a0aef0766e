"""The keys a producer publishes tasks under (``Broker.publish_keyed``): unique tasks and ids.

Two kinds, both scoped to the task's queue by the broker:

* a **unique key** (``TaskOptions(unique=True)``) names what makes two tasks the same:
  by default the task name, the queue and the arguments, encoded as msgpack with
  sorted keys so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` agree; headers and
  meta never count (a per-request trace id must not defeat it).  ``unique_key``
  narrows it to some argument names, or hands the args to a callable whose value
  is hashed instead.  The key lives until the task ends (or starts, with
  ``unique_until="started"``), and at most ``unique_for`` seconds after the task is
  due: the safety net for a task that never ends, counted from when it may run, so
  a countdown cannot outlast it.
* an **id key**: a task published under an explicit ``task_id`` claims the id, so a
  second task with it is refused while the first is queued or running, and for as
  long as its result is stored after (``linger``): an id is an idempotency key.

The hash is BLAKE2b (128 bits): keys stay short whatever the arguments weigh, and
the bytes hashed start with the task name, so two tasks never share a key by chance.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from .errors import InvalidTaskOptionsError

__all__ = ["DEFAULT_UNIQUE_FOR", "ID_KEY_TTL", "unique_key", "id_key", "unique_ttl", "id_ttl"]

#: How long a unique key may live after its task is due, when ``unique_for`` is not set.
DEFAULT_UNIQUE_FOR = 3600.0
#: How long an id key may live after its task is due, before its result's lifetime starts.
ID_KEY_TTL = 7 * 86400.0

_canonical = msgspec.msgpack.Encoder(order="sorted").encode


def _digest(*parts: Any) -> str:
    try:
        data = _canonical(parts)
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidTaskOptionsError(f"a unique key must be made of msgpack values: {exc}") from None
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def unique_key(name: str, queue: str, args: dict[str, Any], key: Any = None) -> str:
    """The unique key of task ``name`` on ``queue`` with ``args``, shaped by
    ``TaskOptions.unique_key`` (``key``): None (all args), argument names, or a callable."""
    if key is None:
        return "u:" + _digest(name, queue, args)
    if callable(key):
        try:
            value = key(args)
        except Exception as exc:
            raise InvalidTaskOptionsError(f"unique_key of {name!r} raised {exc!r}") from exc
        return "u:" + _digest(name, queue, "fn", value)
    missing = [n for n in key if n not in args]
    if missing:
        raise InvalidTaskOptionsError(
            f"unique_key of {name!r} names {missing}, which the args {sorted(args)} do not have")
    return "u:" + _digest(name, queue, "names", {n: args[n] for n in key})


def id_key(task_id: str) -> str:
    return "id:" + task_id


def unique_ttl(unique_for: float | None, delay: float) -> float:
    """A unique key's ttl: ``unique_for`` (default one hour) past the moment the task is due."""
    return max(delay, 0.0) + (DEFAULT_UNIQUE_FOR if unique_for is None else unique_for)


def id_ttl(delay: float) -> float:
    return max(delay, 0.0) + ID_KEY_TTL
