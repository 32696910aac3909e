-- kill: flag a running record so its worker interrupts it.
-- KEYS: 1 job hash
-- ARGV: none of its own
-- Returns 1 if the running record was flagged.
local function kill(KEYS, ARGV)
  if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 0 end
  if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
  redis.call('HSET', KEYS[1], 'kill_requested', '1')
  return 1
end
