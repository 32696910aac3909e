-- expired: running records whose lease ran out by the store's clock; drops expired index entries.
-- KEYS: 1 lease zset, 2 index zset
-- ARGV: 1 limit
-- Returns {ids (at most limit), the store's now}.
local function expired(KEYS, ARGV)
  local now = fmt(clock())
  -- Finished records' index entries whose hash has expired: this runs about once a second per worker.
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
  return {redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1])), now}
end
