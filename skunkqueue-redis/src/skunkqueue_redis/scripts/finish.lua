-- finish: apply an outcome to a running record if the caller still holds it (the fence).
-- KEYS: 1 job hash, 2 lease zset, 3 index zset
-- ARGV: 1 id, 2 token, 3 expected state, 4 now, 5 ttl_ms, 6 expire_at, 7 state, 8 dead ('0'/'1'),
--       9 attempts, 10 error json, 11 result (each optional: '' or '.' then the value), 12 due, 13 finished
-- Returns 1 if applied, 0 if the record is not in the expected state under this token.
local function finish(KEYS, ARGV)
  local id, token, expect, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
  local ttl_ms, expire_at, state, dead = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  local attempts, err, result, due, finished = ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13]
  local key = KEYS[1]
  if redis.call('TYPE', key)['ok'] ~= 'hash' then return 0 end
  local f = redis.call('HMGET', key, 'state', 'token', 'route', 'target')
  if f[1] ~= expect or tonumber(f[2] or '0') ~= tonumber(token) or not f[3] then return 0 end
  local route, target = f[3], f[4] or nil
  local zkey = due_key(route, target)
  redis.call('ZREM', zkey, id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HSET', key, 'state', state, 'kill_requested', '0', 'dead', dead)
  redis.call('HDEL', key, 'owner', 'lease_until')
  if attempts ~= '' then redis.call('HSET', key, 'attempts', string.sub(attempts, 2)) end
  if err ~= '' then redis.call('HSET', key, 'error', string.sub(err, 2)) else redis.call('HDEL', key, 'error') end
  local done = DONE .. id
  redis.call('DEL', done)
  if state == 'pending' then
    redis.call('HSET', key, 'due', due)
    redis.call('HDEL', key, 'result', 'finished')
    redis.call('PERSIST', key)
    redis.call('ZADD', KEYS[3], '+inf', id)
    redis.call('ZADD', zkey, due, id)
    wake(notify_key(route, target), 1)
  else
    if result ~= '' then redis.call('HSET', key, 'result', string.sub(result, 2))
    else redis.call('HDEL', key, 'result') end
    redis.call('HSET', key, 'finished', finished)
    redis.call('PEXPIRE', key, ttl_ms)
    redis.call('ZADD', KEYS[3], expire_at, id)
    redis.call('RPUSH', done, '1')
    redis.call('PEXPIRE', done, DONE_TOKEN_MS)
  end
  return 1
end
