-- register: add or replace a worker in the registry.
-- KEYS: 1 worker hash, 2 workers set
-- ARGV: 1 worker id, 2 the caller's now, then the WorkerInfo's field/value pairs
-- A worker whose clock is off by more than CLOCK_TOLERANCE has its started and
-- last_seen moved onto the store's clock (see shift()): readers compare them with it.
-- Returns 1.
local function register(KEYS, ARGV)
  local moved = shift(ARGV[2], clock())
  local fields = {}
  for i = 3, #ARGV, 2 do
    local name, value = ARGV[i], ARGV[i + 1]
    if moved ~= 0 and (name == 'started' or name == 'last_seen') and tonumber(value) then
      value = fmt(tonumber(value) + moved)
    end
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
