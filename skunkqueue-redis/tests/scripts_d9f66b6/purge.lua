-- purge: delete up to `batch` pending records listed in a due zset.
-- KEYS: 1 a due zset, 2 index zset, 3 fired zset
-- ARGV: 1 batch
-- Returns {deleted, examined}; the caller repeats while examined == batch.
local function purge(KEYS, ARGV)
  local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
  local deleted = 0
  for _, id in ipairs(ids) do
    local key = JOB .. id
    redis.call('ZREM', KEYS[1], id)
    local f = redis.call('TYPE', key)['ok'] == 'hash' and redis.call('HMGET', key, 'state', 'route')
    if f and f[1] == 'pending' then
      key_follows(id, redis.call('HGET', key, 'key'), 0)  -- the key is free: its string goes too
      redis.call('DEL', key)
      redis.call('ZREM', KEYS[2], id)
      redis.call('ZREM', KEYS[3], id)
      tally(id, f[2], 'pending', nil)
      deleted = deleted + 1
    end
  end
  return {deleted, #ids}
end
