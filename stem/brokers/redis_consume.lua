-- consume: lease up to COUNT messages of one queue, atomically.
--   KEYS: the per-queue layout (see redis_common.lua)
--   ARGV[1] consumer name   ARGV[2] COUNT   ARGV[3] default visibility timeout (ms)
--   ARGV[4] how many due delayed messages to move at most
-- Steps: (1) move due delayed messages to their lane; (2) re-deliver entries whose
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
-- Returns {n, d1..dn, next_delayed_ms, next_lease_ms, now_ms, last_id_lane0..9} where each
-- delivery d is six values in a row (flat): lane, entry id, task id, frame, vt ms, delivery
-- count; the next_* times are -1 when there is none; the last ids (ids to XREAD BLOCK
-- from) come only when n == 0.  When n > 0 and some deliveries are keyed, triples (i, key,
-- linger ms) follow the deliveries instead: delivery i (1-based) carries that key.
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
local keyed = {}   -- (i, key, linger) triples of the keyed deliveries, flat

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

out[1] = n
if n > 0 then
  for i = 1, #keyed do out[#out + 1] = keyed[i] end
  return out
end

local function first_score(key)
  local r = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #r == 0 then return -1 end
  return tonumber(r[2])
end
out[#out + 1] = first_score(DELAYED)
out[#out + 1] = first_score(LEASES)
out[#out + 1] = now
for lane = 0, NLANES - 1 do
  if buried >= BURY_LIMIT and read_to[lane] then
    out[#out + 1] = read_to[lane]   -- unread entries follow: the client's XREAD returns at once
  else
    local last = redis.call('XREVRANGE', KEYS[lane + 1], '+', '-', 'COUNT', 1)
    if #last == 0 then out[#out + 1] = '0-0' else out[#out + 1] = last[1][1] end
  end
end
return out
