-- admin: stats, purge and replay of one queue.
--   KEYS: the per-queue layout (see redis_common.lua)
--   ARGV[1] operation, then per operation:
--     stats                    -> {ready, in_flight, delayed, dead}, O(lanes + log n):
--                                 ready = undelivered + expired leases + due delayed
--     purge                    -> number of undelivered and delayed messages dropped
--                                 (in-flight entries stay); O(dropped)
--     replay  limit [ids...]   -> number of dead letters moved back to their lane, due now,
--                                 as new entries (fresh delivery count); without ids the
--                                 oldest `limit` ones (the client loops until fewer come back)
local op = ARGV[1]
local now = now_ms()

if op == 'stats' then
  local total = 0
  for lane = 0, NLANES - 1 do total = total + redis.call('XLEN', KEYS[lane + 1]) end
  local pending = redis.call('ZCARD', LEASES)
  local expired = redis.call('ZCOUNT', LEASES, '-inf', now)
  local due = redis.call('ZCOUNT', DELAYED, '-inf', now)
  local delayed = redis.call('ZCARD', DELAYED) - due
  return {total - pending + expired + due, pending - expired, delayed, redis.call('XLEN', DEAD)}
end

if op == 'purge' then
  local n = redis.call('ZCARD', DELAYED)
  redis.call('DEL', DELAYED)
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
      if last == nil then
        -- nobody read this lane yet, so nothing of it is in flight
        n = n + redis.call('XLEN', key)
        redis.call('DEL', key)
      else
        while true do
          local batch = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', 500)
          if #batch == 0 then break end
          for _, e in ipairs(batch) do
            n = n + redis.call('XDEL', key, e[1])
          end
          last = batch[#batch][1]
        end
      end
    end
  end
  return n
end

if op == 'replay' then
  local entries = {}
  if #ARGV == 2 then
    entries = redis.call('XRANGE', DEAD, '-', '+', 'COUNT', tonumber(ARGV[2]))
  else
    for i = 3, #ARGV do
      local r = redis.call('XRANGE', DEAD, ARGV[i], ARGV[i])
      if #r > 0 then entries[#entries + 1] = r[1] end
    end
  end
  for _, e in ipairs(entries) do
    local h = fields_of(e[2])
    add_ready(h.t or '', h.f or '', h.p, h.v)
    redis.call('XDEL', DEAD, e[1])
  end
  return #entries
end

return redis.error_reply('unknown admin operation ' .. tostring(op))
