-- heartbeat: record that a registered worker is alive and what it does.
-- KEYS: 1 worker hash
-- ARGV: 1 state, 2 last_seen
-- Returns 1, or 0 if the worker is not registered (it was reaped).
local function heartbeat(KEYS, ARGV)
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'last_seen', ARGV[2])
  return 1
end
