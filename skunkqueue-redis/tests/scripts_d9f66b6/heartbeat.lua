-- heartbeat: record that a registered worker is alive and what it does.
-- KEYS: 1 worker hash
-- ARGV: 1 state (last_seen is the store's now)
-- Returns 1, or 0 if the worker is not registered (it was reaped).
local function heartbeat(KEYS, ARGV)
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'last_seen', fmt(clock()))
  return 1
end
