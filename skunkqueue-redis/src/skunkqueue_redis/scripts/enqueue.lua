-- enqueue: store a batch of new records and wake their routes' idle workers.
-- KEYS: 1 index zset, 2 lease zset (declared for the cluster; the names come from common.lua)
-- ARGV: 1 default result ttl (s; a record's result_ttl field wins), 2 the caller's now, 3 records (each packed, then packed together)
-- A caller whose clock is off by more than CLOCK_TOLERANCE has its records'
-- times moved onto the store's clock (see shift()): a delay stays a delay.
-- Returns 1.
local TIMES = {due = true, created = true, started = true, finished = true, lease_until = true}

local function enqueue(KEYS, ARGV)
  local ttl, blob = tonumber(ARGV[1]), ARGV[3]
  local now = clock()
  local moved = shift(ARGV[2], now)
  local woken, seen, pos = {}, {}, 1
  while pos <= #blob do
    local rec, fields, f, p = nil, {}, {}, 1
    rec, pos = take(blob, pos)
    while p <= #rec do
      local name, value
      name, p = take(rec, p)
      value, p = take(rec, p)
      if moved ~= 0 and TIMES[name] and tonumber(value) then value = fmt(tonumber(value) + moved) end
      f[name] = value
      fields[#fields + 1] = name
      fields[#fields + 1] = value
    end
    local id = f['id']
    local key = JOB .. id
    redis.call('HSET', key, unpack(fields))
    if f['state'] == 'pending' then
      -- A batch usually has one route: build its key names once.
      local where = f['route'] .. '\0' .. (f['target'] or '')
      local names = seen[where]
      if not names then
        names = {due_key(f['route'], f['target']), notify_key(f['route'], f['target'])}
        seen[where] = names
      end
      redis.call('ZADD', names[1], f['due'], id)
      redis.call('ZADD', INDEX, '+inf', id)
      woken[names[2]] = (woken[names[2]] or 0) + 1
      if f['target'] then redis.call('SADD', TARGETS .. esc(f['route']), f['target']) end
    elseif f['state'] == 'running' then
      redis.call('ZADD', LEASE, f['lease_until'] or '0', id)
      redis.call('ZADD', INDEX, '+inf', id)
    else
      local keep = tonumber(f['result_ttl'] or '') or ttl
      redis.call('PEXPIRE', key, math.max(1, math.floor(keep * 1000)))
      redis.call('ZADD', INDEX, fmt((tonumber(f['finished'] or '') or now) + keep), id)
    end
  end
  for nkey, n in pairs(woken) do wake(nkey, n) end
  return 1
end
