-- limits: publish into limit lanes, route a leased delivery into one, list lanes (one queue;
-- key schema: redis_common.lua and redis_llanes.lua).
--   KEYS: the per-queue layout (see redis_common.lua)
--   ARGV[1] operation, then per operation:
--     publish  ten values per message: task id, frame, priority, vt ms, not_before ms (-1: ready
--              now), rate key ("" none), rate, burst, concurrency key ("" none), concurrency
--              -> number of messages published
--     route    lane, entry id, consumer, its delivery count (the next lease has it again), rate key, rate, burst, concurrency key,
--              concurrency -> 1 when the delivery was moved into the limit's lane, 0 when it was
--              no longer leased by `consumer` (already settled, or re-delivered to another)
--     lanes    limit -> flat (lane, waiting, running) for up to `limit` lanes, the most waiting
--              first, then lanes with nothing waiting but live slots (from the deliveries leased
--              under a limit)
local op = ARGV[1]
local now = now_ms()

if op == 'publish' then
  local ready = 0
  for i = 2, #ARGV, 10 do
    local m = L.lmessage(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], '', 0, 0,
                       ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8], ARGV[i + 9])
    L.lnew_id(m, now)
    local at = tonumber(ARGV[i + 4])
    if at > now then
      redis.call('ZADD', L.LDELAYED, at, L.lpack(m))
    else
      L.enlane(m, now)
      ready = ready + 1
    end
  end
  if ready > 0 then L.lnotify() end
  return (#ARGV - 1) / 10
end

if op == 'route' then
  local lane, id, consumer, count = tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
  local m
  if lane < 0 then   -- already under a limit: moved to the new one's lane
    local s
    m, s = L.lsettle(id, now)
    if not s then return 0 end
    if m == nil then
      add_dead({f = s}, 'decode-error', now)
      return 0
    end
  else
    local pend = redis.pcall('XPENDING', KEYS[lane + 1], GROUP, id, id, 1)
    if is_err(pend) or #pend == 0 or pend[1][2] ~= consumer then return 0 end
    local h = read_entry(lane, id)
    if h == nil then
      settle(lane, id)
      return 0
    end
    if h.t == nil then
      bury(lane, id, h, 'decode-error', now)
      return 0
    end
    settle(lane, id)
    m = L.lmessage(h.t, h.f, h.p, h.v, h.k, h.kt, h.kl)
    L.lnew_id(m, now)
  end
  m.d = math.max(count - 1, 0)   -- routing is not a delivery: the next lease has `count` again
  m.rk, m.rate, m.burst, m.ck, m.conc = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
  L.enlane(m, now)
  L.lnotify()
  return 1
end

if op == 'lanes' then
  local limit = tonumber(ARGV[2])
  local out, seen = {}, {}
  local function running(lane)
    local _, c = L.lane_keys(lane)
    if c == '' then return 0 end
    return redis.call('ZCOUNT', L.lslots_key(c), '(' .. now, '+inf')
  end
  local top = redis.call('ZREVRANGE', L.LSIZES, 0, limit, 'WITHSCORES')
  for i = 1, #top, 2 do
    local lane = top[i]
    if lane ~= '' and #out < 3 * limit then
      seen[lane] = true
      out[#out + 1], out[#out + 2], out[#out + 3] = lane, tonumber(top[i + 1]), running(lane)
    end
  end
  if #out < 3 * limit then
    for _, s in ipairs(redis.call('HVALS', L.LFLIGHT)) do
      local m = L.lunpack(s)
      if m and m.ck ~= '' then
        local lane = L.lane_name(m)
        if not seen[lane] and #out < 3 * limit then
          seen[lane] = true
          local r = running(lane)
          if r > 0 then out[#out + 1], out[#out + 2], out[#out + 3] = lane, 0, r end
        end
      end
    end
  end
  return out
end

return redis.error_reply('unknown limits operation ' .. tostring(op))
