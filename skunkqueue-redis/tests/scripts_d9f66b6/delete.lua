-- delete: delete finished records now (the monitor's "delete dead letters"); others are left alone.
-- KEYS: 1 index zset, 2 fired zset
-- ARGV: ids
-- Returns how many records were deleted.
local function delete(KEYS, ARGV)
  local deleted = 0
  for _, id in ipairs(ARGV) do
    local key = JOB .. id
    if redis.call('TYPE', key)['ok'] == 'hash' then
      local f = redis.call('HMGET', key, 'state', 'route', 'key')
      if FINISHED[f[1]] then
        key_follows(id, f[3], 0)  -- the key is free: its string goes too
        redis.call('DEL', key, DONE .. id)
        redis.call('ZREM', KEYS[1], id)
        redis.call('ZREM', KEYS[2], id)
        tally(id, f[2], f[1], nil)
        deleted = deleted + 1
      end
    end
  end
  return deleted
end
