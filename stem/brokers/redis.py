"""The Redis broker: Streams + consumer groups, leases in a sorted set, Lua for every atomic step.

Key schema, lanes and lease records are documented in the header of
``redis_common.lua`` (beside this module); each ``redis_*.lua`` script opens
with its KEYS/ARGV.  In short, per queue Q under namespace N, all in the
cluster slot of the hash tag ``{q:Q}``: ten priority lanes
``N:{q:Q}:lane:0..9`` (priority clamped to 0-9, lane 9 read first), a lease
index ``N:{q:Q}:leases``, the delayed set ``N:{q:Q}:delayed``, the
dead-letter stream ``N:{q:Q}:dead``, and for keyed messages one string
``N:{q:Q}:key:K`` per held key and their index ``N:{q:Q}:keys``.

How the contract in ``stem.brokers.base`` maps onto Redis:

* ``consume`` runs one Lua script per queue that moves due delayed messages,
  re-delivers expired leases (``XCLAIM`` to this consumer, which counts the
  delivery, past ``max_deliveries`` too: the consumer dead-letters those) and
  reads new entries (``XREADGROUP ... COUNT n >``), writing each lease record
  in the same script.  An entry it cannot deliver (no task id) is
  dead-lettered there with reason ``decode-error``, never left in the way of
  the entries after it.  ``XREADGROUP`` cannot block inside a script, so when
  nothing is there the client blocks with ``XREAD BLOCK`` (no side effects)
  on every lane from its last id, at most ``_MAX_BLOCK_S`` at a time, and
  runs the script again when something arrives.  A consume that leased some
  entries and drained every queue (fewer than asked, nothing buried, no limit
  lanes) gets the same block info with its deliveries, so the next consume
  blocks at once instead of first asking the script for nothing (the live
  path: a worker woken by each task as it arrives); lanes that do not exist
  are blocked on from 0-0 without a lookup.  A blocking ``XREADGROUP``
  outside a script would leave a window between the read and the lease
  record in which a crash strands the entry in the PEL forever.
* A message without its own visibility timeout is leased for the consuming
  broker's ``default_visibility_timeout``.
* ``extend`` bumps the lease record and ``XCLAIM ... JUSTID`` to itself (idle
  time reset, delivery count untouched): one copy, always.
* ``ack``/``retry``/``dead_letter``/``nack`` are one script call each
  (``ack`` batches every delivery of a queue into one call).
* Keys (``publish_keyed``): one ``redis_keys.lua`` call per queue (per 2,000
  items, every call in one pipeline) checks each key and publishes, then
  claims (``SET PX``).  A keyed entry carries its key, ttl and linger, which
  the scripts that end it read to release the key (owner-checked) in the
  same call: ``ack`` (a keyed delivery brings its key, owner and linger
  from the consume reply, and its entry is XDELed alone so only an ack that
  removed it releases; an ack without keyed deliveries is the script it
  always was), the dead-letter paths, ``purge`` and ``delete_queue``; retry
  and the consume script carry them on to the next entry.
* Limits (``Message.limit``): a limited message waits in a limit lane (sorted
  sets, never a stream; schema in ``redis_llanes.lua``) and is leased by the
  consume script only when its rate key's GCRA bucket has a token and its
  concurrency key a free slot, lanes round robin before the plain entries; a
  queue without lanes pays one ``EXISTS`` per consume.  Such a delivery's
  receipt has lane -1 (``redis_limits.LIMITED_LANE``); the settle script
  frees its slot in the same call.  Publishing, ``route_limited`` and
  ``lane_stats`` go through ``redis_limits.lua``; a consumer blocked in
  ``XREAD`` also watches the queue's ``lnotify`` stream, written when a lane
  gets a message or a slot frees up.
* Consumer groups lost with the data (a restart without persistence) are
  recreated at id 0 by the consume script.

Where Redis differs from the in-memory reference (all allowed by the protocol):

* Priority is honoured within a queue (lanes 9..0); a consume over several
  queues takes them in turn (rotating the first), not merged by priority,
  since each queue lives in its own cluster slot.  Re-deliveries of expired
  or nacked leases come before fresh entries of the same queue.
* A consumer blocked in ``consume`` wakes at once for a new ready entry (and
  for a limit lane that gets a message or a slot: the ``lnotify`` stream);
  for a delayed message or a nack published while it blocks it wakes at its
  next tick (at most ``_MAX_BLOCK_S``), since those do not touch the streams
  (nor do they when published after the draining consume that armed the block).
  A wake time the consume script reported (a token, a delayed message, a
  lease's end) is kept to the ms: Redis times a ``BLOCK`` out only on its
  server tick (100 ms at the default ``hz``), so the client blocks until
  ``_BLOCK_SLACK_S`` before it and sleeps the rest (a new entry in that last
  stretch waits for it).
  On a Redis Cluster one ``XREAD`` cannot span queues (slots): one blocking
  XREAD per queue, all at once on connections of their own (``_block_by_slot``).
* ``purge`` drops undelivered and delayed messages; entries whose lease
  expired (counted as ready by ``stats``) stay until redelivered.
  ``purge_hold`` drops the same ones into the queue's holding stream
  ``N:{q:Q}:purged`` in the same script call; ``purge_held`` reads it
  (``XRANGE``), ``purge_drop`` deletes from it (``XDEL``).
* Each consumer name stays in the group's consumer list (``XINFO
  CONSUMERS``) after its worker is gone; never ``XGROUP DELCONSUMER`` one
  that still has pending entries: that drops them from the PEL (the consume
  script re-adds such stranded entries when their lease expires).

Connections, retries, scripts and error translation are the store's
(``stem.stores.redis``, shared as ``broker.store`` with a result backend on the
same pool); every call runs under socket timeouts and a bounded retry with
backoff, then raises ``BrokerConnectionError``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from importlib import resources
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

from .. import _checks as checks
from ..errors import ConfigurationError, StemError
from ..stores.base import BROKER_ERRORS
from ..stores.redis import (NoScriptError, RedisStore, ReplyError, execute, execute_last, execute_packed,
                            execute_unread, pack_commands, pack_xadds, raise_first_error, validate_namespace)
from ..stores.redis_group import execute_one as _group_execute_one
from ..stores.redis_pipe import pack_command as _pack_command
from .base import (DEFAULT_MAX_DELIVERIES, DEFAULT_VISIBILITY_TIMEOUT, Broker, DeadLetter, Delivery, Held, Keyed,
                   LaneStats, Limit, MAX_KEY_LENGTH, Message, QueueStats, check_frame_batch, check_keyed,
                   validate_queue_name)
from .redis_limits import LIMITED_LANE, NO_LIMIT_ARGS, limit_args, publish_args, read_lane_stats, read_limit

__all__ = ["RedisBroker", "N_LANES"]

log = logging.getLogger("stem.broker.redis")

N_LANES = 10
_MAX_BLOCK_S = 1.0          # longest single XREAD BLOCK; bounds the latency of delayed/nacked messages
_BLOCK_SLACK_S = 0.1        # how late Redis may time a BLOCK out (its server tick at the default hz 10)
_DELAYED_MOVE_LIMIT = 1000  # due delayed messages moved per consume script call
_MAX_COUNT = 1000
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_BLOCK_INFO = 3 + N_LANES + 1   # a consume reply's block info: two wake times, now, the lanes' ids, lnotify's
_KEYED_CHUNK = 2000         # publish_keyed items per script call (the calls share one pipeline)
_LIMITED_CHUNK = 2000       # limited messages per publish script call (the calls share one pipeline)
_T = TypeVar("_T")


def _load_script(name: str) -> str:
    pkg = resources.files("stem.brokers")
    return "\n".join(pkg.joinpath(part).read_text() for part in ("redis_common.lua", "redis_llanes.lua", name))


class _Receipt(NamedTuple):
    lane: int
    entry_id: str
    consumer: str


class _KeyedReceipt(NamedTuple):
    """A keyed delivery's receipt: the linger its ack passes on to the release."""
    lane: int
    entry_id: str
    consumer: str
    linger_ms: int


def _lane(priority: int) -> int:
    return min(max(int(priority), 0), N_LANES - 1)


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise ConfigurationError(f"a key must be a non-empty string of at most {MAX_KEY_LENGTH} "
                                 f"characters, got {key!r}")


def _as_list(items: Sequence) -> list:
    """The C packer takes lists; the producer already passes lists (no copy then)."""
    return items if type(items) is list else list(items)


class RedisBroker(Broker):
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, namespace: str = "stem",
                 default_visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
                 max_deliveries: int = DEFAULT_MAX_DELIVERIES, socket_timeout: float = 5.0,
                 socket_connect_timeout: float = 2.0, retry_attempts: int = 4):
        self.url = url
        self.namespace = validate_namespace(namespace)
        self.default_visibility_timeout = checks.seconds("default_visibility_timeout", default_visibility_timeout)
        self.max_deliveries = checks.integer("max_deliveries", max_deliveries)
        checks.seconds("socket_timeout", socket_timeout, minimum=2 * _MAX_BLOCK_S)   # above one XREAD BLOCK
        self._store = RedisStore(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
                                 retry_attempts=retry_attempts, errors=BROKER_ERRORS)
        self.retry_attempts = self._store.retry_attempts
        self._client = self._store.client
        self._consume_script = self._store.script(_load_script("redis_consume.lua"))
        self._settle_script = self._store.script(_load_script("redis_settle.lua"))
        self._admin_script = self._store.script(_load_script("redis_admin.lua"))
        self._keys_script = self._store.script(_load_script("redis_keys.lua"))
        self._limits_script = self._store.script(_load_script("redis_limits.lua"))
        self._declared: set[str] = set()
        self._xadd_heads: dict[str, list[tuple[bytes, bytes]]] = {}   # publish's: by declared queue
        #: (queues, consumer) -> (block_on, wake_at): what the last consume, which drained every
        #: queue, says to block on; the next consume blocks at once (``consume``)
        self._armed: dict[tuple, tuple[dict[str, str], float]] = {}
        self._keys: dict[str, list[str]] = {}
        self._instance = uuid.uuid4().hex[:8]
        self._rotate = 0
        self._closed = False

    def reopen_recipe(self) -> tuple[str, dict[str, Any]] | None:
        return (self.url, {"namespace": self.namespace})

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisBroker":
        return cls(url, **kwargs)

    # -- keys -----------------------------------------------------------------------
    def queue_keys(self, queue: str) -> list[str]:
        """KEYS of every per-queue script: lanes 0..9, leases, delayed, dead."""
        keys = self._keys.get(queue)
        if keys is None:
            validate_queue_name(queue)
            base = f"{self.namespace}:{{q:{queue}}}:"
            keys = [f"{base}lane:{p}" for p in range(N_LANES)] + [base + "leases", base + "delayed",
                                                                   base + "dead"]
            self._keys[queue] = keys
        return keys

    def notify_key(self, queue: str) -> str:
        """The stream a limit lane's publish or freed slot writes to, to wake blocked consumers."""
        return f"{self.queue_keys(queue)[N_LANES + 2][:-4]}lnotify"

    def key_name(self, queue: str, key: str) -> str:
        """The Redis key that holds ``key`` of ``queue`` (``publish_keyed``)."""
        return f"{self.queue_keys(queue)[N_LANES + 2][:-4]}key:{key}"

    @property
    def _queues_key(self) -> str:
        return f"{self.namespace}:queues"

    def _call(self, fn: Callable[[], _T], what: str) -> _T:
        return self._store.call(fn, what)

    def _consumer(self, consumer: str) -> str:
        return consumer or f"{socket.gethostname()}:{os.getpid()}:{self._instance}"

    # -- publishing -------------------------------------------------------------------
    def publish(self, message: Message) -> None:
        """One message.  A ready one without a limit, of priority 0-9, to a declared queue (a
        service's single ``enqueue``) is one XADD spliced from the lane's pre-packed head and
        tail (``_xadd_parts``) and sent as it is, with none of ``publish_many``'s command
        lists, its round trip shared with the threads publishing at the same time
        (``stem.stores.redis_group``); anything else goes through ``publish_many``."""
        parts = self._xadd_heads.get(message.queue)
        priority = message.priority
        if (parts is None or message.limit is not None or message.not_before is not None
                or type(priority) is not int or not 0 <= priority < N_LANES):
            self.publish_many((message,))
            if parts is None and message.queue in self._declared:   # the first of racing threads' stays
                self._xadd_heads.setdefault(message.queue, self._xadd_parts(message.queue))
            return
        vt = message.visibility_timeout
        frame = message.frame
        tid = message.task_id.encode()
        head, tail = parts[priority]
        packed = b"%s$%d\r\n%s\r\n$1\r\nf\r\n$%d\r\n%s\r\n%s" % (
            head, len(tid), tid, len(frame), frame,
            tail if vt is None else _pack_command("p", priority, "v", checks.ms(vt))[4:])
        self._store.call(lambda: _group_execute_one(self._client, packed, True), "publish")

    def single_publisher(self, queue: str, priority: int,
                         visibility_timeout: float | None) -> tuple[bytes, bytes, Callable[[bytes], bool]] | None:
        """What a producer's single enqueue of ready, unlimited, unkeyed messages to
        ``queue`` needs to publish each in one command it builds itself: the XADD's head
        (up to the task id) and tail (from the priority on), and ``send(command)``, which
        sends it as ``publish`` would (retries, shared round trips) and returns True, or
        returns False, sending nothing, once ``queue`` is no longer declared by this
        broker (``delete_queue``): then the producer publishes through ``publish``.  None
        until ``queue`` is declared (its first ``publish``), or for a priority out of 0-9."""
        parts = self._xadd_heads.get(queue)
        if parts is None or type(priority) is not int or not 0 <= priority < N_LANES:
            return None
        head, tail = parts[priority]
        if visibility_timeout is not None:
            tail = _pack_command("p", priority, "v", checks.ms(visibility_timeout))[4:]
        heads, call, client = self._xadd_heads, self._store.call, self._client

        def send(packed: bytes) -> bool:
            if heads.get(queue) is not parts:
                return False
            try:   # the first attempt without RedisStore.call's frame; the retries in it
                _group_execute_one(client, packed, True)
            except Exception as exc:
                call(lambda: _group_execute_one(client, packed, True), "publish", failed=exc)
            return True
        return head, tail, send

    def _xadd_parts(self, queue: str) -> list[tuple[bytes, bytes]]:
        """Per lane of ``queue``: the packed XADD up to its task id, and from its priority
        on without a visibility timeout -- what ``publish`` splices a frame between."""
        keys = self.queue_keys(queue)
        parts = []
        for priority in range(N_LANES):
            head = _pack_command("XADD", keys[priority], "*", "t")
            parts.append((b"*11" + head[head.index(b"\r\n"):], _pack_command("p", priority, "v", 0)[4:]))
        return parts

    def publish_many(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        commands, new_queues, scripted = self.publish_commands(messages)
        if scripted:      # a NOSCRIPT must not write the plain messages twice
            self._call(lambda: self._run_once(commands), "publish")
        else:
            self._call(lambda: raise_first_error(execute(self._client, commands)), "publish")
        self._declared.update(new_queues)

    def publish_commands(self, messages: Sequence[Message]) -> tuple[list[tuple], list[str], bool]:
        """The commands that publish ``messages`` (an XADD or a ZADD each, a limits script
        call per queue of limited messages, then a SADD of the queues this broker has not
        declared yet); those queues, to pass to ``declared`` once the commands ran; and
        whether any command is a script call (then a NOSCRIPT reply is possible: send them
        with ``_run_once``, or a runner that retries only the calls that did not run).
        ``publish_many`` and the async producer (``stem.brokers.redis_async``) send them."""
        commands = []
        now = time.time()
        new_queues = []
        lanes: dict[tuple[str, int], str] = {}
        limited: dict[str, list] | None = None
        for m in messages:
            queue = m.queue
            if queue not in self._declared and queue not in new_queues:
                new_queues.append(queue)
            if m.limit is not None:   # into its limit lane, by the limits script
                if limited is None:
                    limited = {}
                self.queue_keys(queue)
                limited.setdefault(queue, []).append(publish_args(m, now))
                continue
            vt_ms = 0 if m.visibility_timeout is None else checks.ms(m.visibility_timeout)
            priority = int(m.priority)
            frame = m.frame if type(m.frame) is bytes else bytes(m.frame)
            if m.not_before is not None and m.not_before > now:
                tid = m.task_id.encode()
                member = b"%s %d %d %d %s%s" % (uuid.uuid4().hex[:16].encode(), priority, vt_ms,
                                                 len(tid), tid, frame)
                commands.append(("ZADD", self.queue_keys(queue)[N_LANES + 1], int(m.not_before * 1000), member))
            else:
                key = lanes.get((queue, priority))
                if key is None:
                    key = lanes[(queue, priority)] = self.queue_keys(queue)[_lane(priority)]
                commands.append(("XADD", key, "*", "t", m.task_id, "f", frame, "p", priority, "v", vt_ms))
        if limited is not None:
            for queue, items in limited.items():
                for start in range(0, len(items), _LIMITED_CHUNK):
                    args = [v for item in items[start:start + _LIMITED_CHUNK] for v in item]
                    commands.append(self._evalsha(self._limits_script, queue, "publish", *args))
        if new_queues:
            commands.append(("SADD", self._queues_key, *new_queues))
        return commands, new_queues, limited is not None

    def declared(self, queues: Sequence[str]) -> None:
        """Record that ``queues`` are in the registry set (their SADD ran)."""
        self._declared.update(queues)

    def _run_once(self, commands: list) -> None:
        """Run ``commands`` (XADDs beside script calls) and raise the first error reply; after a
        NOSCRIPT (Redis lost its script cache) only the script calls that did not run are sent
        again, so no XADD is written twice."""
        replies = execute(self._client, commands)
        missing = [c for c, r in zip(commands, replies) if isinstance(r, NoScriptError)]
        if missing:
            self._store.run(missing)
        raise_first_error(r for r in replies if not isinstance(r, NoScriptError))

    def publish_frames(self, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                       priority: int = 0, visibility_timeout: float | None = None) -> None:
        """One lane's XADDs packed in C in one buffer; their replies (entry ids) are stepped
        over in C, not built, and only an error among them is raised."""
        packed, n = self.pack_frames(queue, task_ids, frames, priority=priority, visibility_timeout=visibility_timeout)
        if not n:
            return
        self._call(lambda: execute_unread(self._client, packed, n), "publish")
        self.declared([queue])

    def pack_frames(self, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                    priority: int = 0, visibility_timeout: float | None = None) -> tuple[bytes, int]:
        """``publish_frames``' commands packed (the XADDs, and the SADD of a queue this broker
        has not declared yet) and how many: a result backend on this server sends them in
        the transaction that creates a group (then calls ``declared([queue])``)."""
        n = check_frame_batch(task_ids, frames)
        if not n:
            return b"", 0
        priority = int(priority)
        vt_ms = 0 if visibility_timeout is None else checks.ms(visibility_timeout)
        packed = pack_xadds(self.queue_keys(queue)[_lane(priority)], _as_list(task_ids), _as_list(frames),
                            priority, vt_ms)
        declare = queue not in self._declared
        if declare:
            packed += pack_commands((("SADD", self._queues_key, queue),))
        return packed, n + declare

    def publish_keyed(self, items: Sequence[Keyed]) -> list[str | None]:
        """One ``redis_keys.lua`` call per queue (per ``_KEYED_CHUNK`` items), all of them
        in one pipeline.  Sent again as a whole after a lost connection: what the first
        send published then answers with its own task id (published once)."""
        items = check_keyed(items)
        if not items:
            return []
        commands, spans, new_queues = self.keyed_commands(items)
        replies = self._call(lambda: self._store.run(commands), "publish_keyed")
        self._declared.update(new_queues)
        return self.keyed_holders(len(items), spans, replies)

    def keyed_commands(self, items: Sequence[Keyed]) -> tuple[list[tuple], list[list[int]], list[str]]:
        """``publish_keyed``'s pipeline for checked ``items``: the script calls, the item
        positions each call carries (for ``keyed_holders``), the queues to declare."""
        now = time.time()
        by_queue: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_queue.setdefault(item.message.queue, []).append(i)
        commands: list[tuple] = []
        spans: list[list[int]] = []
        for queue, positions in by_queue.items():
            for start in range(0, len(positions), _KEYED_CHUNK):
                span = positions[start:start + _KEYED_CHUNK]
                args: list[Any] = []
                if any(items[i].message.limit is not None for i in span):
                    for i in span:
                        limit = items[i].message.limit
                        args.extend(self._keyed_args(items[i], now))
                        args.extend(NO_LIMIT_ARGS if limit is None else limit_args(limit))
                    commands.append(self._evalsha(self._keys_script, queue, "publishl", *args))
                else:
                    for i in span:
                        args.extend(self._keyed_args(items[i], now))
                    commands.append(self._evalsha(self._keys_script, queue, "publish", *args))
                spans.append(span)
        new_queues = [q for q in by_queue if q not in self._declared]
        if new_queues:
            commands.append(("SADD", self._queues_key, *new_queues))
        return commands, spans, new_queues

    @staticmethod
    def keyed_holders(n: int, spans: list[list[int]], replies: Sequence[Any]) -> list[str | None]:
        """``publish_keyed``'s answer from the replies of ``keyed_commands``' pipeline."""
        out: list[str | None] = [None] * n
        for span, reply in zip(spans, replies):
            for j in range(0, len(reply), 2):
                out[span[reply[j]]] = reply[j + 1].decode("utf-8", "replace")
        return out

    @staticmethod
    def _keyed_args(item: Keyed, now: float) -> tuple:
        """The nine script arguments of one item (see ``redis_keys.lua``)."""
        m = item.message
        vt_ms = 0 if m.visibility_timeout is None else checks.ms(m.visibility_timeout)
        linger_ms = checks.ms(item.linger) if item.linger > 0 else 0
        delayed = m.not_before is not None and m.not_before > now
        return (item.key, m.task_id, checks.ms(item.ttl), linger_ms, int(m.priority), vt_ms,
                int(m.not_before * 1000) if delayed else -1, uuid.uuid4().hex[:16] if delayed else "",
                m.frame if type(m.frame) is bytes else bytes(m.frame))

    def release_key(self, queue: str, key: str, owner: str) -> bool:
        _check_key(key)
        if not isinstance(owner, str):
            raise ConfigurationError(f"an owner is a task id (str), got {owner!r}")
        return bool(self._call(lambda: self._store.run(
            [self._evalsha(self._keys_script, queue, "release", key, owner)])[0], "release_key"))

    def key_owner(self, queue: str, key: str) -> str | None:
        _check_key(key)
        name = self.key_name(queue, key)
        owner = self._call(lambda: self._client.get(name), "key_owner")
        return None if owner is None else owner.decode("utf-8", "replace")

    def _declare(self, queues: Sequence[str]) -> None:
        new = [q for q in queues if q not in self._declared]
        if new:
            self._call(lambda: self._client.sadd(self._queues_key, *new), "declare queues")
            self._declared.update(new)

    # -- consuming --------------------------------------------------------------------
    def consume(self, queues: Sequence[str], max_count: int, timeout: float,
                *, consumer: str = "") -> list[Delivery]:
        checks.integer("max_count", max_count)
        names = list(dict.fromkeys(queues))
        if not names:
            raise ConfigurationError("consume needs at least one queue")
        for q in names:
            self.queue_keys(q)
        max_count = min(max_count, _MAX_COUNT)
        consumer = self._consumer(consumer)
        self._declare(names)
        deadline = time.monotonic() + max(float(timeout), 0.0)
        key = (tuple(names), consumer)
        armed = self._armed.pop(key, None) if timeout > 0 else None
        out: list[Delivery] = []
        while True:
            if armed is None:
                out, wake_in, block_on, drained = self._consume_once(names, max_count, consumer,
                                                                     2 if timeout > 0 else 0)
                if out or self._closed:
                    if drained:      # every queue was drained: the next consume blocks at once
                        self._armed[key] = (block_on, time.monotonic() + wake_in)
                    return out
            else:                    # the last consume drained every queue: no need to ask again
                block_on, wake_at = armed
                armed = None
                wake_in = min(max(wake_at - time.monotonic(), 0.001), _MAX_BLOCK_S)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out
            block = min(remaining, _MAX_BLOCK_S, wake_in)
            # a wake time the script reported (a limit lane's next token or slot, a delayed
            # message, a lease's end) is kept to the ms: Redis times a BLOCK out only on its
            # server tick (up to _BLOCK_SLACK_S late), so the last stretch is slept here.  The
            # caller's deadline is not: a late return costs nothing, a blind stretch would.
            precise = wake_in < _MAX_BLOCK_S and wake_in <= remaining
            wake_at = time.monotonic() + block
            xread_s = block - _BLOCK_SLACK_S if precise else block
            if xread_s >= 0.001:
                if self._xread_block(block_on, xread_s):
                    continue
            if precise:
                pause = wake_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)

    def _xread_block(self, block_on: dict[str, str], block: float) -> bool:
        """XREAD BLOCK (no side effects) on the lanes ``block_on`` names, from their last ids,
        for up to ``block`` seconds; True when an entry arrived."""
        if self._store.cluster:
            return self._block_by_slot(block_on, block)
        return bool(self._call(lambda: self._client.execute_command(
            "XREAD", "COUNT", 1, "BLOCK", max(int(block * 1000), 1), "STREAMS",
            *block_on.keys(), *block_on.values()), "consume (block)"))

    def _block_by_slot(self, block_on: dict[str, str], block: float) -> bool:
        """On a Redis Cluster one XREAD reads the lanes of one queue only (a command's keys
        share a slot): one XREAD BLOCK per queue, all sent at once on connections of their
        own (``StemCluster.stem_block_any``); the first that has an entry ends the wait."""
        by_queue: dict[str, dict[str, str]] = {}
        for key, last in block_on.items():
            by_queue.setdefault(key[:key.index("}") + 1], {})[key] = last
        ms = max(int(block * 1000), 1)
        commands = [(next(iter(lanes)), ("XREAD", "COUNT", 1, "BLOCK", ms, "STREAMS", *lanes.keys(), *lanes.values()))
                    for lanes in by_queue.values()]
        return self._call(lambda: self._client.stem_block_any(commands, block + 1.0), "consume (block)")

    def _consume_once(self, names: list[str], max_count: int, consumer: str,
                      mode: int = 1) -> tuple[list[Delivery], float, dict[str, str], bool]:
        """One consume script call per queue (in turn, up to ``max_count`` deliveries): the
        deliveries, and what to block on when they are none -- the shortest wake time and
        the ids of every queue's lanes.  ``mode`` is the script's ARGV[5]; with 2 a queue
        that leased some and was drained reports its block info too, and the last value
        says whether every queue did (then the caller may block at once next time)."""
        out: list[Delivery] = []
        wake_in = _MAX_BLOCK_S
        block_on: dict[str, str] = {}
        drained = mode == 2
        for q in self._rotation(names):
            keys = self.queue_keys(q)
            command = self._consume_command(q, consumer, max_count - len(out), mode)
            reply = self._call(lambda: self._store.run([command])[0], "consume")
            if self._read_leased(q, consumer, reply, out):
                if reply[0] > 0:     # leased, and not drained (or not asked to say)
                    drained = False
                    if len(out) >= max_count:
                        break
                    continue
                info = len(reply) - _BLOCK_INFO   # drained: the block info closes the reply
            elif mode == 0:          # the caller will not block: the reply is [0] alone
                continue
            else:
                info = 1
            next_delayed, next_lease, now = reply[info], reply[info + 1], reply[info + 2]
            for t in (next_delayed, next_lease):
                if t >= 0:
                    wake_in = min(wake_in, max((t - now) / 1000.0, 0.001))
            for lane, last in enumerate(reply[info + 3:info + 3 + N_LANES]):
                block_on[keys[lane]] = last.decode()
            block_on[self.notify_key(q)] = reply[info + 3 + N_LANES].decode()
        return out, wake_in, block_on, drained and bool(out)

    def _rotation(self, names: list[str]) -> list[str]:
        """``names`` starting one further on at each call: several queues take turns."""
        start = self._rotate % len(names)
        self._rotate += 1
        return names[start:] + names[:start]

    def _consume_command(self, queue: str, consumer: str, count: int, mode: int = 1) -> tuple:
        """The consume script's call.  ``mode`` (its ARGV[5]): 1, an empty reply carries the
        wake times and last ids; 0, not (the caller will not block); 2, a drained queue's
        reply carries them after its deliveries too (``consume``'s arming)."""
        return self._evalsha(self._consume_script, queue, consumer, count,
                             checks.ms(self.default_visibility_timeout), _DELAYED_MOVE_LIMIT, mode)

    def _read_leased(self, queue: str, consumer: str, reply: list, out: list[Delivery]) -> int:
        """Append the deliveries a consume script's ``reply`` leased to ``out``; returns how many.
        A task id that is not UTF-8 (an entry written by hand) is read with replacement
        characters: raising here would drop the whole batch, leased, on the floor."""
        n = reply[0]
        end = len(reply)
        if n < 0:               # drained (mode 2): the block info closes the reply
            n, end = -n, end - _BLOCK_INFO
        leased_at = time.time()
        first = len(out)
        values = iter(reply[1:6 * n + 1])   # six per delivery, flat
        for lane, entry_id, task_id, frame, d_vt_ms, count in zip(values, values, values, values, values, values):
            out.append(Delivery(queue, task_id.decode("utf-8", "replace"), frame,
                                _Receipt(int(lane), entry_id.decode(), consumer), int(count), d_vt_ms / 1000.0,
                                leased_at))
        j = 6 * n + 1
        while n and j < end:   # (i, key, linger ms) of the keyed ones, (-i, limit) of the limited ones
            i = reply[j]
            if i > 0:
                d = out[first + i - 1]
                d.key = reply[j + 1].decode("utf-8", "replace")
                d.receipt = _KeyedReceipt(*d.receipt, reply[j + 2])
                j += 3
            else:
                out[first - i - 1].limit = read_limit(*reply[j + 1:j + 6])
                j += 6
        return n

    def run_and_consume(self, commands: Sequence[Sequence[Any]], queues: Sequence[str], max_count: int,
                        *, consumer: str = "") -> list[Delivery]:
        """Run ``commands`` (settle commands: safe to repeat, as for ``store.run``) and,
        after them in the same pipeline, one consume of up to ``max_count`` deliveries
        from the next of ``queues`` in turn (one queue: several need a round trip each).
        Never blocks.  Tried once: a lost connection may have lost the reply of a consume
        that ran, and a blind resend would lease again, so connection errors raise
        ``BrokerConnectionError`` at once (what such a consume leased comes back after its
        lease, as when a plain consume reply is lost) and the caller settles the usual way.

        After a Redis restart emptied the script cache, the whole pipeline is sent again
        only when the consume itself answered NOSCRIPT (it did not run); when it ran but
        a settle script did not, only ``commands`` are sent again.  When a settle command
        fails, the deliveries just leased are given back (requeued) before the error is
        raised: the caller would not hold room for them."""
        return self._run_consume(commands, None, queues, max_count, consumer)[1]

    def run_keep_and_consume(self, commands: Sequence[Sequence[Any]], start: int, stop: int, queues: Sequence[str],
                             max_count: int, *, consumer: str = "") -> tuple[list, list[Delivery]]:
        """``run_and_consume`` that also answers the replies of ``commands[start:stop]`` (a
        settle's group counts, between its statuses and its acks)."""
        return self._run_consume(commands, (start, stop), queues, max_count, consumer)  # type: ignore[return-value]

    def _run_consume(self, commands: Sequence[Sequence[Any]], keep: tuple[int, int] | None, queues: Sequence[str],
                     max_count: int, consumer: str) -> tuple[list | None, list[Delivery]]:
        max_count = min(max_count, _MAX_COUNT)
        consumer = self._consumer(consumer)
        names = list(dict.fromkeys(queues))
        self._declare(names)
        queue = self._rotation(names)[0]
        pipeline = [*commands, self._consume_command(queue, consumer, max_count, 0)]
        packed = pack_commands(pipeline)
        n = len(pipeline)

        def round_trip() -> tuple[Exception | None, Any, list | None]:
            if keep is None:
                # the settle commands' replies are only checked for an error: never built
                return (*execute_last(self._client, packed, n), None)
            replies = execute_packed(self._client, packed, n)
            error = next((r for r in replies[:-1] if isinstance(r, ReplyError)), None)
            return error, replies[-1], replies[keep[0]:keep[1]]

        def send() -> tuple[list | None, list[Delivery]]:
            error, reply, kept = round_trip()
            if isinstance(reply, NoScriptError):
                self._store.load_scripts()
                error, reply, kept = round_trip()
            out: list[Delivery] = []
            if not isinstance(reply, ReplyError):
                self._read_leased(queue, consumer, reply, out)
            try:
                if isinstance(error, NoScriptError):
                    again = self._store.run(commands)   # loads the scripts; raises the first error left
                    if keep is not None:
                        kept = again[keep[0]:keep[1]]
                elif error is not None:
                    raise error
            except BaseException:
                self._give_back(out)
                raise
            raise_first_error((reply,))
            return kept, out

        return self._store.call(send, "settle+consume", attempts=1)

    def ack_and_consume(self, deliveries: Sequence[Delivery], queues: Sequence[str], max_count: int,
                        *, consumer: str = "") -> list[Delivery]:
        """The ack scripts and a consume in one pipeline (``run_and_consume``)."""
        return self.run_and_consume(self.ack_commands(deliveries), queues, max_count, consumer=consumer)

    def _give_back(self, deliveries: list[Delivery]) -> None:
        """Best effort: end these leases now (``nack``); what fails comes back after its lease."""
        if not deliveries:
            return
        commands = [self._evalsha(self._settle_script, d.queue, "requeue", d.receipt.lane, d.receipt.entry_id)
                     for d in deliveries]
        try:
            self._store.call(lambda: self._store.run(commands), "give back", attempts=1)
        except StemError as exc:
            log.warning("could not give back %d deliveries (%s); they come back after their lease",
                        len(deliveries), exc)

    def script_sources(self) -> list[str]:
        """The Lua sources of this broker's scripts (an async client loads them after NOSCRIPT)."""
        return [self._consume_script.script, self._settle_script.script, self._admin_script.script,
                self._keys_script.script, self._limits_script.script]

    def _evalsha(self, script: Any, queue: str, *args: Any) -> tuple:
        """The EVALSHA command that runs one of this broker's per-queue scripts on ``queue``."""
        return ("EVALSHA", script.sha, N_LANES + 3, *self.queue_keys(queue), *args)

    # -- settling ---------------------------------------------------------------------
    def _settle(self, queue: str, args: list) -> Any:
        command = self._evalsha(self._settle_script, queue, *args)
        return self._call(lambda: self._store.run([command])[0], args[0])

    def ack_commands(self, deliveries: Sequence[Delivery]) -> list[tuple]:
        """The EVALSHA commands that ack ``deliveries`` (one per queue), for a pipeline.  A
        queue's keyed deliveries go after its others ("ackk"), with what the script needs
        to release their keys; the others are acked as "ack" acks them."""
        by_queue: dict[str, list] = {}
        keyed: dict[str, list] | None = None
        for d in deliveries:
            r = d.receipt
            pairs = by_queue.get(d.queue)
            if pairs is None:
                pairs = by_queue[d.queue] = []
            if d.key is None or r.lane == LIMITED_LANE:   # a limited one's key rides in its record
                pairs.append(r.lane)
                pairs.append(r.entry_id)
            else:
                if keyed is None:
                    keyed = {}
                keyed.setdefault(d.queue, []).extend((r.lane, r.entry_id, d.key, d.task_id,
                                                      getattr(r, "linger_ms", 0)))
        if keyed is None:
            return [self._evalsha(self._settle_script, q, "ack", *pairs) for q, pairs in by_queue.items()]
        return [self._evalsha(self._settle_script, q, "ack", *pairs) if q not in keyed else
                self._evalsha(self._settle_script, q, "ackk", len(pairs) // 2, *pairs, *keyed[q])
                for q, pairs in by_queue.items()]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        commands = self.ack_commands(deliveries)
        if commands:
            self._call(lambda: self._store.run(commands), "ack")

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        if not requeue:
            self.dead_letter(delivery, "rejected")
            return
        r = delivery.receipt
        self._settle(delivery.queue, ["requeue", r.lane, r.entry_id])

    def retry(self, delivery: Delivery, frame: bytes, not_before: float | None) -> None:
        r = delivery.receipt
        nb_ms = -1 if not_before is None else int(not_before * 1000)
        self._settle(delivery.queue, ["retry", r.lane, r.entry_id, bytes(frame), nb_ms, uuid.uuid4().hex[:16]])

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        r = delivery.receipt
        self._settle(delivery.queue, ["dead", r.lane, r.entry_id, reason])

    def extend(self, deliveries: Sequence[Delivery], visibility_timeout: float | None = None) -> None:
        groups: dict[tuple[str, str], list] = {}
        for d in deliveries:
            r = d.receipt
            vt = visibility_timeout or d.visibility_timeout
            groups.setdefault((d.queue, r.consumer), []).extend((r.lane, r.entry_id, checks.ms(vt)))
        for (queue, consumer), triples in groups.items():
            self._settle(queue, ["extend", consumer, *triples])

    # -- limits -----------------------------------------------------------------------
    def route_limited(self, delivery: Delivery, limit: Limit) -> None:
        """``redis_limits.lua``'s "route": the entry leaves its stream (and the PEL) and enters
        the limit's lane in one call, only while this delivery's consumer still holds it."""
        args = limit_args(limit)
        r = delivery.receipt
        self._call(lambda: self._store.run([self._evalsha(
            self._limits_script, delivery.queue, "route", r.lane, r.entry_id, r.consumer,
            int(delivery.delivery_count), *args)])[0], "route_limited")

    def lane_stats(self, queue: str, limit: int = 100) -> list[LaneStats]:
        checks.integer("limit", limit)
        command = self._evalsha(self._limits_script, queue, "lanes", limit)
        return read_lane_stats(queue, self._call(lambda: self._store.run([command])[0], "lane_stats"))

    # -- dead letters and admin -----------------------------------------------------
    def _admin(self, queue: str, *args: Any) -> Any:
        command = self._evalsha(self._admin_script, queue, *args)
        return self._call(lambda: self._store.run([command])[0], str(args[0]))

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        key = self.queue_keys(queue)[N_LANES + 2]
        if limit <= 0:
            return []
        entries = self._call(lambda: self._client.xrange(key, "-", "+", count=limit), "dead_letters")
        out = []
        for entry_id, fields in entries:   # every field read leniently: a dead letter may be a bad entry's
            key = fields.get(b"k")
            out.append(DeadLetter(entry_id.decode(), fields.get(b"t", b"").decode("utf-8", "replace"), queue,
                                  fields.get(b"r", b"").decode("utf-8", "replace"),
                                  int(fields.get(b"at", 0)) / 1000.0, fields.get(b"f", b""),
                                  None if key is None else key.decode("utf-8", "replace")))
        return out

    def replay(self, queue: str, ids: Sequence[str] | None = None) -> int:
        batch = 500
        moved = 0
        if ids is None:   # entries left behind (their key held by another task) are stepped over
            start = "-"
            while True:
                n, scanned, last = self._admin(queue, "replay", batch, start)
                moved += n
                if scanned < batch:
                    return moved
                start = "(" + last.decode()
        ids = list(ids)
        for i in range(0, len(ids), batch):
            moved += self._admin(queue, "replay_ids", *ids[i:i + batch])
        return moved

    def purge(self, queue: str) -> int:
        return int(self._admin(queue, "purge"))

    def purge_hold(self, queue: str) -> int:
        return int(self._admin(queue, "purge_hold"))

    def _held_key(self, queue: str) -> str:
        return self.queue_keys(queue)[N_LANES + 2][:-4] + "purged"    # beside the dead stream

    def purge_held(self, queue: str, limit: int = 1000) -> list[Held]:
        checks.integer("limit", limit)
        key = self._held_key(queue)
        entries = self._call(lambda: self._client.xrange(key, "-", "+", count=limit), "purge_held")
        return [Held(entry_id.decode(), fields.get(b"t", b"").decode("utf-8", "replace"), fields.get(b"f", b""))
                for entry_id, fields in entries]

    def purge_drop(self, queue: str, ids: Sequence[str]) -> int:
        key = self._held_key(queue)
        ids = [i for i in ids if _STREAM_ID.fullmatch(str(i))]   # another adapter's id names no entry
        if not ids:
            return 0
        return int(self._call(lambda: self._client.xdel(key, *ids), "purge_drop"))

    def purge_dead_letters(self, queue: str) -> int:
        key = self.queue_keys(queue)[N_LANES + 2]

        def send():
            pipe = self._client.pipeline(transaction=True)
            pipe.xlen(key)
            pipe.delete(key)
            return pipe.execute()[0]

        return int(self._call(send, "purge_dead_letters"))

    def delete_queue(self, queue: str) -> None:
        """The admin script's "delete" (every key of the queue, its held keys too, one slot)
        and SREM from the registry, in one pipeline."""
        commands = [self._evalsha(self._admin_script, queue, "delete"), ("SREM", self._queues_key, queue)]
        self._call(lambda: self._store.run(commands), "delete_queue")
        self._keys.pop(queue, None)
        self._declared.discard(queue)
        self._xadd_heads.pop(queue, None)

    def stats(self, queue: str) -> QueueStats:
        ready, in_flight, delayed, dead, throttled = self._admin(queue, "stats")
        return QueueStats(queue, int(ready), int(in_flight), int(delayed), int(dead), int(throttled))

    def queues(self) -> list[str]:
        names = self._call(lambda: self._client.smembers(self._queues_key), "queues")
        return sorted(n.decode() for n in names)

    def ping(self) -> None:
        self._call(self._client.ping, "ping")

    def close(self) -> None:
        self._closed = True
        self._store.close()
