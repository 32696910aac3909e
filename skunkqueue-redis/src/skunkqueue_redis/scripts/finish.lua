-- finish: apply an outcome to a record if the caller still holds it (the fence).
-- KEYS: 1 job hash, 2 lease zset, 3 index zset
-- ARGV: 1 id, 2 token, 3 expected state, 4 the caller's now, 5 default result ttl (s; the record's
--       own result_ttl field wins), 6 state, 7 dead ('0'/'1'),
--       8 attempts, 9 error json, 10 result, 11 due, 12 finished
--       (8-12 optional: '' for none, else '.' then the value; due and finished are on the caller's clock)
-- Returns 1 if applied, 0 if the record is not in the expected state under this token.
-- Outcome.apply_to's rules, with one more: a record whose kill was requested
-- is never put back to pending; it ends killed (JobKilled) instead.
local function opt(v) if v == '' then return nil end return string.sub(v, 2) end

local function finish(KEYS, ARGV)
  local id, token, expect = ARGV[1], ARGV[2], ARGV[3]
  local ttl, state, dead = tonumber(ARGV[5]), ARGV[6], ARGV[7]
  local attempts, err, result, due, finished = opt(ARGV[8]), opt(ARGV[9]), opt(ARGV[10]), opt(ARGV[11]), opt(ARGV[12])
  local key = KEYS[1]
  if redis.call('TYPE', key)['ok'] ~= 'hash' then return 0 end
  local f = redis.call('HMGET', key, 'state', 'token', 'route', 'target', 'kill_requested', 'key', 'result_ttl')
  if f[1] ~= expect or tonumber(f[2] or '0') ~= tonumber(token) or not f[3] then return 0 end
  ttl = tonumber(f[7] or '') or ttl
  local now = clock()
  local moved = shift(ARGV[4], now)
  if state == 'pending' and f[5] == '1' then
    state, dead, result, finished = 'killed', '0', nil, nil  -- attempts as given (a hand-back's)
    err = cjson.encode({type = 'JobKilled', message = 'killed by request', traceback = ''})
  end
  local route, target = f[3], f[4] or nil
  local zkey = due_key(route, target)
  redis.call('ZREM', zkey, id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HSET', key, 'state', state, 'kill_requested', '0', 'dead', dead)
  redis.call('HDEL', key, 'owner', 'lease_until')
  if attempts then redis.call('HSET', key, 'attempts', attempts) end
  if err then redis.call('HSET', key, 'error', err) else redis.call('HDEL', key, 'error') end
  local done = DONE .. id
  redis.call('DEL', done)
  if state == 'pending' then
    due = due and fmt(tonumber(due) + moved) or fmt(now)
    redis.call('HSET', key, 'due', due)
    redis.call('HDEL', key, 'result', 'finished')
    redis.call('PERSIST', key)
    key_follows(id, f[6], nil)
    redis.call('ZADD', KEYS[3], '+inf', id)
    redis.call('ZADD', zkey, due, id)
    tally(id, route, f[1], 'pending', nil, due, now)
    wake(notify_key(route, target), 1)
  else
    local at = finished and (tonumber(finished) + moved) or now
    if result then redis.call('HSET', key, 'result', result) else redis.call('HDEL', key, 'result') end
    redis.call('HSET', key, 'finished', fmt(at))
    redis.call('PEXPIRE', key, math.max(1, math.floor(ttl * 1000)))
    key_follows(id, f[6], math.max(1, math.floor(ttl * 1000)))
    redis.call('ZADD', KEYS[3], fmt(at + ttl), id)
    tally(id, route, f[1], state, dead, fmt(at + ttl), now)
    redis.call('RPUSH', done, '1')
    redis.call('PEXPIRE', done, DONE_TOKEN_MS)
  end
  return 1
end
