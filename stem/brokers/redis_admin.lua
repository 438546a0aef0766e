-- admin: stats, purge and replay of one queue.
--   KEYS: the per-queue layout (see redis_common.lua)
--   ARGV[1] operation, then per operation:
--     stats                    -> {ready, in_flight, delayed, dead, throttled}, O(lanes + log n):
--                                 ready = undelivered + expired leases + due delayed;
--                                 limited messages (redis_llanes.lua): in lanes, due in ldelayed
--                                 or with an expired lease are throttled, the rest in flight or
--                                 delayed
--     purge                    -> number of undelivered and delayed messages dropped
--                                 (in-flight entries stay), their keys released; O(dropped)
--     purge_hold               -> the same, each dropped message appended to the holding
--                                 stream N:{q:Q}:purged (t = task id, f = frame; a member
--                                 that does not unpack goes whole, as f, with t = "")
--     replay  limit start      -> {moved, scanned, last id scanned}: dead letters from
--                                 `start` (an XRANGE start: "-" or "(id"), at most `limit`,
--                                 moved back to their lane, due now, as new entries (fresh
--                                 delivery count); the client goes on from the last id
--                                 while `scanned` == `limit`
--     replay_ids  id...        -> number of those dead letters moved back
--     delete                   -> 1: every key of the queue dropped, its held keys too, and
--                                 its limit lanes, buckets and slots (from lkeys, no SCAN)
-- A keyed dead letter is moved back only while its key is free or held by its own task
-- id, and claims it again (its ttl as published); else it stays in the dead letters.
-- A limited dead letter (it has lrk/lck) goes back into its limit lane, a new message.
-- purge drops the limit lanes and the delayed limited messages too (counted); limited
-- deliveries in flight stay, as in-flight entries do.
local op = ARGV[1]
local HELD = BASE .. 'purged'   -- purge_hold's holding stream (stem.purging)
local now = now_ms()

if op == 'stats' then
  local total = 0
  for lane = 0, NLANES - 1 do total = total + redis.call('XLEN', KEYS[lane + 1]) end
  local pending = redis.call('ZCARD', LEASES)
  local expired = redis.call('ZCOUNT', LEASES, '-inf', now)
  local due = redis.call('ZCOUNT', DELAYED, '-inf', now)
  local delayed = redis.call('ZCARD', DELAYED) - due
  local in_flight, throttled = pending - expired, 0
  if redis.call('EXISTS', L.LSIZES, L.LLEASES, L.LDELAYED) > 0 then
    local lexpired = redis.call('ZCOUNT', L.LLEASES, '-inf', now)
    local ldue = redis.call('ZCOUNT', L.LDELAYED, '-inf', now)
    in_flight = in_flight + redis.call('ZCARD', L.LLEASES) - lexpired
    delayed = delayed + redis.call('ZCARD', L.LDELAYED) - ldue
    throttled = (tonumber(redis.call('ZSCORE', L.LSIZES, '')) or 0) + lexpired + ldue
  end
  return {total - pending + expired + due, in_flight, delayed, redis.call('XLEN', DEAD), throttled}
end

if op == 'purge' or op == 'purge_hold' then
  -- only a queue with keys (its index exists) reads what it drops, to release their keys;
  -- purge_hold reads everything: each dropped message goes to the holding stream (t, f)
  local keyed = redis.call('EXISTS', KEYIDX) == 1
  local hold = op == 'purge_hold'
  local reads = keyed or hold
  local n = 0
  local function dropped(t, f, k, kl)
    n = n + 1
    if keyed and k ~= nil and k ~= '' then release(k, t, kl, now) end
    if hold then redis.call('XADD', HELD, '*', 't', t or '', 'f', f or '') end
  end
  if reads then
    for _, m in ipairs(redis.call('ZRANGE', DELAYED, 0, -1)) do
      local t, f, _, _, k, _, kl = unpack_delayed(m)
      if t == nil then dropped('', m) else dropped(t, f, k, kl) end
    end
  else
    n = n + redis.call('ZCARD', DELAYED)
  end
  redis.call('DEL', DELAYED)
  -- limit lanes and delayed limited messages
  local function drop_limited(members)
    for _, m in ipairs(members) do
      local l = L.lunpack(m)
      if l then dropped(l.t, l.f, l.k, l.kl) else dropped('', m) end
    end
  end
  for _, lane in ipairs(redis.call('ZRANGE', L.LLANES, 0, -1)) do
    local key = L.llane_key(lane)
    if reads then drop_limited(redis.call('ZRANGE', key, 0, -1)) else n = n + redis.call('ZCARD', key) end
    redis.call('DEL', key)
  end
  if reads then drop_limited(redis.call('ZRANGE', L.LDELAYED, 0, -1)) else n = n + redis.call('ZCARD', L.LDELAYED) end
  redis.call('DEL', L.LLANES, L.LSIZES, L.LDELAYED, L.LTURN)
  for lane = 0, NLANES - 1 do
    local key = KEYS[lane + 1]
    if redis.call('EXISTS', key) == 1 then
      local last = nil
      local groups = redis.pcall('XINFO', 'GROUPS', key)
      if not is_err(groups) then
        for _, g in ipairs(groups) do
          local info = fields_of(g)
          if info['name'] == GROUP then last = info['last-delivered-id'] end
        end
      end
      if last == nil and not reads then
        -- nobody read this lane yet, so nothing of it is in flight
        n = n + redis.call('XLEN', key)
        redis.call('DEL', key)
      else
        local start = '-'
        if last ~= nil then start = '(' .. last end
        while true do
          local batch = redis.call('XRANGE', key, start, '+', 'COUNT', 500)
          if #batch == 0 then break end
          for _, e in ipairs(batch) do
            if redis.call('XDEL', key, e[1]) == 1 then
              local h = fields_of(e[2])
              if reads then dropped(h.t, h.f, h.k, h.kl) else n = n + 1 end
            end
          end
          start = '(' .. batch[#batch][1]
        end
      end
    end
  end
  return n
end

-- Move one dead letter back (1), or leave it while another task holds its key (0).  A key
-- is claimed again only with what it needs (a task id and a ttl); else the entry goes back
-- without its key.
local function replay_entry(e)
  local h = fields_of(e[2])
  local k, kt = h.k, tonumber(h.kt) or 0
  if k ~= nil and h.t ~= nil and h.t ~= '' and kt > 0 then
    local holder = redis.call('GET', key_name(k))
    if holder and holder ~= h.t then return 0 end
    claim(k, h.t, kt, now)
  else
    k = nil
  end
  local rk, ck = h.lrk or '', h.lck or ''
  if (rk ~= '' and (tonumber(h.lr) or 0) > 0) or (ck ~= '' and (tonumber(h.lc) or 0) >= 1) then
    local m = L.lmessage(h.t, h.f, h.p, h.v, k, h.kt, h.kl, rk, h.lr, h.lb, ck, h.lc)
    if (tonumber(h.lr) or 0) <= 0 then m.rk = '' end
    if (tonumber(h.lc) or 0) < 1 then m.ck = '' end
    L.lnew_id(m, now)
    L.enlane(m, now)
    L.lnotify()
  else
    add_ready(h.t or '', h.f or '', h.p, h.v, k, h.kt, h.kl)
  end
  redis.call('XDEL', DEAD, e[1])
  return 1
end

if op == 'replay' then
  local entries = redis.call('XRANGE', DEAD, ARGV[3], '+', 'COUNT', tonumber(ARGV[2]))
  local moved = 0
  for _, e in ipairs(entries) do moved = moved + replay_entry(e) end
  if #entries == 0 then return {0, 0, ''} end
  return {moved, #entries, entries[#entries][1]}
end

if op == 'replay_ids' then
  local moved = 0
  for i = 2, #ARGV do
    local r = redis.call('XRANGE', DEAD, ARGV[i], ARGV[i])
    if #r > 0 then moved = moved + replay_entry(r[1]) end
  end
  return moved
end

if op == 'delete' then
  local held = redis.call('ZRANGE', KEYIDX, 0, -1)
  for i = 1, #held, 500 do
    local names = {}
    for j = i, math.min(i + 499, #held) do names[#names + 1] = key_name(held[j]) end
    redis.call('DEL', unpack(names))
  end
  local limit_keys = {}
  for _, member in ipairs(redis.call('ZRANGE', L.LKEYS, 0, -1)) do
    local kind, name = string.sub(member, 1, 1), string.sub(member, 2)
    if kind == 'r' then
      limit_keys[#limit_keys + 1] = L.lrate_key(name)
    else
      limit_keys[#limit_keys + 1] = L.lslots_key(name)
      limit_keys[#limit_keys + 1] = L.lwait_key(name)
    end
  end
  for _, lane in ipairs(redis.call('ZRANGE', L.LLANES, 0, -1)) do limit_keys[#limit_keys + 1] = L.llane_key(lane) end
  for i = 1, #limit_keys, 500 do
    redis.call('DEL', unpack(limit_keys, i, math.min(i + 499, #limit_keys)))
  end
  redis.call('DEL', L.LLANES, L.LSIZES, L.LDELAYED, L.LLEASES, L.LFLIGHT, L.LKEYS, L.LSEQ, L.LTURN, L.LNOTIFY)
  redis.call('DEL', KEYIDX, HELD, unpack(KEYS))
  return 1
end

return redis.error_reply('unknown admin operation ' .. tostring(op))
