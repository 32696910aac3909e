-- reindex: build the tally index (common.lua's tally()) for a batch of INDEX's records, for a queue
-- whose records were stored before the index existed. Safe while workers run: every script keeps
-- the index of the records it changes, and this only re-asserts a record's current state.
-- KEYS: 1 index zset
-- ARGV: 1 start (rank in INDEX), 2 batch
-- Returns the number of INDEX entries examined; the caller goes on while it equals batch.
local function reindex(KEYS, ARGV)
  local start, batch = tonumber(ARGV[1]), tonumber(ARGV[2])
  local now = clock()
  local entries = redis.call('ZRANGE', KEYS[1], start, start + batch - 1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    local id, expires = entries[i], entries[i + 1]
    local key = JOB .. id
    if redis.call('TYPE', key)['ok'] == 'hash' then
      local f = redis.call('HMGET', key, 'state', 'route', 'dead', 'due', 'lease_until')
      if f[1] == 'pending' then tally(id, f[2], nil, 'pending', nil, f[4] or '0', now)
      elseif f[1] == 'running' then tally(id, f[2], nil, 'running', nil, f[5] or '0', now)
      elseif FINISHED[f[1]] then tally(id, f[2], nil, f[1], f[3], expires, now) end
    end
  end
  return #entries / 2
end
