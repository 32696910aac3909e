-- expired: running records whose lease ran out by the store's clock; drops expired index entries.
-- KEYS: 1 lease zset, 2 index zset, 3 fired zset
-- ARGV: 1 limit
-- Returns {ids (at most limit), the store's now}.
local EXPIRED_BATCH = 1000

local function expired(KEYS, ARGV)
  local now = fmt(clock())
  -- Finished records' index entries whose hash has expired: this runs about once a second per worker.
  -- A batch at a time, leaving the fired index (which keeps no expiry) no entry of a gone record.
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, EXPIRED_BATCH)
  if #gone > 0 then
    redis.call('ZREM', KEYS[3], unpack(gone))
    redis.call('ZREM', KEYS[2], unpack(gone))
  end
  return {redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1])), now}
end
