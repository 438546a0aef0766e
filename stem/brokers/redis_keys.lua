-- keys: publish_keyed and release_key of one queue (key schema: redis_common.lua).
--   KEYS: the per-queue layout (see redis_common.lua)
--   ARGV[1] operation, then per operation:
--     publish  nine values per item: key, task id, ttl ms, linger ms, priority, vt ms,
--              not_before ms (-1: ready now), nonce (delayed only), frame
--              -> flat (i, holder) pairs for the items refused (i: 0-based in this call)
--     publishl as publish, with five more values per item (after the frame): rate key,
--              rate, burst, concurrency key, concurrency (keys "" when the limit has none,
--              both "" for an item without a limit); a limited item goes into its limit
--              lane (redis_llanes.lua) or ldelayed, carrying its key
--     release  key, owner -> 1 when owner held the key and it was deleted, else 0
-- publish takes the items in order, so a key twice in one call publishes the first and
-- answers the second with the first's task id.  For each free key the message is written
-- first and the key claimed after it: Redis does not undo a script that fails midway, so a
-- write that fails (a lane or delayed set of the wrong type) stops the script before the
-- claim, and no key is left without its message.
local op = ARGV[1]
local now = now_ms()

if op == 'publish' or op == 'publishl' then
  redis.call('ZREMRANGEBYSCORE', KEYIDX, '-inf', now)   -- index members whose key ran out
  local out = {}
  local stride = 9
  if op == 'publishl' then stride = 14 end
  local notify = false
  for i = 2, #ARGV, stride do
    local k, t = ARGV[i], ARGV[i + 1]
    local holder = redis.call('GET', key_name(k))
    if holder then
      out[#out + 1] = (i - 2) / stride
      out[#out + 1] = holder
    else
      local kt, kl, p, v, at = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], tonumber(ARGV[i + 6])
      if stride == 14 and (ARGV[i + 9] ~= '' or ARGV[i + 12] ~= '') then
        local m = L.lmessage(t, ARGV[i + 8], p, v, k, kt, kl, ARGV[i + 9], ARGV[i + 10], ARGV[i + 11],
                           ARGV[i + 12], ARGV[i + 13])
        L.lnew_id(m, now)
        if at > now then
          redis.call('ZADD', L.LDELAYED, at, L.lpack(m))
        else
          L.enlane(m, now)
          notify = true
        end
      elseif at < 0 then
        add_ready(t, ARGV[i + 8], p, v, k, kt, kl)
      else
        redis.call('ZADD', DELAYED, at, pack_delayed(ARGV[i + 7], t, ARGV[i + 8], p, v, k, kt, kl))
      end
      claim(k, t, kt, now)
    end
  end
  if notify then L.lnotify() end
  return out
end

if op == 'release' then
  local k = ARGV[2]
  local name = key_name(k)
  if redis.call('GET', name) ~= ARGV[3] then return 0 end
  redis.call('DEL', name)
  redis.call('ZREM', KEYIDX, k)
  return 1
end

return redis.error_reply('unknown keys operation ' .. tostring(op))
