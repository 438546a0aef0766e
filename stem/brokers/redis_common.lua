-- stem Redis broker: key schema and helpers shared by every redis_*.lua script
-- (stem/brokers/redis.py prepends this file to each of them before SCRIPT LOAD).
--
-- Key schema.  N = namespace (default "stem"), Q = queue name.  "{q:Q}" is the
-- Redis Cluster hash tag: every key of one queue lives in one slot, so each
-- script below touches a single slot.
--
--   N:queues            SET     names of queues seen (written by the client, not by scripts)
--   N:{q:Q}:lane:P      STREAM  priority lane P = clamp(priority, 0, 9); lane 9 is read first.
--                               Fields: t = task id, f = frame, p = priority,
--                               v = visibility timeout in ms (0 = the consumer's default).
--                               Consumer group "stem", created at id 0 on first read.
--                               An entry is XDELed when settled, so XLEN = undelivered + pending.
--   N:{q:Q}:leases      ZSET    "P|entry-id" -> lease deadline (ms, Redis clock).  Exactly one
--                               member per entry in the group's PEL; written in the same script
--                               as the XREADGROUP / XCLAIM that creates the PEL entry.
--   N:{q:Q}:delayed     ZSET    packed message -> not_before (ms).  Packed message:
--                               "<nonce> <priority> <vt-ms> <len(task id)> <task id><frame>".
--   N:{q:Q}:dead        STREAM  dead letters: t, f, p, v as above, r = reason, at = failed_at (ms).
--
-- A lane entry without t (task id) cannot be delivered: consume dead-letters it with reason
-- "decode-error"; one without f is delivered with an empty frame (the consumer dead-letters
-- it under its task id).  A delayed member that does not unpack goes to the dead letters
-- whole, as f.
--
-- Every per-queue script gets the same KEYS:
--   KEYS[1..10] = lanes 0..9, KEYS[11] = leases, KEYS[12] = delayed, KEYS[13] = dead.

local GROUP = 'stem'
local NLANES = 10
local LEASES, DELAYED, DEAD = KEYS[11], KEYS[12], KEYS[13]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function lane_of(p)
  p = tonumber(p) or 0
  if p < 0 then return 0 end
  if p > NLANES - 1 then return NLANES - 1 end
  return math.floor(p)
end

local function is_err(r)
  return type(r) == 'table' and r.err ~= nil
end

local function fields_of(flat)
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end

-- The entry's fields, or nil when it no longer exists.
local function read_entry(lane, id)
  local r = redis.call('XRANGE', KEYS[lane + 1], id, id)
  if #r == 0 then return nil end
  return fields_of(r[1][2])
end

-- p and v may be missing (an entry written by hand): lane 0, the consumer's default
local function add_ready(t, f, p, v)
  return redis.call('XADD', KEYS[lane_of(p) + 1], '*', 't', t, 'f', f, 'p', p or 0, 'v', v or 0)
end

local function pack_delayed(nonce, t, f, p, v)
  return nonce .. ' ' .. p .. ' ' .. v .. ' ' .. #t .. ' ' .. t .. f
end

local function unpack_delayed(m)
  local _, stop, _, p, v, tl = string.find(m, '^(%S+) (%-?%d+) (%d+) (%d+) ')
  if stop == nil then return nil end
  tl = tonumber(tl)
  if stop + tl > #m then return nil end
  return string.sub(m, stop + 1, stop + tl), string.sub(m, stop + tl + 1), p, v
end

-- Remove an entry for good: out of the PEL, the stream and the lease index.
local function settle(lane, id)
  local key = KEYS[lane + 1]
  redis.pcall('XACK', key, GROUP, id)
  redis.call('XDEL', key, id)
  redis.call('ZREM', LEASES, lane .. '|' .. id)
end

-- A dead letter keeps what the message has: a missing field is stored empty (t, f) or 0 (p, v).
local function add_dead(h, reason, now)
  redis.call('XADD', DEAD, '*', 't', h.t or '', 'f', h.f or '', 'p', h.p or 0, 'v', h.v or 0,
             'r', reason, 'at', now)
end

local function bury(lane, id, h, reason, now)
  add_dead(h, reason, now)
  settle(lane, id)
end

local function split_member(m)
  local bar = string.find(m, '|', 1, true)
  return tonumber(string.sub(m, 1, bar - 1)), string.sub(m, bar + 1)
end
