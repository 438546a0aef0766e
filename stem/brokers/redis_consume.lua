-- consume: lease up to COUNT messages of one queue, atomically.
--   KEYS: the per-queue layout (see redis_common.lua)
--   ARGV[1] consumer name   ARGV[2] COUNT   ARGV[3] default visibility timeout (ms)
--   ARGV[4] how many due delayed messages to move at most
--   ARGV[5] "0": the caller will not block when nothing comes (the refill in a settle
--           pipeline), so an empty reply is {0} alone, without the wake times and the
--           last ids (two ZRANGEs and eleven XREVRANGEs); absent or "1": all of it;
--           "2": also when the queue (without limit lanes) was drained -- fewer than COUNT
--           leased and nothing buried: then the reply starts with -n and the block info
--           (the fourteen values an empty reply carries) follows the deliveries' data
-- Steps: (1) move due delayed messages to their lane; (L) when the queue has limit lanes
-- (one EXISTS tells), move its due delayed limited messages and expired limited leases into
-- their lanes, then serve the due lanes round robin (see serve_lanes); (2) re-deliver entries whose
-- lease passed (XCLAIM to this consumer, which counts the delivery); (3) XREADGROUP ">"
-- lane by lane, highest first.  Every delivery gets its lease record in this same script,
-- so no crash can leave a PEL entry that nobody would reclaim.
-- The poison cap is the consumer's: an entry is delivered whatever its delivery count
-- (past max_deliveries the consumer stores the task's DEAD status, then dead-letters it),
-- so no message ends in the dead letters without a status.
-- What cannot be delivered is dead-lettered here with reason "decode-error" (see
-- redis_common.lua): an entry without a task id, a delayed member that does not unpack.
-- Nothing in the reply is ever nil: a nil would end the reply there, and the deliveries
-- after it would be leased but never handed over.
-- Returns {n, d1..dn, next_delayed_ms, next_lease_ms, now_ms, last_id_lane0..9} (but see
-- ARGV[5]) where each
-- delivery d is six values in a row (flat): lane, entry id, task id, frame, vt ms, delivery
-- count; the next_* times are -1 when there is none; the last ids (ids to XREAD BLOCK
-- from) come only when n == 0, followed by the last id of the queue's lnotify stream.
-- next_lease_ms is the earliest of the lease deadlines, limited ones too, the time the next
-- limit lane gets a token or a slot, and the next delayed limited message.
-- When n > 0 and some deliveries are keyed or limited, what they carry follows the
-- deliveries instead: triples (i, key, linger ms) for keyed delivery i (1-based), and six
-- values (-i, rate key, rate, burst, concurrency key, concurrency) for limited delivery i
-- (its lane is -1, its entry id the lflight id; keys "" when the limit has none).
local consumer = ARGV[1]
local count = tonumber(ARGV[2])
local default_vt = tonumber(ARGV[3])
local move_limit = tonumber(ARGV[4])
local now = now_ms()
-- the reply, flat: out[1] = n, then six values per delivery (no table per delivery)
local out = {0}
local n = 0
local BURY_LIMIT = 1000
local buried = 0    -- entries without a task id dead-lettered by step (3)
local read_to = {}  -- lane -> the last id step (3) read there, when it stopped at BURY_LIMIT
local keyed = {}   -- (i, key, linger) triples of the keyed deliveries, (-i, limit...) of limited ones, flat
local LVISIT_LIMIT = 1000   -- limit lanes looked at per call (bounds the script's time)
local LEXPIRE_LIMIT = 1000  -- expired limited leases put back per call
local LTURN_STEP = 1 / 1024 -- ms between two turns of round robin (exact at today's ms in a double)

local function deliver(lane, id, t, f, vt, deliveries, k, kl)
  local i = 1 + 6 * n
  out[i + 1], out[i + 2], out[i + 3], out[i + 4], out[i + 5], out[i + 6] = lane, id, t, f, vt, deliveries
  n = n + 1
  if k then
    local j = #keyed
    keyed[j + 1], keyed[j + 2], keyed[j + 3] = n, k, tonumber(kl) or 0
  end
end

-- an entry's visibility timeout field (ms; missing or 0: the queue's default)
local function vt_of(v)
  v = tonumber(v) or 0
  if v <= 0 then v = default_vt end
  return v
end

-- (1) delayed -> ready
local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, move_limit)
for _, m in ipairs(due) do
  local t, f, p, v, k, kt, kl = unpack_delayed(m)
  if t ~= nil then add_ready(t, f, p, v, k, kt, kl) else add_dead({f = m}, 'decode-error', now) end
  redis.call('ZREM', DELAYED, m)
end

-- (L) limit lanes.  A lane is due while its score <= hi (now, or the last turn given when that
-- is later: turns are fractions of a ms apart).  Each visit of a lane either leases its first
-- message, or rescores the lane past hi (blocked: at the time it gets a token or a slot), or
-- drops a member that does not unpack: so the loop ends.  A lane served gets the next turn,
-- after every lane still due: one message per lane per turn, oldest-eligible first.
local function serve_lanes()
  local due_l = redis.call('ZRANGEBYSCORE', L.LDELAYED, '-inf', now, 'LIMIT', 0, move_limit)
  for _, s in ipairs(due_l) do
    local m = L.lunpack(s)
    if m then L.enlane(m, now) else add_dead({f = s}, 'decode-error', now) end
    redis.call('ZREM', L.LDELAYED, s)
  end
  -- an expired lease's message goes back into its lane, its delivery count kept, behind the
  -- messages waiting there (a new id: a message whose worker keeps dying holds no lane's head)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', L.LLEASES, '-inf', now, 'LIMIT', 0, LEXPIRE_LIMIT)) do
    local m, s = L.lsettle(id, now)
    if m then
      L.lnew_id(m, now)
      L.enlane(m, now)
    elseif s then
      add_dead({f = s}, 'decode-error', now)
    end
  end
  local hi = now
  local last = tonumber(redis.call('GET', L.LTURN))
  if last and last > hi then hi = last end
  local served = false
  local visits = 0
  while n < count and visits < LVISIT_LIMIT do
    local r = redis.call('ZRANGEBYSCORE', L.LLANES, '-inf', hi, 'LIMIT', 0, 1)
    if #r == 0 then break end
    visits = visits + 1
    local lane = r[1]
    local head = redis.call('ZRANGE', L.llane_key(lane), 0, 0)
    if #head == 0 then   -- a lane emptied by hand: its bookkeeping goes
      redis.call('ZREM', L.LLANES, lane)
      redis.call('ZREM', L.LSIZES, lane)
    else
      local m = L.lunpack(head[1])
      if m == nil then
        add_dead({f = head[1]}, 'decode-error', now)
        L.delane(lane, head[1])
      else
        local wait = L.blocked_until(m, lane, now)
        if wait then
          if wait <= hi then wait = hi + LTURN_STEP end
          redis.call('ZADD', L.LLANES, wait, lane)
        else
          local vt = vt_of(m.v)
          L.llease(m, lane, head[1], now, vt)
          hi = hi + LTURN_STEP
          served = true
          local k = nil
          if m.k ~= '' then k = m.k end
          deliver(-1, m.id, m.t, m.f, vt, m.d, k, m.kl)
          local j = #keyed
          keyed[j + 1], keyed[j + 2], keyed[j + 3], keyed[j + 4], keyed[j + 5], keyed[j + 6] =
            -n, m.rk, m.rate, m.burst, m.ck, m.conc
          if redis.call('ZSCORE', L.LSIZES, lane) then   -- messages left: the lane's next turn
            local at = L.blocked_until(m, lane, now) or hi
            if at < hi then at = hi end
            redis.call('ZADD', L.LLANES, at, lane)
          end
        end
      end
    end
  end
  if served then
    redis.call('SET', L.LTURN, string.format('%.4f', hi), 'PX', 60000)
    redis.call('ZREMRANGEBYSCORE', L.LKEYS, '-inf', now)
  end
end

-- (the key names written out: L's helpers are built only for a queue that has limits)
local limited = redis.call('EXISTS', BASE .. 'llanes', BASE .. 'lleases', BASE .. 'ldelayed') > 0
if limited then serve_lanes() end

-- (2) expired leases
local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, count)
for _, member in ipairs(expired) do
  local lane, id = split_member(member)
  local key = KEYS[lane + 1]
  local pend = redis.pcall('XPENDING', key, GROUP, id, id, 1)
  if is_err(pend) then
    -- the group is gone (Redis lost it); step (3) recreates it at id 0 and delivers the entry anew
    redis.call('ZREM', LEASES, member)
  elseif #pend == 0 then
    -- not in the PEL although leased (someone XACKed or DELCONSUMERed by hand): never strand it
    local h = read_entry(lane, id)
    if h == nil then
      settle(lane, id)
    elseif h.t == nil then
      bury(lane, id, h, 'decode-error', now)
    else
      add_ready(h.t, h.f or '', h.p, h.v, h.k, h.kt, h.kl)
      settle(lane, id)
    end
  else
    local claimed = redis.call('XCLAIM', key, GROUP, consumer, 0, id)
    if #claimed == 0 or not claimed[1] or not claimed[1][2] then
      settle(lane, id)  -- the entry was deleted under its PEL record
    else
      local h = fields_of(claimed[1][2])
      if h.t == nil then
        bury(lane, id, h, 'decode-error', now)
      else
        local vt = vt_of(h.v)
        redis.call('ZADD', LEASES, now + vt, member)
        deliver(lane, id, h.t, h.f or '', vt, tonumber(pend[1][4]) + 1, h.k, h.kl)
      end
    end
  end
end

-- (3) fresh entries, highest lane first (one EXISTS call covers the usual case: only lane 0 in use)
local high_lanes = {}
for lane = 1, NLANES - 1 do high_lanes[lane] = KEYS[lane + 1] end
local any_high = redis.call('EXISTS', unpack(high_lanes)) > 0
for lane = NLANES - 1, 0, -1 do
  if n >= count then break end
  local key = KEYS[lane + 1]
  if (lane == 0 or any_high) and redis.call('EXISTS', key) == 1 then
    -- read again only when an entry was dead-lettered from a full batch (else the lane is drained
    -- or n reached count): bad entries never leave the good ones behind them for the next call
    -- (up to BURY_LIMIT of them per call, which bounds how long the script can run)
    local want = count - n
    while want > 0 and buried < BURY_LIMIT do
      local r = redis.pcall('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', want, 'STREAMS', key, '>')
      if is_err(r) then
        redis.pcall('XGROUP', 'CREATE', key, GROUP, '0')
        r = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', want, 'STREAMS', key, '>')
      end
      if not r then break end
      local entries = r[1][2]
      local leases = {}
      for _, e in ipairs(entries) do
        local f = e[2]
        local t, frame, v, k, kl
        if f[1] == 't' and f[3] == 'f' and f[7] == 'v' then   -- the order every XADD writes
          t, frame, v = f[2], f[4], vt_of(f[8])
          if f[9] == 'k' then k, kl = f[10], f[14] end
        else
          local h = fields_of(f)
          t, frame, v, k, kl = h.t, h.f or '', vt_of(h.v), h.k, h.kl
          if t == nil then
            bury(lane, e[1], h, 'decode-error', now)
            buried = buried + 1
          end
        end
        if t ~= nil then
          leases[#leases + 1] = now + v
          leases[#leases + 1] = lane .. '|' .. e[1]
          deliver(lane, e[1], t, frame, v, 1, k, kl)
        end
      end
      if #leases > 0 then redis.call('ZADD', LEASES, unpack(leases)) end
      if #entries < want then break end
      read_to[lane] = entries[#entries][1]
      want = count - n
    end
  end
end

local function first_score(key)
  local r = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #r == 0 then return -1 end
  return tonumber(r[2])
end

-- what a client blocks on: wake times, then the ids to XREAD BLOCK from
local function block_info()
  out[#out + 1] = first_score(DELAYED)
  local next_lease = first_score(LEASES)
  if limited then
    for _, key in ipairs({L.LLANES, L.LLEASES, L.LDELAYED}) do
      local t = first_score(key)
      if t >= 0 and (next_lease < 0 or t < next_lease) then next_lease = math.ceil(t) end
    end
  end
  out[#out + 1] = next_lease
  out[#out + 1] = now
  for lane = 0, NLANES - 1 do
    if buried >= BURY_LIMIT and read_to[lane] then
      out[#out + 1] = read_to[lane]   -- unread entries follow: the client's XREAD returns at once
    elseif lane > 0 and not any_high then
      out[#out + 1] = '0-0'           -- no such stream (the EXISTS of step 3): nothing to look up
    else
      local last = redis.call('XREVRANGE', KEYS[lane + 1], '+', '-', 'COUNT', 1)
      if #last == 0 then out[#out + 1] = '0-0' else out[#out + 1] = last[1][1] end
    end
  end
  local notified = redis.call('XREVRANGE', BASE .. 'lnotify', '+', '-', 'COUNT', 1)
  if #notified == 0 then out[#out + 1] = '0-0' else out[#out + 1] = notified[1][1] end
end

out[1] = n
if n > 0 then
  for i = 1, #keyed do out[#out + 1] = keyed[i] end
  if ARGV[5] == '2' and n < count and not limited and buried == 0 then
    -- drained: nothing more to lease now, so the block info comes along (n negated), and the
    -- client's next consume can block at once instead of asking again for nothing
    out[1] = -n
    block_info()
  end
  return out
end
if ARGV[5] == '0' then return out end   -- a consume that will not block: no wake times, no last ids
block_info()
return out
