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
--                               v = visibility timeout in ms (0 = the consumer's default);
--                               a keyed message (publish_keyed) has three more, after v:
--                               k = its key, kt = the key's ttl (ms), kl = its linger (ms).
--                               Consumer group "stem", created at id 0 on first read.
--                               An entry is XDELed when settled, so XLEN = undelivered + pending.
--   N:{q:Q}:leases      ZSET    "P|entry-id" -> lease deadline (ms, Redis clock).  Exactly one
--                               member per entry in the group's PEL; written in the same script
--                               as the XREADGROUP / XCLAIM that creates the PEL entry.
--   N:{q:Q}:delayed     ZSET    packed message -> not_before (ms).  Packed message:
--                               "<nonce> <priority> <vt-ms> <len(task id)> <task id><frame>";
--                               keyed: "K<nonce> <priority> <vt-ms> <kt> <kl> <len(key)>
--                               <len(task id)> <key><task id><frame>" (a nonce is lowercase
--                               hex, so the K tells the two apart).
--   N:{q:Q}:dead        STREAM  dead letters: t, f, p, v (and k, kt, kl) as above, r = reason,
--                               at = failed_at (ms).
--   N:{q:Q}:purged      STREAM  purge_hold's holding area (redis_admin.lua): t, f of purged
--                               messages whose REVOKED statuses are not yet stored (stem.purging).
--   N:{q:Q}:key:K       STRING  key K of the queue (publish_keyed): the owner's task id, PX ttl.
--                               Released (owner-checked) by the script that ends its message.
--   N:{q:Q}:keys        ZSET    K -> when key K expires at the latest (ms): the index that lets
--                               delete_queue drop the queue's keys without a SCAN.  A member
--                               may outlive its key (ttl ran out); publish_keyed prunes those.
--
-- A lane entry without t (task id) cannot be delivered: consume dead-letters it with reason
-- "decode-error"; one without f is delivered with an empty frame (the consumer dead-letters
-- it under its task id).  A delayed member that does not unpack goes to the dead letters
-- whole, as f.
--
-- Every per-queue script gets the same KEYS:
--   KEYS[1..10] = lanes 0..9, KEYS[11] = leases, KEYS[12] = delayed, KEYS[13] = dead.
-- The key strings and their index are named from the dead stream's name (same prefix, same
-- slot): a script touches them only for keyed messages, so the KEYS stay thirteen.

local GROUP = 'stem'
local NLANES = 10
local LEASES, DELAYED, DEAD = KEYS[11], KEYS[12], KEYS[13]
local BASE = string.sub(DEAD, 1, #DEAD - 4)   -- "N:{q:Q}:"
local KEYIDX = BASE .. 'keys'

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

-- p and v may be missing (an entry written by hand): lane 0, the consumer's default.
-- k (with kt, kl) names the key a keyed message carries on to its next entry.
local function add_ready(t, f, p, v, k, kt, kl)
  if k then
    return redis.call('XADD', KEYS[lane_of(p) + 1], '*', 't', t, 'f', f, 'p', p or 0, 'v', v or 0,
                      'k', k, 'kt', kt or 0, 'kl', kl or 0)
  end
  return redis.call('XADD', KEYS[lane_of(p) + 1], '*', 't', t, 'f', f, 'p', p or 0, 'v', v or 0)
end

local function pack_delayed(nonce, t, f, p, v, k, kt, kl)
  if k then
    return 'K' .. nonce .. ' ' .. p .. ' ' .. v .. ' ' .. (kt or 0) .. ' ' .. (kl or 0) .. ' ' .. #k .. ' '
           .. #t .. ' ' .. k .. t .. f
  end
  return nonce .. ' ' .. p .. ' ' .. v .. ' ' .. #t .. ' ' .. t .. f
end

-- t, f, p, v, k, kt, kl of a packed delayed message (k, kt, kl nil when unkeyed), or nil
local function unpack_delayed(m)
  if string.byte(m, 1) == 75 then   -- 'K'
    local _, stop, p, v, kt, kl, kn, tl = string.find(m, '^K%S+ (%-?%d+) (%d+) (%d+) (%d+) (%d+) (%d+) ')
    if stop == nil then return nil end
    kn, tl = tonumber(kn), tonumber(tl)
    if stop + kn + tl > #m then return nil end
    return string.sub(m, stop + kn + 1, stop + kn + tl), string.sub(m, stop + kn + tl + 1), p, v,
           string.sub(m, stop + 1, stop + kn), kt, kl
  end
  local _, stop, _, p, v, tl = string.find(m, '^(%S+) (%-?%d+) (%d+) (%d+) ')
  if stop == nil then return nil end
  tl = tonumber(tl)
  if stop + tl > #m then return nil end
  return string.sub(m, stop + 1, stop + tl), string.sub(m, stop + tl + 1), p, v
end

-- Keys (publish_keyed): see the schema above.
local function key_name(k)
  return BASE .. 'key:' .. k
end

-- Record key k for owner t for ttl ms (the caller checked it is free).
local function claim(k, t, ttl, now)
  redis.call('SET', key_name(k), t, 'PX', ttl)
  redis.call('ZADD', KEYIDX, now + ttl, k)
end

-- The terminal settle's release: only while t owns k; linger > 0 keeps it that many ms more.
local function release(k, t, linger, now)
  if k == nil or t == nil then return end
  local name = key_name(k)
  if redis.call('GET', name) ~= t then return end
  linger = tonumber(linger) or 0
  if linger > 0 then
    redis.call('PEXPIRE', name, linger)
    redis.call('ZADD', KEYIDX, now + linger, k)
  else
    redis.call('DEL', name)
    redis.call('ZREM', KEYIDX, k)
  end
end

-- Remove an entry for good: out of the PEL, the stream and the lease index.
local function settle(lane, id)
  local key = KEYS[lane + 1]
  redis.pcall('XACK', key, GROUP, id)
  redis.call('XDEL', key, id)
  redis.call('ZREM', LEASES, lane .. '|' .. id)
end

-- A dead letter keeps what the message has: a missing field is stored empty (t, f) or 0 (p, v);
-- a keyed one its key, ttl and linger (for replay to claim it again).
local function add_dead(h, reason, now)
  if h.k then
    redis.call('XADD', DEAD, '*', 't', h.t or '', 'f', h.f or '', 'p', h.p or 0, 'v', h.v or 0,
               'r', reason, 'at', now, 'k', h.k, 'kt', h.kt or 0, 'kl', h.kl or 0)
  else
    redis.call('XADD', DEAD, '*', 't', h.t or '', 'f', h.f or '', 'p', h.p or 0, 'v', h.v or 0,
               'r', reason, 'at', now)
  end
end

-- Dead-letter an entry: copy, remove, and release its key (owner-checked: an entry without a
-- task id names no owner, and its key, if any, is left to its ttl).
local function bury(lane, id, h, reason, now)
  add_dead(h, reason, now)
  settle(lane, id)
  release(h.k, h.t, h.kl, now)
end

local function split_member(m)
  local bar = string.find(m, '|', 1, true)
  return tonumber(string.sub(m, 1, bar - 1)), string.sub(m, bar + 1)
end
