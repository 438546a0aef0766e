"""The workflow store on Redis, beside the Redis result backend (same server, same namespace).

Every mutating operation of the contract (``stem.workflows.store``) is one call of
``store_redis.lua`` (its header holds the key schema), so it is atomic: Redis runs a script
whole, and with ``appendonly`` it writes the script's effects to the AOF as one
``MULTI``/``EXEC``, which a restart replays whole or not at all.

**One slot per operation, on a Cluster too.**  Runs are spread over ``SHARDS`` shards
(crc32 of the run id); a run's keys *and its shard's indexes* (``due``, ``parked``, the id
and status lists) carry the shard's hash tag.  A script that changes a run therefore updates
the indexes that find it in the same step, on a single Redis and on a Redis Cluster alike:
there is no window in which a run is due but not indexed, and nothing to repair.  (An index
key of its own slot would be written in a second step that a crash can cut off; the
"index first, re-check later" repair of such a design races a concurrent writer, so it was
not taken.)  ``due``, ``parked_on`` and ``runs`` read every shard in one pipeline (the
Cluster client sends each shard's call to its node, all at once) and merge.

**The one cross-slot step: a child's ``"__child__"`` event to its parent.**  On a single
Redis (any key is reachable from a script) and when parent and child share a shard, ``finish``
and ``cancel`` store it in the same script.  On a Cluster otherwise, the child's script
records the child in its shard's ``notify`` set (same step as its terminal status); the
client then sends the parent its event (idempotent: the event id is the child's id) and
removes the note.  A crash between the two leaves the note, and ``due`` (which every
sweeper calls) sends what the notes list before it returns: no parent waits forever for a
child that ended.

Times are the caller's ``now`` (floats written as Python's ``repr``: read back exactly, and
compared as doubles in Lua and as sorted-set scores in Redis), never the server's clock.
Durability is the server's: ``appendonly yes`` with ``appendfsync always`` loses nothing
that a call returned; ``everysec`` can lose the last second on a machine crash (a killed
``redis-server`` loses nothing: the AOF is written before the reply).
"""

from __future__ import annotations

import heapq
import itertools
import weakref
import zlib
from importlib import resources
from typing import Any, Callable, Sequence, TypeVar

import msgspec
from redis.crc import key_slot

from ..errors import ConfigurationError
from ..stores.base import BACKEND_ERRORS
from ..stores.redis import RedisStore, validate_namespace
from .store import DueRun, Event, JournalEntry, ParkedRun, ParkOutcome, RunRecord, WorkflowStore

__all__ = ["RedisWorkflowStore", "SHARDS"]

#: Runs are spread over this many hash tags; fixed, since it decides where a run's keys are.
SHARDS = 64
_SLOTS = 16384
#: Ids read per script call when ``runs`` filters by name (bounds one call's time on the server).
_SCAN = 1000
_EVENTS_PAGE = 200
_T = TypeVar("_T")
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(tuple).decode
_stores: "weakref.WeakKeyDictionary[Any, RedisWorkflowStore]" = weakref.WeakKeyDictionary()


def _shard_tags() -> tuple[str, ...]:
    """One hash tag per shard, the first ``wfI.J`` (J = 0, 1, ...) whose slot falls in the
    I-th of ``SHARDS`` equal ranges of slots: a cluster's nodes own ranges of slots, so the
    shards spread over them evenly.  Deterministic: the same tags in every process."""
    span = _SLOTS // SHARDS
    tags = []
    for i in range(SHARDS):
        j = 0
        while key_slot(f"wf{i}.{j}".encode()) // span != i:
            j += 1
        tags.append(f"wf{i}.{j}")
    return tuple(tags)


_TAGS = _shard_tags()


def _load_script() -> str:
    return resources.files("stem.workflows").joinpath("store_redis.lua").read_text()


def _s(v: Any) -> str | None:
    return None if v is None else bytes(v).decode()


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


def _b(v: Any) -> bytes | None:
    return None if v is None else bytes(v)


def _record(run_id: str, fields: dict) -> RunRecord:
    g = fields.get
    return RunRecord(run_id, _s(g(b"name")) or "", _s(g(b"version")) or "", bytes(g(b"input", b"")),
                     _s(g(b"status")) or "", int(g(b"epoch", 0)), _s(g(b"owner")), _f(g(b"lease_until")),
                     _f(g(b"wake_at")), _b(g(b"waiting")), _s(g(b"waits_for")), int(g(b"inbox_count", 0)),
                     int(g(b"inbox_seen", 0)), _s(g(b"parent")), _b(g(b"result")), _b(g(b"error")),
                     _s(g(b"attention")), int(g(b"generation", 0)), float(g(b"created_at", 0.0)),
                     float(g(b"updated_at", 0.0)), _s(g(b"waits_kind")))


def _flat_record(run_id: str, flat: list) -> RunRecord:
    return _record(run_id, dict(zip(flat[::2], flat[1::2])))


def _event(member: bytes, seq: Any) -> Event:
    """``<len>:<event id><len>:<topic><created_at>:<payload>`` (lengths in bytes)."""
    colon = member.index(b":")
    end = colon + 1 + int(member[:colon])
    event_id = member[colon + 1:end]
    colon = member.index(b":", end)
    start, end = colon + 1, colon + 1 + int(member[end:colon])
    topic = member[start:end]
    colon = member.index(b":", end)
    return Event(int(seq), topic.decode(), event_id.decode(), member[colon + 1:], float(member[end:colon]))


def _opt(value: bytes | str | None) -> bytes:
    if value is None:
        return b"-"
    return b"+" + (value.encode() if isinstance(value, str) else value)


class RedisWorkflowStore(WorkflowStore):
    """The workflow store in Redis: ``for_backend`` beside a ``RedisResultBackend`` (its
    connections, retries and namespace), or ``from_url`` on a server of its own."""

    def __init__(self, store: RedisStore, *, namespace: str = "stem", owns_store: bool = False):
        """``store``: the connections (and retries, errors) to use; ``owns_store``: closed
        with this workflow store."""
        if not isinstance(store, RedisStore):
            raise ConfigurationError(f"a RedisWorkflowStore runs on a stem RedisStore, got {type(store).__name__}")
        self._store = store
        self._client = store.client
        self.namespace = validate_namespace(namespace)
        self._owns_store = owns_store
        self._script = store.script(_load_script())
        #: on a single Redis a script reaches any key: a child tells its parent in its own script
        self._cross = b"0" if store.cluster else b"1"
        self._bases = tuple(f"{self.namespace}:{{{tag}}}:" for tag in _TAGS)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "stem", **options: Any) -> "RedisWorkflowStore":
        """A store with connections of its own (``options``: ``RedisStore``'s timeouts and
        retries); errors are the backend's (``BackendError``, ``BackendConnectionError``)."""
        return cls(RedisStore(url, errors=BACKEND_ERRORS, **options), namespace=namespace, owns_store=True)

    @classmethod
    def for_backend(cls, backend: Any) -> "RedisWorkflowStore":
        """The store beside ``backend`` (one per backend): its connections and namespace."""
        from ..backends.redis import RedisResultBackend
        if not isinstance(backend, RedisResultBackend):
            raise ConfigurationError(f"a RedisWorkflowStore lives beside a RedisResultBackend, "
                                     f"not {type(backend).__name__}")
        store = _stores.get(backend)
        if store is None:
            # ``_store`` is the ResultBackend base's declared slot for the adapter's Store
            store = _stores[backend] = cls(backend._store, namespace=backend.namespace)
        return store

    # -- keys and calls ------------------------------------------------------------------
    def _base(self, run_id: str) -> str:
        return self._bases[zlib.crc32(run_id.encode()) % SHARDS]

    @staticmethod
    def _shard_keys(base: str) -> list[str]:
        return [base + "due", base + "parked", base + "runs", base + "notify"]

    def _keys(self, run_id: str, base: str | None = None) -> list[str]:
        base = base or self._base(run_id)
        return [*self._shard_keys(base), f"{base}r:{run_id}", f"{base}j:{run_id}", f"{base}e:{run_id}",
                f"{base}i:{run_id}"]

    def _command(self, keys: Sequence[str], op: str, *args: Any) -> tuple:
        return ("EVALSHA", self._script.sha, len(keys), *keys, op, *args)

    def _call(self, fn: Callable[[], _T], what: str) -> _T:
        return self._store.call(fn, what)

    def _run(self, keys: Sequence[str], op: str, *args: Any) -> Any:
        command = self._command(keys, op, *args)
        return self._call(lambda: self._store.run([command])[0], f"workflow {op}")

    def _each_shard(self, op: str, *args: Any) -> list:
        """One call of ``op`` per shard, in one pipeline (read-only calls: safe to resend)."""
        commands = [self._command(self._shard_keys(base), op, *args) for base in self._bases]
        return self._call(lambda: self._store.run(commands), f"workflow {op}")

    # -- runs ------------------------------------------------------------------------------
    def _create(self, run_id: str, name: str, version: str, input: bytes, *, now: float,
                parent: str | None) -> tuple[bool, RunRecord]:
        created, flat = self._run(self._keys(run_id), "create", run_id, repr(now), name, version, input,
                                  parent or "", "" if parent is None else self._base(parent))
        return created == 1, _flat_record(run_id, flat)

    def _get(self, run_id: str) -> RunRecord | None:
        key = f"{self._base(run_id)}r:{run_id}"
        fields = self._call(lambda: self._client.hgetall(key), "workflow get")
        return _record(run_id, fields) if fields else None

    def _runs(self, *, status: str | None, name: str | None, limit: int, after: str | None) -> list[RunRecord]:
        # every shard's first ``limit`` matches (the global first ``limit`` are among them)
        found: list[list[tuple[str, list]]] = [[] for _ in self._bases]
        cursors: list[str | None] = [after or ""] * len(self._bases)
        while True:
            open_ = [i for i, c in enumerate(cursors) if c is not None and len(found[i]) < limit]
            if not open_:
                break
            commands = [self._command(self._shard_keys(self._bases[i]), "runs", "", "", status or "", name or "",
                                      cursors[i], limit - len(found[i]), _SCAN) for i in open_]
            replies = self._call(lambda: self._store.run(commands), "workflow runs")
            for i, (got, last, done) in zip(open_, replies):
                found[i].extend((bytes(rid).decode(), flat) for rid, flat in got)
                cursors[i] = None if done == 1 or last is None else bytes(last).decode()
        merged = heapq.merge(*found, key=lambda item: item[0])
        return [_flat_record(rid, flat) for rid, flat in itertools.islice(merged, limit)]

    # -- one activation ----------------------------------------------------------------------
    def _claim(self, run_id: str, owner: str, *, now: float, lease: float) -> RunRecord | None:
        flat = self._run(self._keys(run_id), "claim", run_id, repr(now), owner, repr(now + lease))
        return None if flat is None else _flat_record(run_id, flat)

    def _renew(self, run_id: str, epoch: int, *, now: float, lease: float) -> bool:
        return self._run(self._keys(run_id), "renew", run_id, repr(now), epoch, repr(now + lease)) == 1

    def _journal(self, run_id: str) -> list[JournalEntry]:
        key = f"{self._base(run_id)}j:{run_id}"
        items = self._call(lambda: self._client.lrange(key, 0, -1), "workflow journal")
        return [JournalEntry(i, *_unpack(item)) for i, item in enumerate(items)]

    def _append(self, run_id: str, epoch: int, position: int, kind: str, name: str, *, output: bytes | None,
                error: bytes | None, attempt: int, now: float) -> bool:
        entry = _pack((kind, name, output, error, attempt, epoch, now))
        return self._run(self._keys(run_id), "append", run_id, repr(now), epoch, position, entry) == 1

    def _park(self, run_id: str, epoch: int, *, wake_at: float | None, waiting: bytes | None,
              waits_for: str | None, waits_kind: str | None, inbox_seen: int, now: float) -> ParkOutcome:
        got = self._run(self._keys(run_id), "park", run_id, repr(now), epoch,
                        _opt(None if wake_at is None else repr(wake_at)), _opt(waiting), _opt(waits_for), inbox_seen,
                        _opt(waits_kind))
        return bytes(got).decode()  # type: ignore[return-value]

    def _finish(self, run_id: str, epoch: int, status: str, *, result: bytes | None, error: bytes | None,
                now: float) -> bool:
        reply = self._run(self._keys(run_id), "finish", run_id, repr(now), epoch, status, _opt(result), _opt(error),
                          self._cross)
        if reply[0] != 1:
            return False
        if reply[1]:
            self._tell_parent(run_id, *reply[1], when=now)
        return True

    def _tell_parent(self, child_id: str, parent: Any, pbase: Any, *, when: float) -> None:
        """The second and third steps of a cross-slot child's end (module docstring): the
        parent's event, then the note's removal."""
        parent_id, base = bytes(parent).decode(), bytes(pbase).decode()
        self._run(self._keys(parent_id, base), "notify", parent_id, repr(when), child_id)
        self._run(self._shard_keys(self._base(child_id)), "notified", child_id, "", child_id)

    def _attention(self, run_id: str, epoch: int, reason: str, *, now: float) -> bool:
        return self._run(self._keys(run_id), "attention", run_id, repr(now), epoch, reason) == 1

    def _continue_as_new(self, run_id: str, epoch: int, input: bytes, *, drop_events: list[int],
                         now: float) -> bool:
        return self._run(self._keys(run_id), "continue", run_id, repr(now), epoch, input, *drop_events) == 1

    def _release(self, run_id: str, epoch: int, *, now: float) -> bool:
        return self._run(self._keys(run_id), "release", run_id, repr(now), epoch) == 1

    # -- operators -----------------------------------------------------------------------------
    def _cancel(self, run_id: str, *, now: float) -> RunRecord | None:
        reply = self._run(self._keys(run_id), "cancel", run_id, repr(now), self._cross)
        if reply is None:
            return None
        if reply[1]:
            self._tell_parent(run_id, *reply[1], when=now)
        return _flat_record(run_id, reply[0])

    def _reset(self, run_id: str, to_position: int, *, now: float) -> RunRecord | None:
        flat = self._run(self._keys(run_id), "reset", run_id, repr(now), to_position)
        return None if flat is None else _flat_record(run_id, flat)

    # -- events --------------------------------------------------------------------------------
    def _send(self, run_id: str, topic: str, event_id: str, payload: bytes, *,
              now: float) -> tuple[bool, RunRecord | None]:
        eid, top = event_id.encode(), topic.encode()
        member = b"%d:%s%d:%s%s:%s" % (len(eid), eid, len(top), top, repr(now).encode(), payload)
        reply = self._run(self._keys(run_id), "send", run_id, repr(now), eid, member)
        if reply[0] == -1:
            return False, None
        return reply[0] == 1, _flat_record(run_id, reply[1])

    def _events(self, run_id: str, topic: str | None, after_seq: int, limit: int) -> list[Event]:
        key = f"{self._base(run_id)}e:{run_id}"
        out: list[Event] = []
        page = limit if topic is None else max(limit, _EVENTS_PAGE)
        while len(out) < limit:
            low = f"({after_seq}"
            got = self._call(lambda: self._client.zrangebyscore(key, low, "+inf", start=0, num=page, withscores=True),
                             "workflow events")
            for member, seq in got:
                event = _event(member, seq)
                if topic is None or event.topic == topic:
                    out.append(event)
            if len(got) < page:
                break
            after_seq = int(got[-1][1])
        return out[:limit]

    # -- the sweeper ---------------------------------------------------------------------------
    def _due(self, *, now: float, limit: int) -> list[DueRun]:
        """Also sends the ``"__child__"`` events that a crash left noted (module docstring)."""
        found: list[DueRun] = []
        notes = []
        for runs, pending in self._each_shard("due", "", repr(now), limit):
            found.extend(DueRun(bytes(rid).decode(), bytes(reason).decode(), int(epoch), float(score))
                         for rid, reason, score, epoch in runs)
            notes.extend(pending)
        for child, when, parent, pbase in notes:
            self._tell_parent(bytes(child).decode(), parent, pbase, when=float(when))
        found.sort(key=lambda due: due.due_at)
        return found[:limit]

    def _parked_on(self, *, limit: int, after: str | None) -> list[ParkedRun]:
        found: list[ParkedRun] = []
        for flat in self._each_shard("parked_on", "", "", after or "", limit):
            found.extend(ParkedRun(bytes(flat[i]).decode(), bytes(flat[i + 1]).decode(),
                                   bytes(flat[i + 2]).decode() or None) for i in range(0, len(flat), 3))
        found.sort()
        return found[:limit]

    # -- misc -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_store:
            self._store.close()
