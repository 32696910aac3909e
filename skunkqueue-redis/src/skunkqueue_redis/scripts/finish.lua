-- finish: apply an outcome to a record if the caller still holds it (the fence).
-- KEYS: 1 job hash, 2 lease zset, 3 index zset
-- ARGV: 1 id, 2 token, 3 expected state, 4 the caller's now, 5 default result ttl (s; the record's
--       own result_ttl field wins), 6 state, 7 dead ('0'/'1'),
--       8 attempts, 9 error json, 10 result, 11 due, 12 finished
--       (8-12 optional: '' for none, else '.' then the value; due and finished are on the caller's clock,
--       but a due given as '=' then the value was read from the record, on the store's clock: kept as is),
--       13 the ended attempt's history entry (optional as 8-12: JSON of an object without "finished",
--       which this script adds from the store's clock), 14 how many entries the history keeps
-- The history field holds the entries packed ("<length>:<json>" each, oldest first), so dropping the
-- oldest is cutting the string, and no entry is decoded here (cjson would round its numbers).
-- A running record's flow slot (common.lua's slot_free) is freed here, with its lease.
-- A finished record counts for its dependents here (release.lua, which this script needs).
-- Returns 1 if applied, 0 if the record is not in the expected state under this token.
-- Outcome.apply_to's rules, with one more: a record whose kill was requested
-- is never put back to pending; it ends killed (JobKilled) instead.
local function opt(v) if v == '' then return nil end return string.sub(v, 2) end

-- The packed history with `entry` appended and the oldest dropped past `keep`; and how many were dropped.
local function appended(history, entry, keep)
  local item = #entry .. ':' .. entry
  history = (history or '') .. item
  local starts, pos = {}, 1
  while pos <= #history do
    starts[#starts + 1] = pos
    local colon = string.find(history, ':', pos, true)
    local size = colon and tonumber(string.sub(history, pos, colon - 1))
    -- Not what this script wrote (a foreign write): the finish still applies, with a fresh history.
    if not size or colon + size > #history then return item, 0 end
    pos = colon + 1 + size
  end
  local dropped = math.max(0, #starts - keep)
  if dropped > 0 then history = string.sub(history, starts[dropped + 1]) end
  return history, dropped
end

local function finish(KEYS, ARGV)
  local id, token, expect = ARGV[1], ARGV[2], ARGV[3]
  local ttl, state, dead = tonumber(ARGV[5]), ARGV[6], ARGV[7]
  local attempts, err, result, due, finished = opt(ARGV[8]), opt(ARGV[9]), opt(ARGV[10]), opt(ARGV[11]), opt(ARGV[12])
  local entry, keep = opt(ARGV[13] or ''), tonumber(ARGV[14] or '0')
  local key = KEYS[1]
  -- pcall: an error (WRONGTYPE) means something other than a hash lives there, which holds nothing.
  local f = redis.pcall('HMGET', key, 'state', 'token', 'route', 'target', 'kill_requested', 'key', 'result_ttl',
    'has_deps', 'wait_left', entry and 'history' or 'state', 'priority', 'limit_key')
  if f.err then return 0 end
  if f[1] ~= expect or tonumber(f[2] or '0') ~= tonumber(token) or not f[3] then return 0 end
  ttl = tonumber(f[7] or '') or ttl
  local now = clock()
  local moved = shift(ARGV[4], now)
  -- '=': a hand-back's due, read from the record: written back as it came, not moved nor rounded.
  local due_kept = byte(ARGV[11]) == 61
  if state == 'pending' and f[5] == '1' then
    state, dead, result, finished = 'killed', '0', nil, nil  -- attempts as given (a hand-back's)
    err = cjson.encode({type = 'JobKilled', message = 'killed by request', traceback = ''})
  end
  local route, target = f[3], f[4] or nil
  local zkey = due_key(route, target, f[11])
  redis.call('ZREM', zkey, id)
  redis.call('ZREM', KEYS[2], id)
  if f[1] == 'running' then
    -- The slot goes with the lease, in this step; a worker waiting on the key's or the route's
    -- concurrency limit may claim now (route_full: a route without limits pays the settings'
    -- HMGET, which finish_and_claim's claim reuses).
    slot_free(f[12], id)
    if state ~= 'pending' and (f[12] or route_full(route, now)) then
      wake(notify_key(route, nil), 1)
    end
  end
  -- One HSET and one HDEL: the fields set and the fields dropped, gathered first.
  local set, drop = {'state', state, 'kill_requested', '0', 'dead', dead}, {'owner', 'lease_until'}
  if entry then  -- the attempt this finish ends, in the same step: a fenced-off finish got no further
    local history, dropped = appended(f[10] or nil, '{"finished":' .. fmt(now) .. ',' .. string.sub(entry, 2), keep)
    set[#set + 1] = 'history'; set[#set + 1] = history
    if dropped > 0 then redis.call('HINCRBY', key, 'history_dropped', dropped) end
  end
  if attempts then set[#set + 1] = 'attempts'; set[#set + 1] = attempts end
  if err then set[#set + 1] = 'error'; set[#set + 1] = err else drop[#drop + 1] = 'error' end
  if state == 'pending' then
    redis.call('DEL', DONE .. id)  -- a stale token (signal_done keeps one token when it ends)
    if not due then due = fmt(now) elseif not due_kept then due = fmt(tonumber(due) + moved) end
    set[#set + 1] = 'due'; set[#set + 1] = due
    drop[#drop + 1] = 'result'; drop[#drop + 1] = 'finished'
    redis.call('HSET', key, unpack(set))
    redis.call('HDEL', key, unpack(drop))
    redis.call('PERSIST', key)
    key_follows(id, f[6], nil)
    redis.call('ZADD', KEYS[3], '+inf', id)
    redis.call('ZADD', zkey, due, id)
    levels_add(route, target, f[11])
    tally(id, route, f[1], 'pending', nil, due, now)
    wake(notify_key(route, target), 1)
  else
    local at = finished and (tonumber(finished) + moved) or now
    if result then set[#set + 1] = 'result'; set[#set + 1] = result else drop[#drop + 1] = 'result' end
    set[#set + 1] = 'finished'; set[#set + 1] = fmt(at)
    redis.call('HSET', key, unpack(set))
    redis.call('HDEL', key, unpack(drop))
    local ms = math.max(1, math.floor(ttl * 1000))
    redis.call('PEXPIRE', key, int(ms))
    key_follows(id, f[6], ms)
    local expires = fmt(at + ttl)
    redis.call('ZADD', KEYS[3], expires, id)
    tally(id, route, f[1], state, dead, expires, now)
    signal_done(id)
    -- In the same atomic step: count it for the workflow steps waiting for it (release.lua).
    -- Only a record with dependents, or one that waited itself, has anything to do here.
    if f[8] or f[9] then settle_finished(id, state, now, ttl, ms, f[9]) end
  end
  return 1
end
