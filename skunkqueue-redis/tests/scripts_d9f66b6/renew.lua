-- renew: extend the leases a worker holds, one status per lease.
-- KEYS: 1 lease zset
-- ARGV: 1 lease (s), then (id, token) pairs; the new lease_until is the store's now + lease
-- A renewed lease keeps its record's flow slots (the key's slots zset, the route's running index).
-- Returns 'ok', 'kill' (extended, and a kill was requested) or 'lost' per pair.
local function renew(KEYS, ARGV)
  local until_ = fmt(clock() + tonumber(ARGV[1]))
  local out = {}
  for i = 2, #ARGV, 2 do
    local id, token = ARGV[i], tonumber(ARGV[i + 1])
    local key = JOB .. id
    local status = 'lost'
    if redis.call('TYPE', key)['ok'] == 'hash' then
      local f = redis.call('HMGET', key, 'state', 'token', 'kill_requested', 'route', 'limit_key')
      if f[1] == 'running' and tonumber(f[2] or '0') == token then
        redis.call('HSET', key, 'lease_until', until_)
        redis.call('ZADD', KEYS[1], until_, id)
        -- The lease is the slot: the key's slots and the route's running index move with it.
        if f[5] then redis.call('ZADD', SLOTS .. f[5], until_, id) end
        if f[4] then redis.call('ZADD', tally_key(f[4], 'running'), 'XX', until_, id) end
        status = (f[3] == '1') and 'kill' or 'ok'
      end
    end
    out[#out + 1] = status
  end
  return out
end
