"""The Redis result backend: statuses with a TTL, pub/sub wake-ups, heartbeats, revocations, schedules.

Key schema (N = namespace, default "stem"; "{...}" are Redis Cluster hash tags):

    N:{t:ID}:status     STRING   msgpack TaskStatus (stem.results.encode_status), PX its own
                                 lifetime (base.status_ttl: TaskStatus.ttl, else result_expires)
    N:{t:ID}:done       channel  a terminal store PUBLISHes the encoded status here
    N:{hb}:w:WORKER     STRING   msgpack heartbeat dict, PX ttl (a dead worker's key expires)
    N:{hb}:index        ZSET     worker id -> expiry (ms); lists heartbeats without KEYS,
                                 pruned on every read
    N:{revoked}         ZSET     task id -> revoked-until (ms), pruned on every read and write
    N:{revoked}:p:ID    STRING   the revocation's proof (stem.revocation), PX until revoked-until;
                                 absent for a revocation stored without one
    N:{sched}:index     SET      every schedule id with a record (lists them without SCAN)
    N:{sched}:s:ID      HASH     a schedule record: def (msgpack Schedule.to_dict(); absent for a
                                 schedule in code), paused "0"|"1", last_fired (float, absent
                                 before the first run), last_run_id, updated_at; no expiry
    N:{g:ID}:meta       HASH     a group record (stem.backends.groups): expected, sealed, finished,
                                 succeeded, failed, interrupted, held ("0"|"1" / counts), data,
                                 created_at, seal_by, ttl_ms (its lifetime once ended: each member's
                                 script extends it); no expiry until it ended (complete and not held,
                                 or interrupted; a held one at its release), then PX ttl_ms on all
                                 four keys, set by the script that ends it; token: which
                                 group_publish transaction created it (absent otherwise)
    N:{g:ID}:done       SET      the finished member ids (a member counts once)
    N:{g:ID}:res        HASH     member index -> its outcome bytes
    N:{g:ID}:failed     SET      the failed member ids
    N:{groups}:unsealed ZSET     group id -> seal_by (epoch s) of groups not sealed yet (the sweep's index)
    N:{groups}:completing ZSET   N:{g:ID}:meta -> when (epoch s) a worker's count completed the group
                                 and acked its last member in the same pipeline
                                 (``store_record_and_ack``, single Redis), until the completion ran
                                 (``group_completed``; the sweep's ``group_completions_due``)

Waits (``wait``, ``wait_many``, ``watch``) share one pub/sub connection per
backend instance (``stem.backends.redis_listen``): a waiter registers its ids
with the backend's ``WaitHub``, the listener thread SUBSCRIBEs their channels,
and once a subscription is confirmed the hub's reader reads the id (pipelined
GETs on one pooled connection): a terminal store that lands after the read is
published to a channel already listened on, and one that landed before is what
the read returns, so nothing is missed and nothing polls.  With the command
connection that is two connections for any number of concurrent waits in the
process.  ``store_many`` is one
pipelined round trip (SET + PUBLISH for each terminal status);
``store_if_not_terminal`` one pipeline of one small script call per status
(each touches one key, so it works on Redis Cluster too).  Schedule records
change only through ``_SCHEDULE``, one script call per change, which keeps a
record and the index together (both under the ``{sched}`` hash tag).

Connections come from the process-wide pool of the URL, shared with
``RedisBroker`` (``stem.stores.redis``); redis errors become
``BackendConnectionError`` / ``BackendError``.  With a broker on the same
pool (``shares_store_with``), results and acks go in one pipeline.

On a Redis Cluster (``redis+cluster://``) every script and multi-key command
here stays in one slot (a status key; ``{hb}``, ``{revoked}``, ``{sched}``);
the settle pipeline puts a ``BARRIER`` between the results and the acks (the
acks are sent once every result answered), and the wait listener subscribes on
one random primary (``_listen_pool``): PUBLISH reaches every node.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any, Callable, Sequence, TypeVar

import msgspec

from .. import _checks as checks
from ..results import TaskStatus, decode_status, encode_status
from ..stores.base import BACKEND_ERRORS
from ..stores.redis import (BARRIER, RedisStore, execute, execute_watched, pack_commands, raise_first_error,
                            validate_namespace)
from .redis_listen import Subscriber
from .groups import GroupRecord, check_create, check_due, check_group_id, check_lifetime, check_member
from .waiting import WaitHub
from .base import (DEFAULT_RESULT_EXPIRES, TERMINAL_STATE_NAMES, ResultBackend, ScheduleRecord, check_definition,
                   check_fired, check_non_terminal, check_proofs, check_schedule_ids, status_ttl)

__all__ = ["RedisResultBackend", "ATOMIC_MAX", "group_record_of"]

#: The largest group ``group_publish`` creates with its members in one ``MULTI``/``EXEC``.
ATOMIC_MAX = 1000

# Group record scripts: KEYS = meta, done, res, failed of one group (one hash tag).
_GROUP_FIELDS = ("expected", "sealed", "finished", "succeeded", "failed", "interrupted", "data", "created_at",
                 "seal_by", "ttl_ms", "held")
_GROUP_COMMON = """
local function ended(v)
  return v[5] == '1' or (v[1] == '1' and tonumber(v[2]) >= tonumber(v[3]))
end
-- start the lifetime of a record that ended (complete and not held, or interrupted), once
local function end_if_done()
  local v = redis.call('HMGET', KEYS[1], 'sealed', 'finished', 'expected', 'ttl_ms', 'interrupted', 'held')
  if ended(v) and (v[6] ~= '1' or v[5] == '1') and redis.call('PTTL', KEYS[1]) == -1 then
    for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], v[4]) end
  end
end
-- a key written after the lifetime started (a late member of an interrupted record) expires with it
local function expire_with_meta()
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then
    for i = 2, 4 do
      if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], left) end
    end
  end
end
local function record()
  return redis.call('HMGET', KEYS[1], %s)
end
""" % ", ".join(repr(f) for f in _GROUP_FIELDS)
# ARGV: expected, data, created_at, seal_by, ttl_ms, held ("1"|"0")
_GROUP_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'expected', ARGV[1], 'sealed', '0', 'finished', '0', 'succeeded', '0', 'failed', '0',
           'interrupted', '0', 'data', ARGV[2], 'created_at', ARGV[3], 'seal_by', ARGV[4], 'ttl_ms', ARGV[5],
           'held', ARGV[6])
return 1
"""
_GROUP_SEAL = _GROUP_COMMON + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'sealed', '1')
end_if_done()
return record()
"""
# ARGV: brief ("1": answer 1 instead of the record when every member of the call is new, succeeded,
# and the group is still incomplete: the common case, with nothing for the caller to do), then per
# member: id, index, ok ("1"|"0"), outcome, ttl_ms (its result lifetime: the first member's replaces
# the creation's, then the longest).  A worker records a batch's successes of one group in one call.
# With a fifth key (N:{groups}:completing, a single Redis only) ARGV[2] is the time, the members
# follow it, and a group this call completes (a member newly counted, sealed, every member
# finished) is noted there by its meta key (ZADD NX: the first note's time stays), until the
# runner removes it once the completion ran (``group_completed``) or the sweep runs it.
_GROUP_RECORD = _GROUP_COMMON + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local quiet = ARGV[1] == '1'
local finished = 0
local first = 2
if #KEYS == 5 then first = 3 end
for i = first, #ARGV, 5 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    finished = redis.call('HINCRBY', KEYS[1], 'finished', 1)
    if ARGV[i + 2] == '1' then
      redis.call('HINCRBY', KEYS[1], 'succeeded', 1)
    else
      redis.call('HINCRBY', KEYS[1], 'failed', 1)
      redis.call('SADD', KEYS[4], ARGV[i])
      quiet = false
    end
    redis.call('HSET', KEYS[3], ARGV[i + 1], ARGV[i + 3])
    if finished == 1 or tonumber(ARGV[i + 4]) > tonumber(redis.call('HGET', KEYS[1], 'ttl_ms')) then
      redis.call('HSET', KEYS[1], 'ttl_ms', ARGV[i + 4])
    end
  else
    quiet = false
  end
end
end_if_done()
expire_with_meta()
if finished > 0 and (quiet or #KEYS == 5) then
  local v = redis.call('HMGET', KEYS[1], 'sealed', 'expected')
  local complete = v[1] == '1' and finished >= tonumber(v[2])
  if complete and #KEYS == 5 then redis.call('ZADD', KEYS[5], 'NX', ARGV[2], KEYS[1]) end
  if quiet and not complete then return 1 end
end
return record()
"""
# ARGV: ttl_ms (the reader's result lifetime)
_GROUP_RELEASE = _GROUP_COMMON + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local v = redis.call('HMGET', KEYS[1], 'sealed', 'finished', 'expected', 'ttl_ms', 'interrupted')
local ttl = math.max(tonumber(v[4]), tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'held', '0', 'ttl_ms', ttl)
if ended(v) then
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
return record()
"""
# ARGV: now
_GROUP_INTERRUPT = _GROUP_COMMON + """
local v = redis.call('HMGET', KEYS[1], 'sealed', 'interrupted', 'seal_by')
if not v[1] or v[1] == '1' or v[2] == '1' or tonumber(v[3]) >= tonumber(ARGV[1]) then return false end
redis.call('HSET', KEYS[1], 'interrupted', '1')
end_if_done()
return record()
"""


def group_record_of(group_id: str, v: list) -> "GroupRecord | None":
    """The record in the reply to ``group_get_command`` (or a group script), None if absent."""
    if not v or v[0] is None:
        return None
    return GroupRecord(group_id, int(v[0]), v[1] == b"1", int(v[2]), int(v[3]), int(v[4]), v[5] == b"1",
                       bytes(v[6]), float(v[7]), float(v[8]), int(v[9]) / 1000, v[10] == b"1")


def _records_out(n: int, calls: list[tuple[str, list[int]]], replies: Sequence[Any]
                 ) -> list[GroupRecord | bool | None]:
    """``store_and_record``'s answer from its script calls' replies: each call's record (or
    None: no such group, none of its members counted) to the last of its members, True to
    the others and to every member of a call answered 1 (counted, nothing to do)."""
    out: list[GroupRecord | bool | None] = [True] * n
    for (g, positions), reply in zip(calls, replies):
        record = True if reply == 1 else group_record_of(g, reply)
        if record is None:
            for p in positions:
                out[p] = None
        else:
            out[positions[-1]] = record
    return out


_T = TypeVar("_T")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(dict).decode
_CHUNK = 1000
_FALLBACK_POLL_S = 1.0     # the waits' re-read interval while the pub/sub connection is down

# KEYS[1] = a status key; ARGV[1] = the encoded status, ARGV[2] = PX (ms).  SET unless the stored
# status is terminal.  Redis's cmsgpack cannot read msgpack bin values (a result may hold bytes),
# so the state is read from the head of the record: encode_status writes a map whose first two
# entries are "id" and "state" (TaskStatus's first fields, never omitted).  A record this cannot
# read is left alone: a conditional store must never replace a result it cannot see.
#: Store statuses in one call (a single Redis; a Cluster sends SET + PUBLISH per status): KEYS
#: are status keys (N:{t:ID}:status), ARGV two per key: the encoded status, and its PX in ms,
#: negated for a terminal status, which is also PUBLISHed on N:{t:ID}:done.  One command
#: instead of one or two per status, and a terminal status's bytes sent once, not twice.
_STORE_STATUSES = """
for i = 1, #KEYS do
  local data, px = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  if px < 0 then
    redis.call('SET', KEYS[i], data, 'PX', -px)
    redis.call('PUBLISH', string.sub(KEYS[i], 1, -7) .. 'done', data)
  else
    redis.call('SET', KEYS[i], data, 'PX', px)
  end
end
return #KEYS
"""
_STATUSES_PER_CALL = 500

_STORE_IF_NOT_TERMINAL = """
local terminal = {%s}
local cur = redis.call('GET', KEYS[1])
if cur then
  local pos = 1
  local function str()
    local c = string.byte(cur, pos)
    local len, start
    if c == nil then return nil end
    if c >= 0xa0 and c <= 0xbf then len, start = c - 0xa0, pos + 1
    elseif c == 0xd9 then len, start = string.byte(cur, pos + 1), pos + 2
    elseif c == 0xda then
      local a, b = string.byte(cur, pos + 1, pos + 2)
      len, start = a * 256 + b, pos + 3
    elseif c == 0xdb then
      local a, b, d, e = string.byte(cur, pos + 1, pos + 4)
      len, start = ((a * 256 + b) * 256 + d) * 256 + e, pos + 5
    else return nil end
    if len == nil then return nil end
    pos = start + len
    return string.sub(cur, start, start + len - 1)
  end
  local head = string.byte(cur, 1)
  if head == nil then return 0 end
  if head >= 0x80 and head <= 0x8f then pos = 2
  elseif head == 0xde then pos = 4
  elseif head == 0xdf then pos = 6
  else return 0 end
  if str() ~= 'id' or str() == nil or str() ~= 'state' then return 0 end
  local state = str()
  if state == nil or terminal[state] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""" % ", ".join(f"{name} = true" for name in TERMINAL_STATE_NAMES)

# KEYS[1] = N:{sched}:s:ID, KEYS[2] = N:{sched}:index; ARGV[1] = the op, ARGV[2] = ID,
# ARGV[3] = now (epoch s), then per op:
#   put    ARGV[4] = "1" with a definition in ARGV[5], "0" for none; keeps the state fields
#   pause  ARGV[4] = "1" | "0"; returns 1 if the flag changed (a missing record is not paused)
#   fired  ARGV[4] = fire time, ARGV[5] = run id; last_fired and last_run_id move together and
#          only forward (Lua compares the numbers: a float's repr reads back exactly)
#   remove returns 1 if there was a record
# Every op but remove creates a missing record (not paused) and indexes its id.
_SCHEDULE = """
local op, id, now = ARGV[1], ARGV[2], ARGV[3]
if op == 'remove' then
  redis.call('SREM', KEYS[2], id)
  return redis.call('DEL', KEYS[1])
end
local created = redis.call('HSETNX', KEYS[1], 'paused', '0')
redis.call('SADD', KEYS[2], id)
if op == 'put' then
  if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'def', ARGV[5]) else redis.call('HDEL', KEYS[1], 'def') end
elseif op == 'pause' then
  local was = redis.call('HGET', KEYS[1], 'paused')
  if was == ARGV[4] then
    if created == 1 then redis.call('HSET', KEYS[1], 'updated_at', now) end
    return 0
  end
  redis.call('HSET', KEYS[1], 'paused', ARGV[4])
elseif op == 'fired' then
  local last = redis.call('HGET', KEYS[1], 'last_fired')
  if last and tonumber(last) >= tonumber(ARGV[4]) then return 0 end
  redis.call('HSET', KEYS[1], 'last_fired', ARGV[4], 'last_run_id', ARGV[5])
else
  return redis.error_reply('unknown schedule op ' .. op)
end
redis.call('HSET', KEYS[1], 'updated_at', now)
return 1
"""


def _schedule_record(schedule_id: str, fields: dict[bytes, bytes]) -> ScheduleRecord:
    last = fields.get(b"last_fired")
    run_id = fields.get(b"last_run_id")
    return ScheduleRecord(schedule_id, fields.get(b"def"), fields.get(b"paused") == b"1",
                          None if last is None else float(last), None if run_id is None else run_id.decode(),
                          float(fields.get(b"updated_at", 0.0)))


class RedisResultBackend(ResultBackend):
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, namespace: str = "stem",
                 result_expires: float = DEFAULT_RESULT_EXPIRES, socket_timeout: float = 5.0,
                 socket_connect_timeout: float = 2.0, retry_attempts: int = 4, reconnect_timeout: float = 10.0):
        """``reconnect_timeout``: how long a wait survives losing Redis (the listener keeps
        reconnecting; a wait whose backend stays unreachable that long raises
        ``BackendConnectionError``)."""
        self.url = url
        self.namespace = validate_namespace(namespace)
        self.result_expires = checks.seconds("result_expires", result_expires)
        self._store = RedisStore(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
                                 retry_attempts=retry_attempts, errors=BACKEND_ERRORS)
        self.retry_attempts = self._store.retry_attempts
        self._client = self._store.client
        ns = self.namespace
        self._hb_index = f"{ns}:{{hb}}:index"
        self._revoked_key = f"{ns}:{{revoked}}"
        self._store_statuses = self._store.script(_STORE_STATUSES)
        self._store_if_not_terminal = self._store.script(_STORE_IF_NOT_TERMINAL)
        self._schedule = self._store.script(_SCHEDULE)
        self._schedule_index = f"{ns}:{{sched}}:index"
        self._group_create = self._store.script(_GROUP_CREATE)
        self._group_seal = self._store.script(_GROUP_SEAL)
        self._group_record = self._store.script(_GROUP_RECORD)
        self._group_release = self._store.script(_GROUP_RELEASE)
        self._group_interrupt = self._store.script(_GROUP_INTERRUPT)
        self._unsealed = f"{ns}:{{groups}}:unsealed"
        self._completing = f"{ns}:{{groups}}:completing"
        self.reconnect_timeout = checks.seconds("reconnect_timeout", reconnect_timeout)
        self._waits = WaitHub(name=f"redis-{ns}", read=self._read_found, label=self._store.label,
                              poll=lambda: None if self._subscriber.listening else _FALLBACK_POLL_S,
                              on_change=lambda: self._subscriber.kick(), fail_after=self.reconnect_timeout)
        self._subscriber = Subscriber(pool=self._listen_pool, hub=self._waits, channel=self._channel,
                                      prefix=f"{ns}:{{t:", suffix="}:done", label=self._store.label)

    def _listen_pool(self) -> Any:
        """The pool the wait listener takes its connection from.  On a Redis Cluster, a
        random primary's: a PUBLISH on any node reaches the subscribers of every node (the
        cluster bus carries it), so one connection serves every slot; after a lost
        connection the next one may be another node."""
        if not self._store.cluster:
            return self._client.connection_pool
        return self._client.get_redis_connection(random.choice(self._client.get_primaries())).connection_pool

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisResultBackend":
        return cls(url, **kwargs)

    def _status_key(self, task_id: str) -> str:
        return f"{self.namespace}:{{t:{task_id}}}:status"

    #: The key of a task's status and the channel its terminal status is published on.
    status_key = _status_key

    def _channel(self, task_id: str) -> str:
        return f"{self.namespace}:{{t:{task_id}}}:done"

    done_channel = _channel

    def _proof_key(self, task_id: str) -> str:
        return f"{self._revoked_key}:p:{task_id}"

    def _hb_key(self, worker_id: str) -> str:
        return f"{self.namespace}:{{hb}}:w:{worker_id}"

    def _schedule_key(self, schedule_id: str) -> str:
        return f"{self.namespace}:{{sched}}:s:{schedule_id}"

    def _call(self, fn: Callable[[], _T], what: str) -> _T:
        return self._store.call(fn, what)

    def reopen_recipe(self) -> tuple[str, dict[str, Any]] | None:
        return (self.url, {"namespace": self.namespace})

    def workflow_store_recipe(self) -> tuple[str, Any] | None:
        return ("stem.workflows.store_redis:RedisWorkflowStore", self)

    # -- statuses ---------------------------------------------------------------------
    def store(self, status: TaskStatus) -> None:
        self.store_many((status,))

    def _status_commands(self, statuses: Sequence[TaskStatus]) -> list[tuple]:
        """SET (PX: the status's own lifetime, ``status_ttl``) and, for a terminal status,
        PUBLISH; all made before any is sent, so a refused ttl sends nothing.  On a single
        Redis one ``_STORE_STATUSES`` call per 500 statuses does both (the settle pipeline's
        results in one command); on a Cluster, whose statuses live in many slots, each is
        its own SET (+ PUBLISH)."""
        default = self.result_expires
        px = checks.ms(default)
        ms = checks.ms
        if not self._store.cluster:
            sha = self._store_statuses.sha
            commands = []
            for start in range(0, len(statuses), _STATUSES_PER_CALL):
                chunk = statuses[start:start + _STATUSES_PER_CALL]
                keys, args = [], []
                for s in chunk:
                    keys.append(self._status_key(s.id))
                    ttl = px if s.ttl is None else ms(status_ttl(s, default))
                    args.append(encode_status(s))
                    args.append(-ttl if s.is_terminal else ttl)
                commands.append(("EVALSHA", sha, len(keys), *keys, *args))
            return commands
        commands = []
        for s in statuses:
            data = encode_status(s)
            commands.append(("SET", self._status_key(s.id), data, "PX",
                             px if s.ttl is None else ms(status_ttl(s, default))))
            if s.is_terminal:
                commands.append(("PUBLISH", self._channel(s.id), data))
        return commands

    def store_many(self, statuses: Sequence[TaskStatus]) -> None:
        if not statuses:
            return
        commands = self._status_commands(statuses)
        self._call(lambda: self._store.run(commands), "store")   # SETs and PUBLISHes: safe to resend

    def store_if_not_terminal(self, statuses: Sequence[TaskStatus]) -> None:
        if not check_non_terminal(statuses):
            return
        default = self.result_expires
        sha = self._store_if_not_terminal.sha
        commands = [("EVALSHA", sha, 1, self._status_key(s.id), encode_status(s), checks.ms(status_ttl(s, default)))
                    for s in statuses]
        self._call(lambda: self._store.run(commands), "store_if_not_terminal")   # the script is idempotent

    def store_many_and_ack(self, statuses: Sequence[TaskStatus], broker: Any, deliveries: Sequence[Any]) -> bool:
        """Store ``statuses`` and ack ``deliveries`` in one round trip when ``broker`` is a
        ``RedisBroker`` on this same server: one pipeline whose SETs come before the ack
        scripts (Redis runs one connection's commands in order, so the ack never lands
        without its result; a connection lost in between only redelivers).  Returns False,
        doing nothing, otherwise."""
        if not self.shares_store_with(broker):
            return False
        commands = self._store_and_ack_commands(statuses, broker, deliveries)
        self._call(lambda: broker.store.run(commands), "store+ack")
        return True

    def store_many_ack_and_consume(self, statuses: Sequence[TaskStatus], broker: Any, deliveries: Sequence[Any],
                                   queues: Sequence[str], max_count: int, consumer: str) -> list | None:
        """The pipeline of ``store_many_and_ack`` with a consume script call after the acks
        (``RedisBroker.run_and_consume``: tried once, errors raised as broker errors)."""
        if not self.shares_store_with(broker):
            return None
        return broker.run_and_consume(self._store_and_ack_commands(statuses, broker, deliveries), queues, max_count,
                                      consumer=consumer)

    def _store_and_ack_commands(self, statuses: Sequence[TaskStatus], broker: Any, deliveries: Sequence[Any]) -> list:
        """The statuses' SETs first, then the broker's ack scripts: the order at-least-once needs.
        On a Redis Cluster a ``BARRIER`` between them keeps that order across nodes."""
        statuses_part, acks = self._status_commands(statuses), broker.ack_commands(deliveries)
        if self._store.cluster and statuses_part and acks:
            # results and acks live in other slots, maybe on other nodes: the acks are sent
            # once every result has answered OK (stem.stores.redis_cluster, "Phases")
            return [*statuses_part, BARRIER, *acks]
        return statuses_part + acks

    def get(self, task_id: str) -> TaskStatus | None:
        data = self._call(lambda: self._client.get(self._status_key(task_id)), "get")
        return None if data is None else decode_status(data)

    def get_many(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        if not task_ids:
            return []
        keys = [self._status_key(t) for t in task_ids]

        def send():
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            return pipe.execute()

        return [None if d is None else decode_status(d) for d in self._call(send, "get_many")]

    def _read_found(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        """The stored statuses among ``task_ids``: one pipeline of GETs (the hub's reads)."""
        commands = [("GET", self._status_key(t)) for t in task_ids]

        def send() -> list:
            replies = execute(self._client, commands)
            raise_first_error(replies)
            return replies

        replies = self._call(send, "wait")
        return [decode_status(d) for d in replies if d is not None]

    def forget(self, task_id: str) -> None:
        self._call(lambda: self._client.delete(self._status_key(task_id)), "forget")

    # -- heartbeats ---------------------------------------------------------------------
    def put_heartbeat(self, worker_id: str, data: dict[str, Any], ttl: float) -> None:
        ttl = checks.seconds("ttl", ttl)
        now = time.time()
        payload = _encode({**data, "worker_id": worker_id, "seen_at": now})

        def send():
            pipe = self._client.pipeline(transaction=False)
            pipe.set(self._hb_key(worker_id), payload, px=checks.ms(ttl))
            pipe.zadd(self._hb_index, {worker_id: int((now + ttl) * 1000)})
            pipe.zremrangebyscore(self._hb_index, "-inf", int(now * 1000))
            return pipe.execute()

        self._call(send, "put_heartbeat")

    def heartbeats(self) -> list[dict[str, Any]]:
        now_ms = int(time.time() * 1000)

        def send():
            pipe = self._client.pipeline(transaction=False)
            pipe.zremrangebyscore(self._hb_index, "-inf", now_ms)
            pipe.zrange(self._hb_index, 0, -1)
            workers = pipe.execute()[1]
            if not workers:
                return []
            return self._client.mget([self._hb_key(w.decode()) for w in workers])

        return [_decode(d) for d in self._call(send, "heartbeats") if d is not None]

    def remove_heartbeat(self, worker_id: str) -> None:
        def send():
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(self._hb_key(worker_id))
            pipe.zrem(self._hb_index, worker_id)
            return pipe.execute()

        self._call(send, "remove_heartbeat")

    # -- revocations ----------------------------------------------------------------------
    def revoke(self, task_ids: Sequence[str], expires: float | None = None,
               proofs: Sequence[bytes | None] | None = None) -> None:
        """ZADD (the latest revoke sets the expiry, as on every adapter) and each proof's SET
        (or DEL, for a revoke without one) with the same deadline, in one round trip."""
        commands = self.revoke_commands(task_ids, expires, proofs)
        if commands:
            self._call(lambda: raise_first_error(execute(self._client, commands)), "revoke")

    def revoke_commands(self, task_ids: Sequence[str], expires: float | None = None,
                        proofs: Sequence[bytes | None] | None = None) -> list[tuple]:
        """``revoke``'s commands (checked; [] for no ids), for ``revoke`` and the async producer."""
        expires = checks.optional_seconds("expires", expires)
        task_ids = list(task_ids)
        latest = dict(zip(task_ids, check_proofs(task_ids, proofs)))
        if not latest:
            return []
        now = time.time()
        until_ms = int((now + (self.result_expires if expires is None else float(expires))) * 1000)
        commands: list[tuple] = [("ZADD", self._revoked_key, *(x for t in latest for x in (until_ms, t))),
                                 ("ZREMRANGEBYSCORE", self._revoked_key, "-inf", int(now * 1000))]
        for t, proof in latest.items():
            commands.append(("DEL", self._proof_key(t)) if proof is None else
                            ("SET", self._proof_key(t), proof, "PXAT", until_ms))
        return commands

    def revoked(self, task_ids: Sequence[str] | None = None) -> set[str]:
        now_ms = int(time.time() * 1000)
        if task_ids is None:
            def send():
                pipe = self._client.pipeline(transaction=False)
                pipe.zremrangebyscore(self._revoked_key, "-inf", now_ms)
                pipe.zrange(self._revoked_key, 0, -1)
                return pipe.execute()[1]

            return {t.decode() for t in self._call(send, "revoked")}
        ids = list(task_ids)
        if not ids:
            return set()
        scores = self._call(lambda: self._client.zmscore(self._revoked_key, ids), "revoked")
        return {t for t, s in zip(ids, scores) if s is not None and s > now_ms}

    def revocation_proofs(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        ids = list(task_ids)
        out: dict[str, bytes] = {}
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            found = self._call(lambda: self._client.mget([self._proof_key(t) for t in chunk]), "revocation_proofs")
            out.update((t, p) for t, p in zip(chunk, found) if p is not None)
        return out

    # -- schedule records -----------------------------------------------------------------
    def schedule_records(self, ids: Sequence[str] | None = None) -> dict[str, ScheduleRecord]:
        wanted = check_schedule_ids(ids)

        def send() -> dict[str, ScheduleRecord]:
            names = wanted
            if names is None:
                names = sorted(m.decode() for m in self._client.smembers(self._schedule_index))
            out: dict[str, ScheduleRecord] = {}
            for i in range(0, len(names), _CHUNK):
                chunk = names[i:i + _CHUNK]
                pipe = self._client.pipeline(transaction=False)
                for n in chunk:
                    pipe.hgetall(self._schedule_key(n))
                out.update((n, _schedule_record(n, h)) for n, h in zip(chunk, pipe.execute()) if h)
            return out

        return self._call(send, "schedule_records")

    def _schedule_op(self, op: str, schedule_id: str, *args: Any) -> int:
        command = ("EVALSHA", self._schedule.sha, 2, self._schedule_key(schedule_id), self._schedule_index, op,
                   schedule_id, repr(time.time()), *args)
        return self._call(lambda: self._store.run([command])[0], f"{op}_schedule")

    def put_schedule(self, schedule_id: str, definition: bytes | None) -> None:
        checks.schedule_id(schedule_id)
        definition = check_definition(definition)
        self._schedule_op("put", schedule_id, *(("0",) if definition is None else ("1", definition)))

    def remove_schedule(self, schedule_id: str) -> bool:
        checks.schedule_id(schedule_id)
        return self._schedule_op("remove", schedule_id) > 0

    def pause_schedule(self, schedule_id: str, paused: bool) -> bool:
        checks.schedule_id(schedule_id)
        checks.flag("paused", paused)
        return self._schedule_op("pause", schedule_id, "1" if paused else "0") > 0

    def mark_fired(self, schedule_id: str, fire_time: float, run_id: str) -> None:
        schedule_id, fire_time, run_id = check_fired(schedule_id, fire_time, run_id)
        self._schedule_op("fired", schedule_id, repr(fire_time), run_id)

    # -- group records -------------------------------------------------------------------
    def _group_keys(self, group_id: str) -> tuple[str, str, str, str]:
        base = f"{self.namespace}:{{g:{group_id}}}"
        return f"{base}:meta", f"{base}:done", f"{base}:res", f"{base}:failed"

    def _group_script(self, script: Any, group_id: str, *args: Any) -> Any:
        command = ("EVALSHA", script.sha, 4, *self._group_keys(group_id), *args)
        return self._call(lambda: self._store.run([command])[0], "group")

    def group_create(self, group_id: str, expected: int, data: bytes, *, seal_by: float, ttl: float,
                     held: bool = False) -> bool:
        group_id, expected, data, seal_by, ttl, held = check_create(group_id, expected, data, seal_by, ttl, held)
        # indexed first: a record the sweep cannot find would be the one that waits forever
        self._call(lambda: self._client.zadd(self._unsealed, {group_id: seal_by}), "group_create")
        return self._group_script(self._group_create, group_id, expected, data, repr(time.time()), repr(seal_by),
                                  checks.ms(ttl), "1" if held else "0") == 1

    def group_publish(self, group_id: str, expected: int, data: bytes, *, seal_by: float, ttl: float, held: bool,
                      broker: Any, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], priority: int = 0,
                      visibility_timeout: float | None = None) -> bool | None:
        """``WATCH`` the record's key; if it is absent, one ``MULTI``: the record (an ``HSET``,
        sealed, with a token of this call), the broker's packed XADDs, ``EXEC``, then an
        ``HGET`` of the token, which says whether this call's transaction ran (an ``EXEC``
        that another creation of the same id aborted ran nothing).  A producer killed before
        its ``EXEC`` reached Redis leaves nothing: Redis discards the queued commands.  Up to
        ``ATOMIC_MAX`` members: an ``EXEC`` holds the whole server while it runs (every
        other client waits), about 2 ms per 1,000 XADDs, so a larger group is created,
        published and sealed in steps (None), and the sweep covers a crash in between."""
        pack = getattr(broker, "pack_frames", None)
        if (pack is None or len(task_ids) > ATOMIC_MAX or self._store.cluster
                or not self.shares_store_with(broker)):
            return None
        group_id, expected, data, seal_by, ttl, held = check_create(group_id, expected, data, seal_by, ttl, held)
        packed, n = pack(queue, task_ids, frames, priority=priority, visibility_timeout=visibility_timeout)
        if not n:
            return None
        meta = self._group_keys(group_id)[0]
        token = uuid.uuid4().hex
        head = pack_commands((("MULTI",), (
            "HSET", meta, "expected", expected, "sealed", "1", "finished", "0", "succeeded", "0", "failed", "0",
            "interrupted", "0", "data", data, "created_at", repr(time.time()), "seal_by", repr(seal_by),
            "ttl_ms", checks.ms(ttl), "held", "1" if held else "0", "token", token)))
        tail = pack_commands((("EXEC",), ("HGET", meta, "token")))
        count = 2 + n + 2

        def send() -> bool:
            # sent again as a whole after a lost connection: a transaction that ran then finds
            # the record (False), and the members were published by it
            fresh, error, mine = execute_watched(self._client, meta, head + packed + tail, count)
            if error is not None:
                raise error
            return fresh and mine == token.encode()

        created = self._call(send, "group_publish")
        if created:
            broker.declared([queue])
        return created

    def group_seal(self, group_id: str) -> GroupRecord | None:
        check_group_id(group_id)
        record = group_record_of(group_id, self._group_script(self._group_seal, group_id))
        self._call(lambda: self._client.zrem(self._unsealed, group_id), "group_seal")
        return record

    def group_record(self, group_id: str, member_id: str, index: int, ok: bool,
                     outcome: bytes, ttl: float | None = None) -> GroupRecord | None:
        group_id, member_id, index, outcome, ttl = check_member(group_id, member_id, index, outcome, ttl,
                                                                self.result_expires)
        return group_record_of(group_id, self._group_script(self._group_record, group_id, "0", member_id, index,
                                                          "1" if ok else "0", outcome, checks.ms(ttl)))

    def group_record_many(self, items: Sequence[tuple[str, str, int, bool, bytes, float | None]]
                          ) -> list[GroupRecord | None]:
        return self.store_and_record((), items)

    def store_and_record(self, statuses: Sequence[TaskStatus],
                         members: Sequence[tuple[str, str, int, bool, bytes, float | None]],
                         brief: bool = False) -> list[GroupRecord | bool | None]:
        """One pipeline: the statuses' SETs (and PUBLISHes), then the counts (on a Redis
        Cluster, after a ``BARRIER``: every status answered before a count).  ``brief``: the
        successes of one group are counted in one script call, whose answer goes to the last
        of them (True to the others); otherwise one call per member."""
        commands, calls, first = self._record_commands(statuses, members, brief, None)
        if not commands:
            return []
        # idempotent: safe to resend; the statuses' replies are stepped over, not built
        if self._store.cluster:
            replies = self._call(lambda: self._store.run(commands), "store_and_record")[first:]
        else:
            replies = self._call(lambda: self._store.run_tail(commands, len(calls)), "store_and_record")
        return _records_out(len(members), calls, replies)

    def _record_commands(self, statuses: Sequence[TaskStatus],
                         members: Sequence[tuple[str, str, int, bool, bytes, float | None]], brief: bool,
                         noted_at: float | None) -> tuple[list, list[tuple[str, list[int]]], int]:
        """``store_and_record``'s pipeline: (commands, (group id, positions in ``members``) per
        script call, the position of the first call).  ``noted_at``: the counts note the groups
        they complete in ``N:{groups}:completing`` at that time (a single Redis only)."""
        default = self.result_expires
        ms = checks.ms
        commands = self._status_commands(statuses) if statuses else []
        if commands and self._store.cluster:
            commands.append(BARRIER)      # on a cluster too: the statuses are stored before the counts
        first = len(commands)
        sha = self._group_record.sha
        calls: list[tuple[str, list[int]]] = []         # (group id, positions in members) per script call
        group_args: list[list[Any]] = []
        if brief and all(item[3] for item in members):   # a worker's successes: one call per group, one pass
            px = ms(default)
            by_group: dict[str, tuple[list[int], list[Any]]] = {}
            for n, (g, m, i, _, o, t) in enumerate(members):
                g, m, i, o, t = check_member(g, m, i, o, t, default)
                entry = by_group.get(g)
                if entry is None:
                    entry = by_group[g] = ([], [])
                entry[0].append(n)
                entry[1].extend((m, i, "1", o, px if t == default else ms(t)))
            for g, (positions, args) in by_group.items():
                calls.append((g, positions))
                group_args.append(args)
        else:
            for n, (g, m, i, ok, o, t) in enumerate(members):
                g, m, i, o, t = check_member(g, m, i, o, t, default)
                calls.append((g, [n]))
                group_args.append([m, i, "1" if ok else "0", o, ms(t)])
        flag = "1" if brief else "0"
        for (g, _), args in zip(calls, group_args):
            if noted_at is None:
                commands.append(("EVALSHA", sha, 4, *self._group_keys(g), flag, *args))
            else:
                commands.append(("EVALSHA", sha, 5, *self._group_keys(g), self._completing, flag, repr(noted_at),
                                 *args))
        return commands, calls, first

    def store_record_and_ack(self, statuses: Sequence[TaskStatus],
                             members: Sequence[tuple[str, str, int, bool, bytes, float | None]], broker: Any,
                             deliveries: Sequence[Any], queues: Sequence[str] = (), max_count: int = 0,
                             consumer: str = "") -> tuple[list[GroupRecord | bool | None], list | None] | None:
        """One pipeline on a single Redis that shares its server with ``broker``: the
        statuses, the counts (``store_and_record(brief=True)``) noting each group they
        complete in ``N:{groups}:completing``, the acks, and with ``queues`` and
        ``max_count`` a consume after them (``RedisBroker.run_keep_and_consume``: tried
        once).  The member that completes its group is acked before the completion ran:
        the note is what makes that safe (the runner removes it once the completion ran,
        ``group_completed``; the sweep runs what is left, ``group_completions_due``).  None
        on a Redis Cluster (the index lives in another slot than the records) or another
        server, and nothing is done."""
        if self._store.cluster or not members or not self.shares_store_with(broker):
            return None
        commands, calls, first = self._record_commands(statuses, members, True, time.time())
        stop = first + len(calls)
        commands += broker.ack_commands(deliveries)
        if queues and max_count > 0:
            kept, leased = broker.run_keep_and_consume(commands, first, stop, queues, max_count, consumer=consumer)
            return _records_out(len(members), calls, kept), leased
        # safe to resend: the counts, the note (NX) and the acks are idempotent
        replies = self._call(lambda: broker.store.run(commands), "store+record+ack")
        return _records_out(len(members), calls, replies[first:stop]), None

    def group_completions_due(self, before: float, limit: int = 100) -> list[GroupRecord]:
        before, limit = check_due(before, limit)
        keys = self._call(lambda: self._client.zrangebyscore(self._completing, "-inf", before, start=0, num=limit),
                          "group_completions_due")
        if not keys:
            return []
        prefix, suffix = f"{self.namespace}:{{g:", "}:meta"
        ids = [k.decode()[len(prefix):-len(suffix)] for k in keys]

        def send() -> list:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(k, _GROUP_FIELDS)
            return pipe.execute()

        records = [group_record_of(g, v) for g, v in zip(ids, self._call(send, "group_completions_due"))]
        gone = [k for k, r in zip(keys, records) if r is None or not r.complete]
        if gone:     # expired (or never complete: nothing to run): not noted any longer
            self._call(lambda: self._client.zrem(self._completing, *gone), "group_completions_due")
        return [r for r in records if r is not None and r.complete]

    def group_completed(self, group_ids: Sequence[str]) -> None:
        keys = [self._group_keys(check_group_id(g))[0] for g in group_ids]
        if keys:
            self._call(lambda: self._client.zrem(self._completing, *keys), "group_completed")

    def group_release(self, group_id: str, ttl: float | None = None) -> GroupRecord | None:
        check_group_id(group_id)
        ttl = check_lifetime(ttl, self.result_expires)
        return group_record_of(group_id, self._group_script(self._group_release, group_id, checks.ms(ttl)))

    def group_get(self, group_id: str) -> GroupRecord | None:
        command = self.group_get_command(group_id)
        return group_record_of(group_id, self._call(lambda: self._client.hmget(command[1], command[2:]), "group_get"))

    def group_get_command(self, group_id: str) -> tuple:
        """``group_get``'s command (``group_record_of`` reads its reply): the async producer
        sends it too (``stem.backends.redis_async``)."""
        check_group_id(group_id)
        return ("HMGET", self._group_keys(group_id)[0], *_GROUP_FIELDS)

    def group_outcomes(self, group_id: str, start: int, stop: int) -> list[bytes | None]:
        if stop <= start:
            check_group_id(group_id)
            return []
        command = self.group_outcomes_command(group_id, start, stop)
        # packed in C (stem.stores.redis_pipe), not by redis-py: a page is 1,000 fields, and
        # redis-py's per-argument encoding cost a chord's callback ~0.7 µs per member read
        return self._call(lambda: self._store.run((command,))[0], "group_outcomes")

    def group_outcomes_command(self, group_id: str, start: int, stop: int) -> tuple:
        """``group_outcomes``' command (``stop > start``), for the async producer too."""
        check_group_id(group_id)
        return ("HMGET", self._group_keys(group_id)[2], *range(start, stop))

    def group_failed_members(self, group_id: str, limit: int = 100) -> list[str]:
        check_group_id(group_id)
        failed = self._group_keys(group_id)[3]
        ids = self._call(lambda: self._client.smembers(failed), "group_failed_members")
        return sorted(i.decode() for i in ids)[:limit]

    def group_interrupt_unsealed(self, now: float | None = None) -> list[GroupRecord]:
        now = time.time() if now is None else now
        ids = [i.decode() for i in self._call(lambda: self._client.zrangebyscore(self._unsealed, "-inf", now),
                                              "group_interrupt_unsealed")]
        out = []
        for group_id in ids:
            record = group_record_of(group_id, self._group_script(self._group_interrupt, group_id, repr(now)))
            if record is not None:
                out.append(record)
        if ids:
            self._call(lambda: self._client.zrem(self._unsealed, *ids), "group_interrupt_unsealed")
        return out

    # -- misc -------------------------------------------------------------------------------
    def ping(self) -> None:
        self._call(self._client.ping, "ping")

    def close(self) -> None:
        self._subscriber.stop()
        self._waits.stop()
        self._store.close()
