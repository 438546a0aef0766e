"""Group commit: single commands sent at once by many threads of a process share round trips.

Why: a service enqueues one task per request from many threads.  Each ``enqueue``
alone is one round trip; eight threads at once used to make eight, each on a
connection of its own (the pool's), each paying its syscalls and the wait for
the server.  Here they queue up instead, and one round trip carries them all.

How (``execute_one``, per connection pool):

* A caller that finds nobody flushing becomes the **leader** and sends its own
  command at once (alone: no wait for company, so a lone thread pays two lock
  operations more than before, nothing else).
* A caller that finds a leader in flight appends its command to the pending list
  and sleeps on a lock of its own.
* When the leader's round trip is answered, it hands the leadership to the first
  pending caller, if any, and returns.  That caller wakes, takes **every** pending
  command (its own first) and sends them as one pipeline, then hands on in turn.
  So each leader makes exactly one round trip: no caller's latency grows past
  its own round trip plus the one in flight when it arrived.
* **Each caller gets its own reply only after its command was answered**: its
  reply (an ``XADD``'s entry id: the task is stored), or its own error reply
  (raised for that caller alone; the others in the pipeline go on), or, when the
  round trip itself failed (a connection error, a timeout), that error -- every
  command of a failed round trip is in doubt, and each caller's ``RedisStore.call``
  retries its own command as it would have alone (an interruption of the thread
  sending it reaches the others as a connection error too).
* The round trip goes on the pool's dedicated connection when it is free
  (``stem.stores.redis_dedicated``), else on a pooled one, as every stem pipeline.
* After a fork the child starts with no leader and nothing pending (a parent's
  thread may have been flushing at the moment of the fork).
* A caller interrupted while it waits (KeyboardInterrupt) withdraws its command
  if nobody took it yet; if it had just been handed the lead, it still sends
  what waits and hands on before the interruption goes up.

A Redis Cluster client sends each command on its own (``stem_execute`` routes by
slot).
"""

from __future__ import annotations

import threading
from _thread import allocate_lock
from typing import Any

import redis

from .local import after_fork_in_child
from .redis_pipe import execute_one as _execute_one, execute_packed

__all__ = ["execute_one"]

_Redis = redis.Redis
_ResponseError = redis.ResponseError


class _Slot:
    """One waiting caller: its command, and what the round trip brought it."""

    __slots__ = ("packed", "wake", "reply", "error", "done", "lead")

    def __init__(self, packed: bytes):
        self.packed = packed
        self.wake = allocate_lock()
        self.wake.acquire()          # released by whoever answers it, or hands it the lead
        self.reply: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.lead = False            # handed the lead (set under the group's lock)


class _Group:
    __slots__ = ("lock", "busy", "pending")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = False            # a leader is sending
        self.pending: list[_Slot] = []


_groups: dict[Any, _Group] = {}       # pool -> its group
_groups_lock = threading.Lock()


def _group(pool: Any) -> _Group:
    g = _groups.get(pool)
    if g is None:
        after_fork_in_child(_renew_in_child)
        with _groups_lock:
            g = _groups.setdefault(pool, _Group())
    return g


def forget(pool: Any) -> None:
    """Drop ``pool``'s group (the pool is being disconnected for good)."""
    with _groups_lock:
        _groups.pop(pool, None)


def _renew_in_child() -> None:
    global _groups_lock
    _groups_lock = threading.Lock()
    for pool in list(_groups):
        _groups[pool] = _Group()


def execute_one(client: "redis.Redis", packed: bytes, raise_error: bool = False) -> Any:
    """``redis_pipe.execute_one`` (one packed command, its reply; an error reply raised with
    ``raise_error``) with the round trip shared among the threads calling at once."""
    if type(client) is not _Redis:   # a cluster client routes by slot
        return _execute_one(client, packed, raise_error)
    g = _groups.get(client.connection_pool) or _group(client.connection_pool)
    with g.lock:
        if g.busy:
            slot: _Slot | None = _Slot(packed)
            g.pending.append(slot)   # type: ignore[arg-type]
        else:
            g.busy = True
            slot = None
    if slot is None:                 # the leader, alone: its own round trip at once
        try:
            return _execute_one(client, packed, raise_error)
        finally:
            _hand_on(g)
    try:
        slot.wake.acquire()
    except BaseException:            # interrupted while waiting (KeyboardInterrupt in the main thread)
        _abandon(client, g, slot)
        raise
    if not slot.done:                # handed the lead: send everything pending
        try:
            _flush(client, g)
        finally:
            _hand_on(g)
    if slot.error is not None:
        raise slot.error
    reply = slot.reply
    if raise_error and isinstance(reply, _ResponseError):
        raise reply
    return reply


def _flush(client: "redis.Redis", g: _Group) -> None:
    """Send every pending command in one pipeline; answer each caller (the leader's own
    slot included, which is among them) and wake the others."""
    with g.lock:
        batch, g.pending = g.pending, []
    try:
        if len(batch) == 1:
            replies = [_execute_one(client, batch[0].packed)]
        else:
            replies = execute_packed(client, b"".join([s.packed for s in batch]), len(batch))
    except BaseException as exc:
        for s in batch:      # each caller raises an exception of its own (its traceback is its own)
            s.error = exc if s is batch[0] else _own_copy(exc)
        replies = [None] * len(batch)
    leader = batch[0]
    for s, reply in zip(batch, replies):
        s.reply = reply
        s.done = True
        if s is not leader:
            s.wake.release()


def _own_copy(exc: BaseException) -> BaseException:
    """``exc`` for another caller of the same round trip.  An interruption of the thread
    that sent it (KeyboardInterrupt, SystemExit) is that thread's: the others get a
    connection error (their commands' fate is unknown, as after a lost connection, and
    ``RedisStore.call`` retries them)."""
    if not isinstance(exc, Exception):
        error = redis.ConnectionError(f"the shared round trip was interrupted ({type(exc).__name__})")
        error.__cause__ = exc
        return error
    try:
        copy = type(exc)(*exc.args)
    except Exception:   # an exception type that cannot be made from its args
        return exc
    copy.__cause__ = exc
    return copy


def _hand_on(g: _Group) -> None:
    """The lead to the first caller still pending, or nobody flushing."""
    with g.lock:
        if g.pending:
            nxt = g.pending[0]
            nxt.lead = True
        else:
            g.busy = False
            return
    nxt.wake.release()


def _abandon(client: "redis.Redis", g: _Group, slot: _Slot) -> None:
    """A caller interrupted in its wait: a command not handed to anyone yet is withdrawn
    (never sent); one handed the lead still flushes what waits behind it and hands on, so
    no caller is left waiting for a leader that is gone."""
    with g.lock:
        if not slot.lead and not slot.done:
            g.pending.remove(slot)
            return
    if slot.lead and not slot.done:
        try:
            _flush(client, g)
        finally:
            _hand_on(g)
