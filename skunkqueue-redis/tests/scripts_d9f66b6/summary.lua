-- summary: per route, records per state, dead letters and the longest wait, from the tally index
-- (common.lua's tally()) alone: no record is read, so it costs the same at 10 or 10 million jobs.
-- KEYS: 1 routes set (declared for the cluster; the name comes from common.lua)
-- ARGV: none of its own
-- Returns {rows, the store's now}; a row is {route, pending, running, complete, error, killed, dead,
-- due of the oldest due pending record or ''}. Finished entries count while their record lives.
local function summary(KEYS, ARGV)
  local now = fmt(clock())
  local rows = {}
  for _, route in ipairs(redis.call('SMEMBERS', ROUTES)) do
    local row = {route}
    row[2] = redis.call('ZCARD', tally_key(route, 'pending'))
    row[3] = redis.call('ZCARD', tally_key(route, 'running'))
    for _, state in ipairs({'complete', 'error', 'killed', 'dead'}) do
      row[#row + 1] = redis.call('ZCOUNT', tally_key(route, state), '(' .. now, '+inf')
    end
    local first = redis.call('ZRANGEBYSCORE', tally_key(route, 'pending'), '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
    row[8] = first[2] or ''
    rows[#rows + 1] = row
  end
  return {rows, now}
end
