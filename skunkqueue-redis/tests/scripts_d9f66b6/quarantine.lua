-- quarantine: mark a record that does not decode as a dead error (common.lua's quarantine()).
-- KEYS: 1 job hash, 2 lease zset, 3 index zset
-- ARGV: 1 id, 2 why, 3 result ttl (s)
-- Returns 1, or 0 if there is no such hash.
local function quarantine_record(KEYS, ARGV)
  if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 0 end
  quarantine(ARGV[1], ARGV[2], clock(), tonumber(ARGV[3]))
  return 1
end
