-- settle: ack, nack, extend, retry and dead-letter deliveries of one queue, atomically.
--   KEYS: the per-queue layout (see redis_common.lua)
--   ARGV[1] operation, then per operation:
--     ack         lane1, id1, lane2, id2, ...              -> number of entries removed
--     ackk        m, then m (lane, id) pairs as for ack, then (lane, id, key, task id,
--                 linger ms) of each keyed delivery, whose key is released (owner-checked,
--                 batched) when this ack removed its entry  -> number of entries removed
--     requeue     lane, id                                  -> 1 when the lease was found
--     extend      consumer, then lane, id, vt-ms triples    -> number of leases renewed
--     retry       lane, id, frame, not_before-ms (-1 = now), nonce -> 1, or 0 when already settled
--     dead        lane, id, reason                          -> 1, or 0 when already settled
-- A keyed message's key is released by ack/ackk and dead (owner-checked, see release in
-- redis_common.lua) and kept by requeue, extend and retry.
-- Lane -1 is a delivery leased under a limit (redis_llanes.lua), its id a lflight id: ack,
-- dead, requeue and retry free its concurrency slot (waking the lanes waiting on it) in the
-- same call; requeue puts it back into its lane (delivery count kept), retry publishes the
-- new attempt into the same lane (or ldelayed), dead keeps its limit in the dead letter (for
-- replay), extend moves its slot's deadline with its lease.  Its key rides in its record, so
-- a keyed one is acked as "ack" (the client never sends it as "ackk").
-- A delivery is "not yet settled" while its stream entry exists: every settle XDELs it, so
-- settling a stale delivery (its lease expired and it was delivered again) is idempotent.
local op = ARGV[1]

if op == 'ack' or op == 'ackk' then
  -- variadic XACK/XDEL per lane and one ZREM: three calls for a whole batch
  local first, last = 2, #ARGV
  if op == 'ackk' then first, last = 3, 2 + 2 * tonumber(ARGV[2]) end
  local ids, members, limited = {}, {}, nil
  for i = first, last, 2 do
    local lane = tonumber(ARGV[i])
    if lane < 0 then
      limited = limited or {}
      limited[#limited + 1] = ARGV[i + 1]
    else
      ids[lane] = ids[lane] or {}
      table.insert(ids[lane], ARGV[i + 1])
      members[#members + 1] = lane .. '|' .. ARGV[i + 1]
    end
  end
  local n = 0
  if limited then
    local now = now_ms()
    for _, id in ipairs(limited) do
      local m, s = L.lsettle(id, now)
      if s then n = n + 1 end
      if m and m.k ~= '' then release(m.k, m.t, m.kl, now) end
    end
  end
  for lane, list in pairs(ids) do
    n = n + redis.call('XDEL', KEYS[lane + 1], unpack(list))
    redis.pcall('XACK', KEYS[lane + 1], GROUP, unpack(list))
  end
  if op == 'ackk' then
    -- keyed: XDEL one at a time (a key is released only when this ack removed its entry: a
    -- stale ack must not free a key that a replay claimed again), the rest batched
    local acked, names, keys, owners, lingers = {}, {}, {}, {}, {}
    for i = last + 1, #ARGV, 5 do
      local lane, id = tonumber(ARGV[i]), ARGV[i + 1]
      members[#members + 1] = lane .. '|' .. id
      acked[lane] = acked[lane] or {}
      table.insert(acked[lane], id)
      if redis.call('XDEL', KEYS[lane + 1], id) == 1 then
        n = n + 1
        keys[#keys + 1], owners[#owners + 1], lingers[#lingers + 1] = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
        names[#names + 1] = key_name(ARGV[i + 2])
      end
    end
    for lane, list in pairs(acked) do redis.pcall('XACK', KEYS[lane + 1], GROUP, unpack(list)) end
    if #names > 0 then
      local held = redis.call('MGET', unpack(names))
      local drop, dropped = {}, {}
      local now = now_ms()
      for j = 1, #names do
        if held[j] == owners[j] then
          if (tonumber(lingers[j]) or 0) > 0 then
            release(keys[j], owners[j], lingers[j], now)
          else
            drop[#drop + 1], dropped[#dropped + 1] = names[j], keys[j]
          end
        end
      end
      if #drop > 0 then
        redis.call('DEL', unpack(drop))
        redis.call('ZREM', KEYIDX, unpack(dropped))
      end
    end
  end
  if #members > 0 then redis.call('ZREM', LEASES, unpack(members)) end
  return n
end

if op == 'requeue' then
  if tonumber(ARGV[2]) < 0 then
    local now = now_ms()
    local m, s = L.lsettle(ARGV[3], now)
    if m then
      L.enlane(m, now)
      L.lnotify()
    elseif s then
      add_dead({f = s}, 'decode-error', now)
    end
    if s then return 1 end
    return 0
  end
  -- the lease ends now: the next consume re-delivers it with its delivery count + 1
  return redis.call('ZADD', LEASES, 'XX', 'CH', 0, ARGV[2] .. '|' .. ARGV[3])
end

if op == 'extend' then
  local now = now_ms()
  local consumer = ARGV[2]
  local n = 0
  for i = 3, #ARGV, 3 do
    local lane, id = tonumber(ARGV[i]), ARGV[i + 1]
    local member = lane .. '|' .. id
    if lane < 0 then
      if redis.call('ZSCORE', L.LLEASES, id) then
        local deadline = now + tonumber(ARGV[i + 2])
        redis.call('ZADD', L.LLEASES, 'XX', deadline, id)
        local m = L.lunpack(redis.call('HGET', L.LFLIGHT, id) or '')
        if m and m.ck ~= '' and redis.call('ZADD', L.lslots_key(m.ck), 'XX', 'CH', deadline, id) == 1 then
          L.keep_slots(m.ck, deadline)
        end
        n = n + 1
      end
    elseif redis.call('ZSCORE', LEASES, member) then
      redis.call('ZADD', LEASES, 'XX', now + tonumber(ARGV[i + 2]), member)
      -- reset the PEL idle time and owner too (JUSTID: the delivery count is not touched)
      redis.pcall('XCLAIM', KEYS[lane + 1], GROUP, consumer, 0, id, 'JUSTID')
      n = n + 1
    end
  end
  return n
end

local lane, id = tonumber(ARGV[2]), ARGV[3]
if lane < 0 then
  if op ~= 'retry' and op ~= 'dead' then
    return redis.error_reply('unknown settle operation ' .. tostring(op))
  end
  local now = now_ms()
  local m, s = L.lsettle(id, now)
  if not s then return 0 end
  if m == nil then
    add_dead({f = s}, 'decode-error', now)
  elseif op == 'retry' then
    -- a new attempt: fresh id (a later place in its lane) and delivery count, same limit and key
    local not_before = tonumber(ARGV[5])
    m.f, m.d = ARGV[4], 0
    L.lnew_id(m, now)
    if not_before > now then
      redis.call('ZADD', L.LDELAYED, not_before, L.lpack(m))
    else
      L.enlane(m, now)
      L.lnotify()
    end
  else
    L.add_dead_limited(m, ARGV[4], now)
    if m.k ~= '' then release(m.k, m.t, m.kl, now) end
  end
  return 1
end
local h = read_entry(lane, id)
if h == nil then
  redis.call('ZREM', LEASES, lane .. '|' .. id)
  return 0
end

if op == 'retry' then
  local frame, not_before = ARGV[4], tonumber(ARGV[5])
  settle(lane, id)
  -- a keyed message's new attempt keeps its key (the task is not over)
  if not_before > now_ms() then
    redis.call('ZADD', DELAYED, not_before,
               pack_delayed(ARGV[6], h.t or '', frame, h.p or 0, h.v or 0, h.k, h.kt, h.kl))
  else
    add_ready(h.t or '', frame, h.p, h.v, h.k, h.kt, h.kl)
  end
  return 1
end

if op == 'dead' then
  bury(lane, id, h, ARGV[4], now_ms())
  return 1
end

return redis.error_reply('unknown settle operation ' .. tostring(op))
