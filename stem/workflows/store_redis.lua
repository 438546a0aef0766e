-- stem's workflow store on Redis (stem/workflows/store_redis.py): every mutating operation of
-- the WorkflowStore contract, and the sweeper's reads, one script call each.
--
-- Key schema.  N = the result backend's namespace.  Runs are spread over 64 shards; a run's
-- shard is crc32(run id) mod 64 and its keys, with the shard's indexes, share the shard's hash
-- tag T (a tag per shard, picked so the 64 slots are spread evenly over 0..16383).  So every
-- script below touches one slot, on a single Redis and on a Redis Cluster alike, and a run
-- and the indexes that find it change together in one script: no index can lag its run.
--
--   N:{T}:r:ID      HASH   the run: name, version, input, status, epoch, owner, lease_until,
--                          wake_at, waiting, waits_for, inbox_count, inbox_seen, parent, result,
--                          error, attention, generation, created_at, updated_at, waits_kind (absent field =
--                          None), and pbase: the key prefix "N:{T'}:" of the parent's shard.
--                          Times are the caller's floats as Python's repr (read back exactly);
--                          epoch and the inbox counters are decimal integers.
--   N:{T}:j:ID      LIST   the journal: element i is the entry at position i (msgpack, packed by
--                          the client, opaque here).  append pushes only when LLEN == position.
--   N:{T}:e:ID      ZSET   the inbox: score seq, member "<len(event id)>:<event id><len(topic)>:
--                          <topic><created_at>:<payload>" (lengths in bytes, created_at a repr)
--   N:{T}:i:ID      HASH   event id -> seq (duplicates by event id are stored once)
--   N:{T}:due       ZSET   run id -> when the run needs an activation: wake_at (PENDING; PARKED
--                          on a timer), lease_until (RUNNING), -inf (PARKED with unread
--                          events); absent when nothing but a send or an operator can make it due
--   N:{T}:parked    ZSET   (score 0) PARKED runs with waits_for, by id
--   N:{T}:runs      ZSET   (score 0) every run, by id
--   N:{T}:s:STATUS  ZSET   (score 0) the runs of one status, by id
--   N:{T}:notify    ZSET   child id -> finish time: a terminal child whose parent lives in
--                          another slot (a cluster only) and has not been sent "__child__" yet
--
-- KEYS: [1] due, [2] parked, [3] runs, [4] notify of the shard; a run's operations add
-- [5] run, [6] journal, [7] events, [8] event ids.  ARGV[1] is the operation, then per operation
-- (ID the run id, "" for the shard operations; NOW the caller's now; an optional value (opt)
-- is "+value", or "-" for None):
--   create     ID NOW name version input parent|"" pbase|""  -> {created 0|1, HGETALL}
--   claim      ID NOW owner lease_until                    -> HGETALL | nil
--   renew      ID NOW epoch lease_until                    -> 1 | 0
--   append     ID NOW epoch position entry                 -> 1 | 0
--   park       ID NOW epoch wake_at(opt) waiting(opt) waits_for(opt) inbox_seen waits_kind(opt)
--                                                      -> "parked"|"inbox"|"fenced"
--   finish     ID NOW epoch status result(opt) error(opt) cross -> {1, note} | {0}
--   attention  ID NOW epoch reason                         -> 1 | 0
--   continue   ID NOW epoch input seq...                   -> 1 | 0
--   release    ID NOW epoch                                -> 1 | 0
--   cancel     ID NOW cross                                -> {HGETALL, note} | nil
--   reset      ID NOW to_position                          -> HGETALL | nil
--   send       ID NOW event_id member                      -> {stored 0|1, HGETALL} | {-1}
--   notify     ID NOW child_id                             -> 1 | 0   (ID: the parent)
--   notified   ID NOW child_id                             -> 1 | 0   (ID: the child; shard keys only)
--   due        "" NOW limit     -> {{{id, reason, score, epoch}...}, {{child, finished at, parent, pbase}...}}
--   parked_on  "" "" after|"" limit                -> {id, waits_for, waits_kind|"", ...}
--   runs       "" "" status|"" name|"" after|"" limit cap
--                                 -> {{{id, HGETALL}...}, the last id scanned | nil, done 0|1}
-- A finish or cancel sends the parent "__child__" in the same script when the parent's keys
-- are reachable from it (same shard, or cross = "1": a single Redis); otherwise it adds the
-- child to its shard's notify set in the same script (the note {parent, pbase} tells the
-- client), the client sends the parent its event (notify, idempotent by event id) and then
-- removes the child from the set (notified); due lists what a crash left in the set.

local DUE, PARKED, RUNS, NOTIFY = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local BASE = string.sub(DUE, 1, #DUE - 3)          -- "N:{T}:"
local op, ID, NOW = ARGV[1], ARGV[2], ARGV[3]
local TERMINAL = {SUCCEEDED = true, FAILED = true, CANCELLED = true}

local function keys_of(base, id)
  return {base = base, run = base .. 'r:' .. id, journal = base .. 'j:' .. id, events = base .. 'e:' .. id,
          eids = base .. 'i:' .. id, due = base .. 'due', parked = base .. 'parked'}
end

local K = keys_of(BASE, ID)

-- an optional value: "+value" sets the field (even to ""), "-" deletes it
local function put_opt(field, v)
  if string.sub(v, 1, 1) == '+' then
    redis.call('HSET', K.run, field, string.sub(v, 2))
  else
    redis.call('HDEL', K.run, field)
  end
end

-- after every change of a run: its status set, its due entry, its parked entry
local function index(k, id, old)
  local f = redis.call('HMGET', k.run, 'status', 'wake_at', 'lease_until', 'inbox_count', 'inbox_seen',
                       'waits_for')
  local st = f[1]
  if old ~= st then
    if old then redis.call('ZREM', k.base .. 's:' .. old, id) end
    redis.call('ZADD', k.base .. 's:' .. st, 0, id)
  end
  local score = false
  if st == 'PENDING' then
    score = f[2]
  elseif st == 'PARKED' then
    if tonumber(f[4]) > tonumber(f[5]) then score = '-inf' else score = f[2] end
  elseif st == 'RUNNING' then
    score = f[3]
  end
  if score then redis.call('ZADD', k.due, score, id) else redis.call('ZREM', k.due, id) end
  if st == 'PARKED' and f[6] then redis.call('ZADD', k.parked, 0, id) else redis.call('ZREM', k.parked, id) end
end

local function held(epoch)
  local f = redis.call('HMGET', K.run, 'status', 'epoch')
  return f[1] == 'RUNNING' and f[2] == epoch
end

-- an event into a run's inbox unless it has one with this id: seq = inbox_count + 1
local function store_event(k, eid, member)
  if redis.call('HEXISTS', k.eids, eid) == 1 then return false end
  local seq = redis.call('HINCRBY', k.run, 'inbox_count', 1)
  redis.call('ZADD', k.events, seq, member)
  redis.call('HSET', k.eids, eid, seq)
  redis.call('HSET', k.run, 'updated_at', NOW)
  return true
end

-- "__child__" from child_id into the parent pid (keys under pbase), unless it is absent or ended
local function deliver(pbase, pid, child_id, when)
  local k = keys_of(pbase, pid)
  local st = redis.call('HGET', k.run, 'status')
  if not st or TERMINAL[st] then return 0 end
  if not store_event(k, child_id, #child_id .. ':' .. child_id .. '9:__child__' .. when .. ':') then return 0 end
  index(k, pid, st)
  return 1
end

-- the child ID ended: tell its parent now, or leave a note in the shard's notify set
local function notify_parent(cross)
  local p = redis.call('HMGET', K.run, 'parent', 'pbase')
  if not p[1] then return false end
  if cross == '1' or p[2] == BASE then
    deliver(p[2], p[1], ID, NOW)
    return false
  end
  redis.call('ZADD', NOTIFY, NOW, ID)
  return {p[1], p[2]}
end

local function clear(...)
  redis.call('HDEL', K.run, ...)
end

if op == 'create' then
  if redis.call('EXISTS', K.run) == 1 then return {0, redis.call('HGETALL', K.run)} end
  redis.call('DEL', K.journal, K.events, K.eids)
  redis.call('HSET', K.run, 'name', ARGV[4], 'version', ARGV[5], 'input', ARGV[6], 'status', 'PENDING', 'epoch', '0',
             'wake_at', NOW, 'inbox_count', '0', 'inbox_seen', '0', 'generation', '0', 'created_at', NOW,
             'updated_at', NOW)
  if ARGV[7] ~= '' then redis.call('HSET', K.run, 'parent', ARGV[7], 'pbase', ARGV[8]) end
  redis.call('ZADD', RUNS, 0, ID)
  index(K, ID, nil)
  return {1, redis.call('HGETALL', K.run)}

elseif op == 'claim' then
  local f = redis.call('HMGET', K.run, 'status', 'lease_until')
  local st = f[1]
  if not st then return false end
  if not (st == 'PENDING' or st == 'PARKED' or (st == 'RUNNING' and f[2] and tonumber(f[2]) <= tonumber(NOW))) then
    return false
  end
  redis.call('HINCRBY', K.run, 'epoch', 1)
  redis.call('HSET', K.run, 'status', 'RUNNING', 'owner', ARGV[4], 'lease_until', ARGV[5], 'updated_at', NOW)
  clear('wake_at', 'waiting', 'waits_for', 'waits_kind')
  index(K, ID, st)
  return redis.call('HGETALL', K.run)

elseif op == 'renew' then
  if not held(ARGV[4]) then return 0 end
  redis.call('HSET', K.run, 'lease_until', ARGV[5], 'updated_at', NOW)
  index(K, ID, 'RUNNING')
  return 1

elseif op == 'append' then
  if not held(ARGV[4]) or redis.call('LLEN', K.journal) ~= tonumber(ARGV[5]) then return 0 end
  redis.call('RPUSH', K.journal, ARGV[6])
  return 1

elseif op == 'park' then
  if not held(ARGV[4]) then return 'fenced' end
  if redis.call('HGET', K.run, 'inbox_count') ~= ARGV[8] then return 'inbox' end
  redis.call('HSET', K.run, 'status', 'PARKED', 'inbox_seen', ARGV[8], 'updated_at', NOW)
  clear('owner', 'lease_until')
  put_opt('wake_at', ARGV[5])
  put_opt('waiting', ARGV[6])
  put_opt('waits_for', ARGV[7])
  put_opt('waits_kind', ARGV[9])
  index(K, ID, 'RUNNING')
  return 'parked'

elseif op == 'finish' then
  if not held(ARGV[4]) then return {0} end
  redis.call('HSET', K.run, 'status', ARGV[5], 'updated_at', NOW)
  clear('owner', 'lease_until', 'wake_at', 'waiting', 'waits_for', 'waits_kind')
  put_opt('result', ARGV[6])
  put_opt('error', ARGV[7])
  index(K, ID, 'RUNNING')
  return {1, notify_parent(ARGV[8])}

elseif op == 'attention' then
  if not held(ARGV[4]) then return 0 end
  redis.call('HSET', K.run, 'status', 'NEEDS_ATTENTION', 'attention', ARGV[5], 'updated_at', NOW)
  clear('owner', 'lease_until', 'wake_at', 'waiting', 'waits_for', 'waits_kind')
  index(K, ID, 'RUNNING')
  return 1

elseif op == 'continue' then
  if not held(ARGV[4]) then return 0 end
  redis.call('DEL', K.journal)
  for i = 6, #ARGV do
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', K.events, ARGV[i], ARGV[i])) do
      local colon = string.find(m, ':', 1, true)
      local n = tonumber(string.sub(m, 1, colon - 1))
      redis.call('HDEL', K.eids, string.sub(m, colon + 1, colon + n))
    end
    redis.call('ZREMRANGEBYSCORE', K.events, ARGV[i], ARGV[i])
  end
  redis.call('HINCRBY', K.run, 'epoch', 1)
  redis.call('HINCRBY', K.run, 'generation', 1)
  redis.call('HSET', K.run, 'input', ARGV[5], 'status', 'PENDING', 'wake_at', NOW, 'updated_at', NOW)
  clear('owner', 'lease_until', 'waiting', 'waits_for', 'waits_kind')
  index(K, ID, 'RUNNING')
  return 1

elseif op == 'release' then
  if not held(ARGV[4]) then return 0 end
  redis.call('HSET', K.run, 'status', 'PENDING', 'wake_at', NOW, 'updated_at', NOW)
  clear('owner', 'lease_until', 'waiting', 'waits_for', 'waits_kind')
  index(K, ID, 'RUNNING')
  return 1

elseif op == 'cancel' then
  local st = redis.call('HGET', K.run, 'status')
  if not st then return false end
  if TERMINAL[st] then return {redis.call('HGETALL', K.run), false} end
  redis.call('HINCRBY', K.run, 'epoch', 1)
  redis.call('HSET', K.run, 'status', 'CANCELLED', 'updated_at', NOW)
  clear('owner', 'lease_until', 'wake_at', 'waiting', 'waits_for', 'waits_kind')
  index(K, ID, st)
  local note = notify_parent(ARGV[4])
  return {redis.call('HGETALL', K.run), note}

elseif op == 'reset' then
  local st = redis.call('HGET', K.run, 'status')
  if not st then return false end
  local keep = tonumber(ARGV[4])
  if keep == 0 then
    redis.call('DEL', K.journal)
  elseif keep < redis.call('LLEN', K.journal) then   -- past the end: nothing to cut
    redis.call('LTRIM', K.journal, 0, keep - 1)
  end
  redis.call('HINCRBY', K.run, 'epoch', 1)
  redis.call('HSET', K.run, 'status', 'PENDING', 'wake_at', NOW, 'updated_at', NOW)
  clear('owner', 'lease_until', 'waiting', 'waits_for', 'waits_kind', 'result', 'error', 'attention')
  index(K, ID, st)
  return redis.call('HGETALL', K.run)

elseif op == 'send' then
  local st = redis.call('HGET', K.run, 'status')
  if not st then return {-1} end
  if TERMINAL[st] or not store_event(K, ARGV[4], ARGV[5]) then return {0, redis.call('HGETALL', K.run)} end
  index(K, ID, st)
  return {1, redis.call('HGETALL', K.run)}

elseif op == 'notify' then
  return deliver(BASE, ID, ARGV[4], NOW)

elseif op == 'notified' then
  return redis.call('ZREM', NOTIFY, ARGV[4])

elseif op == 'due' then
  local now = tonumber(NOW)
  local got = redis.call('ZRANGEBYSCORE', DUE, '-inf', NOW, 'WITHSCORES', 'LIMIT', 0, ARGV[4])
  local out = {}
  for i = 1, #got, 2 do
    local id = got[i]
    local f = redis.call('HMGET', BASE .. 'r:' .. id, 'status', 'wake_at', 'inbox_count', 'inbox_seen', 'lease_until',
                         'epoch')
    local st, reason = f[1], false
    if st == 'PENDING' and f[2] and tonumber(f[2]) <= now then
      reason = 'start'
    elseif st == 'PARKED' and f[2] and tonumber(f[2]) <= now then
      reason = 'timer'
    elseif st == 'PARKED' and tonumber(f[3]) > tonumber(f[4]) then
      reason = 'inbox'
    elseif st == 'RUNNING' and f[5] and tonumber(f[5]) <= now then
      reason = 'lease'
    end
    if reason then out[#out + 1] = {id, reason, got[i + 1], f[6]} end
  end
  local notes = {}
  local pending = redis.call('ZRANGEBYSCORE', NOTIFY, '-inf', '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[4])
  for i = 1, #pending, 2 do
    local p = redis.call('HMGET', BASE .. 'r:' .. pending[i], 'parent', 'pbase')
    if p[1] then notes[#notes + 1] = {pending[i], pending[i + 1], p[1], p[2]} end
  end
  return {out, notes}

elseif op == 'parked_on' then
  local from = '-'
  if ARGV[4] ~= '' then from = '(' .. ARGV[4] end
  local out = {}
  for _, id in ipairs(redis.call('ZRANGEBYLEX', PARKED, from, '+', 'LIMIT', 0, ARGV[5])) do
    out[#out + 1] = id
    local f = redis.call('HMGET', BASE .. 'r:' .. id, 'waits_for', 'waits_kind')
    out[#out + 1] = f[1] or ''
    out[#out + 1] = f[2] or ''
  end
  return out

elseif op == 'runs' then
  local idx = RUNS
  if ARGV[4] ~= '' then idx = BASE .. 's:' .. ARGV[4] end
  local from = '-'
  if ARGV[6] ~= '' then from = '(' .. ARGV[6] end
  local limit, cap = tonumber(ARGV[7]), tonumber(ARGV[8])
  local ids = redis.call('ZRANGEBYLEX', idx, from, '+', 'LIMIT', 0, cap)
  local out, last = {}, false
  for _, id in ipairs(ids) do
    last = id
    local key = BASE .. 'r:' .. id
    if ARGV[5] == '' or redis.call('HGET', key, 'name') == ARGV[5] then
      out[#out + 1] = {id, redis.call('HGETALL', key)}
      if #out >= limit then break end
    end
  end
  local done = 0
  if #ids < cap and #out < limit then done = 1 end
  return {out, last, done}
end
return redis.error_reply('unknown workflow store op ' .. tostring(op))
