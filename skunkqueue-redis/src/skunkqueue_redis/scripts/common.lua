-- common.lua: prepended to every script by scripts/__init__.py.
--
-- ARGV[1..14] of every script, the same for every call of a queue (persistence.py's _Scripts):
--   1 job prefix "sq:{Q}:j:"     2 due prefix "sq:{Q}:d:"    3 notify prefix "sq:{Q}:n:"
--   4 targets prefix "sq:{Q}:t:" 5 done prefix "sq:{Q}:done:"
--   6 lease zset "sq:{Q}:lease"  7 index zset "sq:{Q}:jobs"  8 idempotency key prefix "sq:{Q}:k:"
--   (keys.py spells these names)
--   9 NOTIFY_CAP  10 DONE_TOKEN_MS  11 CLAIM_ROUNDS  12 CLOCK_TOLERANCE (s)  (constants of persistence.py)
--   13 tally prefix "sq:{Q}:c:"  14 routes set "sq:{Q}:routes"  (the monitor's index: tally() below)
--   15 priority levels prefix "sq:{Q}:p:"  16 priority due prefix "sq:{Q}:dp:"
--   17 key slots prefix "sq:{Q}:lk:"  18 GCRA times prefix "sq:{Q}:rt:"  19 settings hash "sq:{Q}:settings"
--   (flow control: see the helpers at the end)
-- ARGV[20..]: the script's own arguments; args() returns them as a list from 1.
-- Each is an argument of its own, not one packed string: Redis makes ARGV's strings in C,
-- where parsing a packed one in Lua cost ~100,000 instructions per job (15% of finish_and_claim).
-- Every key of a queue shares the {Q} hash tag, so keys built here are in the
-- same cluster slot as the KEYS a script was given.
local find, sub, byte = string.find, string.sub, string.byte

-- The "<length>:" of the packed item at pos (colon: where its ':' is), as a number: a length of
-- one or two digits (nearly every one) from its bytes, sparing a string and a strtod.
local function length_at(s, pos, colon)
  local digits = colon - pos
  if digits == 1 then return byte(s, pos) - 48 end
  if digits == 2 then
    local a, b = byte(s, pos, pos + 1)
    return a * 10 + b - 528  -- (a - 48) * 10 + (b - 48)
  end
  return tonumber(sub(s, pos, colon - 1))
end

local JOB, DUE, NOTIFY, TARGETS, DONE = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local LEASE, INDEX, KEYED = ARGV[6], ARGV[7], ARGV[8]
-- DONE_TOKEN_MS stays a string: it only goes to PEXPIRE (see int()).
local NOTIFY_CAP, DONE_TOKEN_MS, CLAIM_ROUNDS = tonumber(ARGV[9]), ARGV[10], tonumber(ARGV[11])
local CLOCK_TOLERANCE = tonumber(ARGV[12])
local TALLY, ROUTES = ARGV[13], ARGV[14]
local LEVELS, LEVEL_DUE, SLOTS, RATES, SETTINGS = ARGV[15], ARGV[16], ARGV[17], ARGV[18], ARGV[19]
local COMMON_ARGS = 19

-- The store's clock decides every time comparison, so hosts' clocks may differ.
-- (Redis 7 replicates a script's effects, not the script, so TIME is allowed before writes.)
-- Read once per script call: a script is atomic, so one instant serves all of it
-- (finish_and_claim's claim stamps the now its finish used).
local clock_now
local function clock()
  if not clock_now then
    local t = redis.call('TIME')
    clock_now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return clock_now
end

-- A time as stored in a hash or as a zset score (microseconds, like time.time()).
-- Remembered per script call: finish_and_claim formats its one now in finish's tally() and in claim.
local formatted = {}
local function fmt(t)
  local text = formatted[t]
  if not text then
    text = string.format('%.6f', t)
    if t ~= 0 and t == t then formatted[t] = text end  -- not 0 (-0 prints apart) nor NaN (no key)
  end
  return text
end

-- A whole number as redis.call's argument: Redis turns a Lua number into text with '%.17g',
-- which costs several times '%d'; anything else (a fraction, huge) is left to Redis.
local function int(n)
  if n % 1 == 0 and n > -2^53 and n < 2^53 then return string.format('%d', n) end
  return n
end

-- How far to move a time a client computed on its own clock (caller_now is its
-- now) onto the store's: not at all while the clocks agree within
-- CLOCK_TOLERANCE, so what a client wrote reads back exactly; beyond that the
-- store keeps the client's delay, counted from its own now.
local function shift(caller_now, now)
  local d = now - tonumber(caller_now)
  if math.abs(d) > CLOCK_TOLERANCE then return d end
  return 0
end

-- One table built at its size (a loop of stores grew and rehashed it: ~14,000 instructions per call);
-- unpack() holds its values on Lua's C stack (8,000 slots), so a long list (renew's) takes the loop.
local function args()
  if #ARGV - COMMON_ARGS < 4000 then return {unpack(ARGV, COMMON_ARGS + 1)} end
  local own = {}
  for i = COMMON_ARGS + 1, #ARGV do own[i - COMMON_ARGS] = ARGV[i] end
  return own
end

-- keys.py's escape(): route and target names never contain the ':' separator.
-- (Most names have neither character: find() says so without gsub() building a copy.)
local function esc(s)
  if not find(s, '[%%:]') then return s end
  return (string.gsub(s, '[%%:]', function(c) return c == '%' and '%25' or '%3A' end))
end

local function suffix(route, target)
  if target then return esc(route) .. ':' .. esc(target) end
  return esc(route)
end

-- A pending record's zset: priority 0 (nil) in d:<route>[:<target>], another priority in its own
-- dp:<route>:<priority>[:<target>] (listed in p:<route>[:<target>], see levels_add), so that each
-- zset stays (due, id) ordered. A broadcast (target) goes by priority like a shared record.
local function due_key(route, target, priority)
  local p = tonumber(priority or '0') or 0
  if p == 0 then return DUE .. suffix(route, target) end
  local key = LEVEL_DUE .. esc(route) .. ':' .. string.format('%d', p)
  if target then return key .. ':' .. esc(target) end
  return key
end
-- Note a priority other than 0 among the route's (or one worker's) zsets (the claim walks them
-- highest first).
local function levels_add(route, target, priority)
  local p = tonumber(priority or '0') or 0
  if p == 0 then return end
  redis.call('ZADD', LEVELS .. suffix(route, target), p, string.format('%d', p))
end
local function notify_key(route, target) return NOTIFY .. suffix(route, target) end

-- One "<length>:<bytes>" item of a packed string; returns it and the next position.
local function take(s, pos)
  local colon = find(s, ':', pos, true)
  local stop = colon + length_at(s, pos, colon)
  return sub(s, colon + 1, stop), stop + 1
end

-- Push up to n wake-up tokens, keeping the list bounded.
local function wake(nkey, n)
  local tokens = {}
  for i = 1, math.min(n, NOTIFY_CAP) do tokens[i] = '1' end
  redis.call('RPUSH', nkey, unpack(tokens))
  redis.call('LTRIM', nkey, -NOTIFY_CAP, -1)
end

-- An idempotency key's string lives as long as its holder (ms: the holder's new
-- time to live, nil while it is pending or running, 0 when it is deleted). It must not go first: the
-- string is how enqueue finds the holder. Outliving the holder is harmless
-- (enqueue checks the record), so it expires with it only to be tidy.
local function key_follows(id, k, ms)
  if not k then return end
  local kkey = KEYED .. k
  if redis.call('GET', kkey) ~= id then return end
  if ms == 0 then redis.call('DEL', kkey)  -- the record is gone now: so is its key
  elseif ms then redis.call('PEXPIRE', kkey, int(ms)) else redis.call('PERSIST', kkey) end
end

-- The monitor's index (summary.lua reads it; keys.py spells it): per route, one zset per state
-- and one ('dead') for dead letters, so a summary counts without reading any record.
-- Scores: pending = due (the first member is the longest wait), running = lease_until (renew
-- keeps it: a route's live leases are those above now, which its concurrency limit counts), finished
-- states and dead = when the record expires, so counting scores above now stays right while
-- Redis expires the records themselves. ZADD/ZREM are idempotent: replaying a move cannot drift.
local FINISHED = {complete = true, error = true, killed = true}
-- A script call touches one or two routes: escape each once.
local tally_prefixes = {}
local function tally_key(route, state)
  local prefix = tally_prefixes[route]
  if not prefix then
    prefix = TALLY .. esc(route) .. ':'
    tally_prefixes[route] = prefix
  end
  return prefix .. state
end

-- Move id from old (nil: a new record) to new (nil: deleted); dead: '1' for a dead letter.
local function tally(id, route, old, new, dead, score, now)
  if not route then return end
  if old then
    redis.call('ZREM', tally_key(route, old), id)
    if old == 'error' then redis.call('ZREM', tally_key(route, 'dead'), id) end
  else
    redis.call('SADD', ROUTES, route)
  end
  if not new then return end
  local key = tally_key(route, new)
  redis.call('ZADD', key, score, id)
  -- Entries of expired records go here, as expired.lua drops INDEX's: at the finishes of one
  -- record in 16 (ids end in random hex digits), which drops every entry expired by then.
  -- Counts are unaffected (summary counts scores above now); the zset holds at most a few
  -- dozen entries more, and 15 finishes in 16 save the command.
  if FINISHED[new] then
    local trim = byte(id, -1) == 48  -- '0'
    if trim then redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. fmt(now)) end
    if new == 'error' and dead == '1' then
      redis.call('ZADD', tally_key(route, 'dead'), score, id)
      if trim then redis.call('ZREMRANGEBYSCORE', tally_key(route, 'dead'), '-inf', '(' .. fmt(now)) end
    end
  end
end

-- Keep a damaged record for inspection, out of every route, dead, expiring like a finished one
-- (ttl: the result TTL in seconds).
local function quarantine(id, why, now, ttl)
  local key = JOB .. id
  local was = redis.call('HMGET', key, 'state', 'route', 'limit_key')
  redis.call('HSET', key, 'state', 'error', 'dead', '1', 'finished', fmt(now),
    'error', cjson.encode({type = 'MalformedRecord', message = why, traceback = ''}))
  redis.call('HDEL', key, 'owner', 'lease_until')
  redis.call('ZREM', LEASE, id)
  if was[3] then redis.call('ZREM', SLOTS .. was[3], id) end
  redis.call('PEXPIRE', key, math.max(1, math.floor(ttl * 1000)))
  key_follows(id, redis.call('HGET', key, 'key'), math.max(1, math.floor(ttl * 1000)))
  redis.call('ZADD', INDEX, fmt(now + ttl), id)
  tally(id, was[2], was[1], 'error', '1', fmt(now + ttl), now)
end

-- A finished record's signal: a token on its done list (sync waiters BLMOVE on it) and its id
-- published on the done prefix (one subscription per asyncio loop and queue hears it).
-- The list then holds one token: a stale one (a record finished again) is trimmed, not deleted
-- first, so a first finish pays no DEL.
local function signal_done(id)
  local done = DONE .. id
  if redis.call('RPUSH', done, '1') > 1 then redis.call('LTRIM', done, -1, -1) end
  redis.call('PEXPIRE', done, DONE_TOKEN_MS)
  redis.call('PUBLISH', DONE, id)
end

-- Flow control (skunkqueue.flow; the Persistence docstring holds the rules).
-- The settings' names: flow.py's limit_setting() and pause_setting() (test_redis_flow checks them).
local LIMIT_SETTING, PAUSE_SETTING = 'flow.limit:', 'flow.paused:'
-- GCRA: (true, the key's new time) if one start is allowed now, else (false, when it will be).
local function gcra(tat, now, interval, burst)
  local at = now
  if tat and tat > now then at = tat end
  local tolerance = (burst - 1) * interval
  if at - now > tolerance + 1e-9 then return false, at - tolerance end
  return true, at + interval
end

-- The times a claim set, written once at its end (write_rate_times).
local rate_set = {}

local function rate_time(name) return rate_set[name] or tonumber(redis.call('GET', RATES .. name) or '') end

local function set_rate_time(name, tat) rate_set[name] = tat end

-- A time in the past means what no time means, so the string may expire once it passed, and a
-- time already past when the claim ends need not be written at all: every later script reads TIME
-- after this one ends, so it changes no decision (a rate far from reached, its interval shorter
-- than the claim, costs no SET).
local function write_rate_times()
  if next(rate_set) == nil then return end
  local t = redis.call('TIME')
  local late = tonumber(t[1]) + tonumber(t[2]) / 1000000
  for name, tat in pairs(rate_set) do
    if tat > late then
      redis.call('SET', RATES .. name, fmt(tat), 'PX', int(math.floor((tat - late) * 1000) + 1000))
    end
  end
end

-- A route's flow settings {paused, limit} (nil: none), read once per script call: finish_and_claim's
-- finish and claim look at the same route's.
local route_settings = {}
local function flow_settings(route)
  local setting = route_settings[route]
  if not setting then
    setting = redis.call('HMGET', SETTINGS, PAUSE_SETTING .. route, LIMIT_SETTING .. route)
    route_settings[route] = setting
  end
  return setting
end

-- Whether the route's concurrency limit is reached by its live leases (this finish's record still
-- among them): only then may a worker be waiting for the slot a finish frees. A rate alone, or
-- a limit far from reached, wakes no one.
local function route_full(route, now)
  local limit = flow_settings(route)[2]
  local cap = limit and tonumber(string.match(limit, '"concurrency":%s*(%d+)'))
  if not cap then return false end
  return redis.call('ZCOUNT', tally_key(route, 'running'), '(' .. fmt(now), '+inf') >= cap
end

-- A running record leaves its key's slots (finish, quarantine); the renew and the claim ZADD it.
local function slot_free(limit_key, id)
  if limit_key then redis.call('ZREM', SLOTS .. limit_key, id) end
end
