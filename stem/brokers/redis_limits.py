"""The Redis broker's limit lanes, client side: the arguments and replies of the scripts that
keep them.

Everything that decides (lanes, GCRA buckets, concurrency slots, round robin) runs in Lua,
on the Redis clock: the key schema is in the header of ``redis_llanes.lua``, the
operations in ``redis_limits.lua`` (publish, route, lanes), ``redis_consume.lua`` (serve
the lanes) and ``redis_settle.lua`` (a delivery leased under a limit has lane -1).  This
module only turns a ``Limit`` into script arguments and script replies back into
``Limit``/``LaneStats``, so ``redis.py`` stays about streams.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from .base import LaneStats, Limit, Message, check_limit
from .. import _checks as checks

__all__ = ["LIMITED_LANE", "NO_LIMIT_ARGS", "limit_args", "publish_args", "read_limit", "read_lane_stats"]

#: The receipt lane of a delivery leased under a limit (it lives in no stream).
LIMITED_LANE = -1
#: The five limit arguments of an item without a limit (``redis_keys.lua``'s "publishl").
NO_LIMIT_ARGS = ("", "0.0", 1, "", 0)


def limit_args(limit: Limit) -> tuple:
    """The five script values of a checked ``limit``: rate key, rate, burst, concurrency key,
    concurrency (a key "" when the limit has none)."""
    rate_key, rate, burst, concurrency_key, concurrency = check_limit(limit)
    return ("" if rate_key is None else rate_key, repr(float(rate)), int(burst),
            "" if concurrency_key is None else concurrency_key, int(concurrency))


def publish_args(m: Message, now: float | None = None) -> tuple:
    """The ten values of one limited message for ``redis_limits.lua``'s "publish"."""
    if now is None:
        now = time.time()
    vt_ms = 0 if m.visibility_timeout is None else checks.ms(m.visibility_timeout)
    at = int(m.not_before * 1000) if m.not_before is not None and m.not_before > now else -1
    return (m.task_id, m.frame if type(m.frame) is bytes else bytes(m.frame), int(m.priority), vt_ms, at,
            *limit_args(m.limit))


def read_limit(rate_key: bytes, rate: Any, burst: Any, concurrency_key: bytes, concurrency: Any) -> Limit:
    """A delivery's ``Limit`` from the consume script's reply (the values it was published with)."""
    return Limit(rate_key.decode("utf-8", "replace") or None, float(rate), int(burst),
                 concurrency_key.decode("utf-8", "replace") or None, int(concurrency))


def _split_lane(lane: bytes) -> tuple[str | None, str | None]:
    """(rate key, concurrency key) of a lane's name, ``<bytes of R>:R|C``."""
    colon = lane.index(b":")
    n = int(lane[:colon])
    rate_key = lane[colon + 1:colon + 1 + n].decode("utf-8", "replace")
    concurrency_key = lane[colon + 2 + n:].decode("utf-8", "replace")
    return rate_key or None, concurrency_key or None


def read_lane_stats(queue: str, reply: Sequence[Any]) -> list[LaneStats]:
    """``redis_limits.lua``'s "lanes" reply: flat (lane, waiting, running) triples."""
    out = []
    for i in range(0, len(reply), 3):
        rate_key, concurrency_key = _split_lane(reply[i])
        out.append(LaneStats(queue, rate_key, concurrency_key, int(reply[i + 1]), int(reply[i + 2])))
    return out
