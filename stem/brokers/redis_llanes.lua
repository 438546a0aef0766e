-- stem Redis broker: limit lanes (Message.limit), key schema and helpers shared by every
-- redis_*.lua script (prepended after redis_common.lua).  "Limit lanes" (llane) are not the
-- priority lanes (lane0..9) of redis_common.lua: a message with a limit never enters a stream.
--
-- Key schema, all in the queue's slot (BASE = "N:{q:Q}:"); R = a rate key, C = a concurrency
-- key, L = a limit lane's name: <bytes of R>:R|C (R or C empty when the limit has none).
--
--   N:{q:Q}:llanes      ZSET    L -> when its first message may be leased next (ms; fractions of
--                               a ms order the turns of round robin).  Exactly the lanes that hold
--                               messages.
--   N:{q:Q}:llane:L     ZSET    packed limited message -> (9 - clamp(priority, 0, 9)) * 2^43 + seq:
--                               priority first, then first published first.  Deleted when empty.
--   N:{q:Q}:lsizes      ZSET    L -> messages waiting in lane L; member "" -> all lanes (stats).
--   N:{q:Q}:ldelayed    ZSET    packed limited message -> not_before (ms); enters its lane when due.
--   N:{q:Q}:lleases     ZSET    delivery id -> lease deadline (ms) of a delivery leased under a limit
--                               (never in a stream, so never in the PEL nor in XPENDING).
--   N:{q:Q}:lflight     HASH    delivery id -> the packed message as leased (d = its delivery count).
--   N:{q:Q}:lrate:R     STRING  GCRA theoretical arrival time of R (ms, fractional), PXAT itself:
--                               a bucket whose TAT passed is the same as no bucket.
--   N:{q:Q}:lslots:C    ZSET    delivery id -> lease deadline (ms): C's slots; live = deadline > now,
--                               expired ones pruned when C is checked; PEXPIREAT the latest deadline.
--   N:{q:Q}:lwait:C     SET     lanes scored at C's earliest slot deadline: a freed slot makes
--                               them eligible now.  Expires with lslots:C.
--   N:{q:Q}:lkeys       ZSET    "r" .. R / "c" .. C -> when that bucket / those slots expire at the
--                               latest: delete_queue's index (no SCAN); pruned by consume.
--   N:{q:Q}:lseq        STRING  the queue's count of limited messages (ids and FIFO order).
--   N:{q:Q}:lturn       STRING  the last round-robin turn given (ms, fractional), PX 60 s.
--   N:{q:Q}:lnotify     STREAM  MAXLEN 1: written when a lane gets a message or a slot frees up;
--                               a consumer blocked in XREAD watches it beside the priority lanes.
--
-- Packed limited message (a lane member, a ldelayed member, a lflight value):
--   "<id> <priority> <vt-ms> <d> <kt> <kl> <rate> <burst> <concurrency> <len k> <len R> <len C>
--    <len task id> " .. k .. R .. C .. task id .. frame
-- id = "<ms at publish>-<seq>" (unique in the queue even after delete_queue reset seq), d = the
-- deliveries so far (a lease from the lane is delivery d + 1), k/kt/kl the key of a keyed
-- message (len 0: none), rate in leases per second as Python wrote it.
-- A member that does not unpack is dead-lettered whole (f) with reason "decode-error".

-- The helpers are built on first use (L.name): a script run that never touches a limit lane
-- (a plain consume, a plain ack) does not pay for defining them.
local function build_limit_lanes()
  local LLANES, LSIZES, LDELAYED = BASE .. 'llanes', BASE .. 'lsizes', BASE .. 'ldelayed'
  local LLEASES, LFLIGHT, LKEYS = BASE .. 'lleases', BASE .. 'lflight', BASE .. 'lkeys'
  local LSEQ, LTURN, LNOTIFY = BASE .. 'lseq', BASE .. 'lturn', BASE .. 'lnotify'
  local SEQ_SPAN = 8796093022208   -- 2^43: seq below it, priority above it (exact in a double)

  local function llane_key(lane) return BASE .. 'llane:' .. lane end
  local function lrate_key(r) return BASE .. 'lrate:' .. r end
  local function lslots_key(c) return BASE .. 'lslots:' .. c end
  local function lwait_key(c) return BASE .. 'lwait:' .. c end

  -- (integers written with %d: Lua's own number format turns 15 digits into an exponent)
  local function lpack(m)
    return m.id .. string.format(' %d %d %d %d %d ', m.p, m.v, m.d, m.kt, m.kl) .. m.rate
           .. string.format(' %d %d %d %d %d %d ', m.burst, m.conc, #m.k, #m.rk, #m.ck, #m.t)
           .. m.k .. m.rk .. m.ck .. m.t .. m.f
  end

  -- the message packed in s (a table; k, rk, ck are '' when absent), or nil
  local function lunpack(s)
    local _, stop, id, p, v, d, kt, kl, rate, burst, conc, kn, rn, cn, tn = string.find(s,
      '^(%d+%-%d+) (%-?%d+) (%d+) (%d+) (%d+) (%d+) (%S+) (%d+) (%d+) (%d+) (%d+) (%d+) (%d+) ')
    if stop == nil then return nil end
    kn, rn, cn, tn = tonumber(kn), tonumber(rn), tonumber(cn), tonumber(tn)
    local r = tonumber(rate)
    if stop + kn + rn + cn + tn > #s or r == nil then return nil end
    if (rn > 0 and not (r > 0 and tonumber(burst) >= 1)) or (cn > 0 and tonumber(conc) < 1) then return nil end
    local at = stop + 1
    local m = {id = id, p = tonumber(p), v = tonumber(v), d = tonumber(d), kt = tonumber(kt), kl = tonumber(kl),
               rate = rate, burst = tonumber(burst), conc = tonumber(conc)}
    m.k = string.sub(s, at, at + kn - 1); at = at + kn
    m.rk = string.sub(s, at, at + rn - 1); at = at + rn
    m.ck = string.sub(s, at, at + cn - 1); at = at + cn
    m.t = string.sub(s, at, at + tn - 1)
    m.f = string.sub(s, at + tn)
    return m
  end

  -- A limited message from loose values (a publish's arguments, a dead letter's fields).
  local function lmessage(t, f, p, v, k, kt, kl, rk, rate, burst, ck, conc)
    return {id = '', p = math.floor(tonumber(p) or 0), v = tonumber(v) or 0, d = 0, k = k or '',
            kt = tonumber(kt) or 0, kl = tonumber(kl) or 0, rk = rk or '', rate = rate or '0',
            burst = tonumber(burst) or 1, ck = ck or '', conc = tonumber(conc) or 0, t = t or '', f = f or ''}
  end

  local function lane_name(m) return #m.rk .. ':' .. m.rk .. '|' .. m.ck end

  -- A fresh id for m (publish, retry, replay, route): the queue's next seq.
  local function lnew_id(m, now)
    m.id = now .. '-' .. redis.call('INCR', LSEQ)
  end

  local function lscore(m)
    local p = m.p
    if p < 0 then p = 0 elseif p > 9 then p = 9 end
    return (9 - p) * SEQ_SPAN + (tonumber(string.match(m.id, '%-(%d+)$')) or 0) % SEQ_SPAN
  end

  local function lnotify()
    redis.call('XADD', LNOTIFY, 'MAXLEN', 1, '*', 'n', 1)
  end

  -- Put m into its lane (a new lane is eligible now; a throttled one keeps its time).
  local function enlane(m, now)
    local lane = lane_name(m)
    if redis.call('ZADD', llane_key(lane), lscore(m), lpack(m)) == 1 then
      redis.call('ZINCRBY', LSIZES, 1, lane)
      redis.call('ZINCRBY', LSIZES, 1, '')
      redis.call('ZADD', LLANES, 'NX', now, lane)
    end
  end

  -- Take member s out of lane; returns how many messages are left in the lane.  The bookkeeping
  -- of an emptied lane goes with it.
  local function delane(lane, s)
    if redis.call('ZREM', llane_key(lane), s) == 0 then return redis.call('ZCARD', llane_key(lane)) end
    local left = tonumber(redis.call('ZINCRBY', LSIZES, -1, lane))
    if tonumber(redis.call('ZINCRBY', LSIZES, -1, '')) <= 0 then redis.call('ZREM', LSIZES, '') end
    if left <= 0 then
      redis.call('ZREM', LSIZES, lane)
      redis.call('ZREM', LLANES, lane)
    end
    return left
  end

  -- Lanes waiting on C may be leased now.
  local function wake(c, now)
    local w = lwait_key(c)
    local lanes = redis.call('SMEMBERS', w)
    if #lanes == 0 then return end
    for _, lane in ipairs(lanes) do redis.call('ZADD', LLANES, 'XX', 'LT', now, lane) end
    redis.call('DEL', w)
    lnotify()
  end

  local function free_slot(c, id, now)
    if c ~= '' and redis.call('ZREM', lslots_key(c), id) == 1 then
      wake(c, now)
      if redis.call('EXISTS', lslots_key(c)) == 0 then redis.call('ZREM', LKEYS, 'c' .. c) end
    end
  end

  -- Keep C's slots (and its waiting lanes) at least until `at`, and index them for delete_queue.
  local function keep_slots(c, at)
    local s = lslots_key(c)
    local until_ms = redis.call('PEXPIRETIME', s)
    if until_ms < at then redis.call('PEXPIREAT', s, at) end
    redis.call('ZADD', LKEYS, 'GT', at, 'c' .. c)
  end

  -- nil when m may be leased now, else the ms at which it may be at the earliest (a lane blocked
  -- by its concurrency key is registered as waiting on it).
  local function blocked_until(m, lane, now)
    if m.ck ~= '' then
      local s = lslots_key(m.ck)
      redis.call('ZREMRANGEBYSCORE', s, '-inf', now)
      if redis.call('ZCARD', s) >= m.conc then
        local first = redis.call('ZRANGE', s, 0, 0, 'WITHSCORES')
        local w = lwait_key(m.ck)
        redis.call('SADD', w, lane)
        local until_ms = redis.call('PEXPIRETIME', s)
        if until_ms > 0 then redis.call('PEXPIREAT', w, until_ms) end
        return tonumber(first[2])
      end
    end
    if m.rk ~= '' then
      local interval = 1000 / tonumber(m.rate)
      local tau = (m.burst - 1) * interval
      local tat = tonumber(redis.call('GET', lrate_key(m.rk))) or now
      if tat < now then tat = now end
      if tat - now > tau + 1e-6 then return tat - tau end
    end
    return nil
  end

  -- Lease m (the member s of lane) for vt ms: take a token and a slot, record the lease.
  local function llease(m, lane, s, now, vt)
    delane(lane, s)
    if m.rk ~= '' then
      local tat = tonumber(redis.call('GET', lrate_key(m.rk))) or now
      if tat < now then tat = now end
      tat = tat + 1000 / tonumber(m.rate)
      local expire = math.ceil(tat)
      redis.call('SET', lrate_key(m.rk), string.format('%.4f', tat), 'PXAT', expire)
      redis.call('ZADD', LKEYS, expire, 'r' .. m.rk)
    end
    m.d = m.d + 1
    local deadline = now + vt
    if m.ck ~= '' then
      redis.call('ZADD', lslots_key(m.ck), deadline, m.id)
      keep_slots(m.ck, deadline)
    end
    redis.call('HSET', LFLIGHT, m.id, lpack(m))
    redis.call('ZADD', LLEASES, deadline, m.id)
  end

  -- End the lease of delivery id: returns its message (nil when it is no longer leased) and the
  -- raw packed value (for a dead letter when it does not unpack).  Its slot is freed.
  local function lsettle(id, now)
    local s = redis.call('HGET', LFLIGHT, id)
    redis.call('ZREM', LLEASES, id)
    if not s then return nil, nil end
    redis.call('HDEL', LFLIGHT, id)
    local m = lunpack(s)
    if m then free_slot(m.ck, id, now) end
    return m, s
  end

  -- A dead letter of a limited message keeps its limit (lrk, lr, lb, lck, lc) for replay.
  local function add_dead_limited(m, reason, now)
    local args = {'XADD', DEAD, '*', 't', m.t, 'f', m.f, 'p', m.p, 'v', m.v, 'r', reason, 'at', now,
                  'lrk', m.rk, 'lr', m.rate, 'lb', m.burst, 'lck', m.ck, 'lc', m.conc}
    if m.k ~= '' then
      local n = #args
      args[n + 1], args[n + 2], args[n + 3], args[n + 4], args[n + 5], args[n + 6] = 'k', m.k, 'kt', m.kt, 'kl', m.kl
    end
    redis.call(unpack(args))
  end

  -- rate key, concurrency key of a lane name
  local function lane_keys(lane)
    local colon = string.find(lane, ':', 1, true)
    local n = tonumber(string.sub(lane, 1, colon - 1))
    return string.sub(lane, colon + 1, colon + n), string.sub(lane, colon + n + 2)
  end
  return {LLANES = LLANES, LSIZES = LSIZES, LDELAYED = LDELAYED, LLEASES = LLEASES, LFLIGHT = LFLIGHT, LKEYS = LKEYS, LSEQ = LSEQ, LTURN = LTURN, LNOTIFY = LNOTIFY, SEQ_SPAN = SEQ_SPAN, llane_key = llane_key, lrate_key = lrate_key, lslots_key = lslots_key, lwait_key = lwait_key, lpack = lpack, lunpack = lunpack, lmessage = lmessage, lane_name = lane_name, lnew_id = lnew_id, lscore = lscore, lnotify = lnotify, enlane = enlane, delane = delane, wake = wake, free_slot = free_slot, keep_slots = keep_slots, blocked_until = blocked_until, llease = llease, lsettle = lsettle, add_dead_limited = add_dead_limited, lane_keys = lane_keys}
end

local L = setmetatable({}, {__index = function(t, name)
  for k, v in pairs(build_limit_lanes()) do rawset(t, k, v) end
  return rawget(t, name)
end})
