-- enqueue: store a batch of new records and wake their routes' idle workers.
-- KEYS: 1 index zset, 2 lease zset (declared for the cluster; the names come from common.lua),
--       3 fired zset (every record at score 0, in id order: the monitor's newest-first pages)
-- ARGV: 1 default result ttl (s; a record's result_ttl field wins), 2 the caller's now, 3 records (each packed, then packed together)
-- A caller whose clock is off by more than CLOCK_TOLERANCE has its records'
-- times moved onto the store's clock (see shift()): a delay stays a delay.
-- A record with a key is stored only if no record of the queue holds that key:
-- the key's string (KEYED .. key) names its last holder, which holds the key
-- while its hash exists (a finished record's hash expires at its expiry time)
-- and still names that key. Checking the record, not the string, keeps a
-- purged or expired holder from blocking the key.
-- A record with parents (a workflow step) waits for them: see release.lua (attach).
-- A record whose id is stored already is left as it is: ids are new per fire, so that is the
-- same batch sent again after a lost reply, and the first copy may be running.
-- Returns {position, holder id, ...} for each record not stored because its
-- key was held (positions from 1 in the batch); empty when every record was stored.
local TIMES = {due = true, created = true, started = true, finished = true, lease_until = true}

local function store(f, fields, ttl, now, seen, woken, fired)
  ttl = tonumber(f['result_ttl'] or '') or ttl  -- the record's own retention wins
  local id = f['id']
  local key = JOB .. id
  redis.call('HSET', key, unpack(fields))
  redis.call('ZADD', fired, 0, id)
  if f['key'] then redis.call('SET', KEYED .. f['key'], id) end
  if f['state'] == 'pending' then
    -- A batch usually has one route: build its key names once.
    local where = f['route'] .. '\0' .. (f['target'] or '') .. '\0' .. (f['priority'] or '')
    local names = seen[where]
    if not names then
      names = {due_key(f['route'], f['target'], f['priority']), notify_key(f['route'], f['target'])}
      seen[where] = names
      levels_add(f['route'], f['target'], f['priority'])
    end
    redis.call('ZADD', names[1], f['due'], id)
    redis.call('ZADD', INDEX, '+inf', id)
    if not f['parents'] then woken[names[2]] = (woken[names[2]] or 0) + 1 end
    if f['target'] then redis.call('SADD', TARGETS .. esc(f['route']), f['target']) end
    tally(id, f['route'], nil, 'pending', nil, f['due'], now)
    -- A record's priority picks its due zset (common.lua's due_key).
-- A workflow step waits for its parents (release.lua); those already finished count now.
    if f['parents'] then attach(f, now, ttl) end
  elseif f['state'] == 'running' then
    redis.call('ZADD', LEASE, f['lease_until'] or '0', id)
    redis.call('ZADD', INDEX, '+inf', id)
    if f['limit_key'] then redis.call('ZADD', SLOTS .. f['limit_key'], f['lease_until'] or '0', id) end
    tally(id, f['route'], nil, 'running', nil, f['lease_until'] or '0', now)
  else
    local ms = math.max(1, math.floor(ttl * 1000))
    redis.call('PEXPIRE', key, ms)
    key_follows(id, f['key'], ms)
    local expires = fmt((tonumber(f['finished'] or '') or now) + ttl)
    redis.call('ZADD', INDEX, expires, id)
    tally(id, f['route'], nil, f['state'], f['dead'], expires, now)
  end
end

local function enqueue(KEYS, ARGV)
  local ttl, blob = tonumber(ARGV[1]), ARGV[3]
  local now = clock()
  local moved = shift(ARGV[2], now)
  local woken, seen, held, pos, n = {}, {}, {}, 1, 0
  while pos <= #blob do
    local rec, fields, f, p = nil, {}, {}, 1
    rec, pos = take(blob, pos)
    n = n + 1
    while p <= #rec do
      local name, value
      name, p = take(rec, p)
      value, p = take(rec, p)
      if moved ~= 0 and TIMES[name] and tonumber(value) then value = fmt(tonumber(value) + moved) end
      f[name] = value
      fields[#fields + 1] = name
      fields[#fields + 1] = value
    end
    local holder = f['key'] and redis.call('GET', KEYED .. f['key'])
    -- pcall: something other than a hash under the holder's name holds nothing.
    if holder and holder ~= f['id'] and redis.pcall('HGET', JOB .. holder, 'key') == f['key'] then
      held[#held + 1] = tostring(n)
      held[#held + 1] = holder
    elseif redis.call('HSETNX', JOB .. f['id'], 'id', f['id']) == 1 then
      store(f, fields, ttl, now, seen, woken, KEYS[3])
    end
    -- else: this batch was sent again after its reply was lost (a reset connection; the client
    -- resends), and a worker may already run the record: storing it again would make it pending.
    -- The check is a write (HSETNX, not EXISTS): a script whose first command reads runs on a
    -- demoted primary until its first write fails, and a Sentinel client then kept its stale
    -- connection (test_a_paused_primary_that_comes_back_after_the_failover hung its producers).
  end
  for nkey, count in pairs(woken) do wake(nkey, count) end
  return held
end
