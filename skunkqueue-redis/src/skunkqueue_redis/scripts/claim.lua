-- claim: take up to `limit` records of a route that are due by the store's clock: priority
-- descending, then (due, id); within each level, broadcasts to this worker merge with shared records.
-- Flow control (the Persistence docstring's rules): nothing from a paused route; a record whose
-- key has no free slot (a slot is a live lease in the key's slots zset) or whose key's or route's
-- rate (GCRA on TIME) does not allow a start yet is skipped, left where it is, unchanged, and the
-- claim goes on behind it, looking at no more than FLOW_SCAN records past those it takes.
-- KEYS: 1 route zset (priority 0), 2 (route, worker) zset, 3 route notify list, 4 (route, worker) notify list
--       (the priority zsets, slots, GCRA times and settings share the queue's hash tag: common.lua)
-- ARGV: 1 lease (s), 2 worker id, 3 limit, 4 result ttl (s, for quarantined records), 5 route,
--       6 FLOW_SCAN
-- Returns {claimed records (each a flat list of field names and values, like HGETALL's), next due score
-- or '', foreign keys skipped, the store's now}.
-- A claim that filled its limit skips looking for the next due and returns the store's now for it
-- (look again at once): its worker is busy and claims again before it waits, and that claim,
-- if it comes back short, finds the next due and drops stale wake-up tokens. A claim that left
-- due records behind for a limit returns when one may be claimable instead ('' : not known; a
-- finish that frees a slot or a changed setting pushes a wake-up token), so its worker waits.
-- The fields claim looks at, by their place in visit()'s f.
local CLAIM_FIELDS = {state = 1, token = 2, attempts = 3, route = 4, limit_key = 5, limit_concurrency = 6,
  limit_interval = 7, limit_burst = 8}

local function claim(KEYS, ARGV)
  local lease, worker, limit, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local route, scan = ARGV[5], tonumber(ARGV[6])
  local nownum = clock()
  local now, until_ = fmt(nownum), fmt(nownum + lease)
  local out, foreign = {}, {}
  -- A route without flow settings, priorities and broadcasts pays this HMGET (once per script call:
  -- finish_and_claim's finish read it) and the EXISTS below.
  local setting = flow_settings(route)
  if setting[1] then
    redis.call('DEL', KEYS[3], KEYS[4])
    return {out, '', foreign, now}
  end
  local room, route_interval, route_burst = limit, nil, 1
  if setting[2] then
    local ok, data = pcall(cjson.decode, setting[2])
    if ok and type(data) == 'table' then
      local running_key = tally_key(route, 'running')
      local cap = tonumber(data['concurrency'])
      if cap then
        room = math.min(room, cap - redis.call('ZCOUNT', running_key, '(' .. now, '+inf'))
        if room <= 0 then
          local first = redis.call('ZRANGEBYSCORE', running_key, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
          redis.call('DEL', KEYS[3], KEYS[4])
          return {out, first[2] or '', foreign, now}
        end
      end
      route_interval = tonumber(data['interval'])
      route_burst = tonumber(data['burst']) or 1
    end
  end
  -- The levels of the route's shared records and of this worker's broadcasts, highest first, with
  -- 0 in its place; each level is a pair (shared zset, this worker's zset), merged like level 0.
  local levels_key, mine_key = LEVELS .. esc(route), LEVELS .. suffix(route, worker)
  local found, listed = {}, {}
  -- No level listed and no broadcast for this worker (one EXISTS): only the route's zset of level 0.
  local plain = redis.call('EXISTS', levels_key, mine_key, KEYS[2]) == 0
  for _, key in ipairs(plain and {} or {levels_key, mine_key}) do
    for _, p in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      local level = tonumber(p)
      if level and level ~= 0 and not listed[level] then
        listed[level] = true
        found[#found + 1] = level
      end
    end
  end
  table.sort(found, function(x, y) return x > y end)
  local sources = {}
  local zero_done = false
  for _, level in ipairs(found) do
    if level < 0 and not zero_done then
      sources[#sources + 1] = {KEYS[1], KEYS[2]}
      zero_done = true
    end
    local p = string.format('%d', level)
    sources[#sources + 1] = {due_key(route, nil, p), due_key(route, worker, p), level = p}
  end
  if plain then sources[1] = {KEYS[1]}  -- (no second zset: nothing to merge)
  elseif not zero_done then sources[#sources + 1] = {KEYS[1], KEYS[2]} end

  local looked, held, wake_at, stop = 0, false, nil, false
  local blocked = {}
  local function later(at)
    held = true
    if at and (not wake_at or at < wake_at) then wake_at = at end
  end
  -- Try one pending record (fields f); true if taken.
  local function try(id, key, f)
    local limit_key = f[5]
    local key_time
    if limit_key then
      if blocked[limit_key] then return false end
      local cap = tonumber(f[6] or '')
      if cap then
        local slots = SLOTS .. limit_key
        if redis.call('ZCOUNT', slots, '(' .. now, '+inf') >= cap then
          local first = redis.call('ZRANGEBYSCORE', slots, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
          blocked[limit_key] = true
          later(tonumber(first[2] or ''))
          return false
        end
      end
      local interval = tonumber(f[7] or '')
      if interval then
        local ok, at = gcra(rate_time('k:' .. limit_key), nownum, interval, tonumber(f[8] or '') or 1)
        if not ok then
          blocked[limit_key] = true
          later(at)
          return false
        end
        key_time = at
      end
    end
    if route_interval then
      local ok, at = gcra(rate_time('r:' .. route), nownum, route_interval, route_burst)
      if not ok then
        later(at)
        stop = true  -- the route's own limit stops the claim
        return false
      end
      set_rate_time('r:' .. route, at)
    end
    if key_time then set_rate_time('k:' .. limit_key, key_time) end
    local token, attempts = tonumber(f[2]), tonumber(f[3])
    local set = {'state', 'running', 'owner', worker, 'lease_until', until_,
      'token', int(token + 1), 'attempts', int(attempts + 1), 'started', now, 'kill_requested', '0'}
    redis.call('HSET', key, unpack(set))
    redis.call('ZADD', LEASE, until_, id)
    if limit_key then redis.call('ZADD', SLOTS .. limit_key, until_, id) end
    tally(id, f[4], 'pending', 'running', nil, until_, nownum)
    -- The record as claimed: what HGETALL read, with the fields just set (no second read).
    local flat, at = f.flat, f.at
    for i = 1, #set, 2 do
      local name = set[i]
      local pos = at[name]
      if pos then flat[pos] = set[i + 1]
      else flat[#flat + 1] = name; flat[#flat + 1] = set[i + 1] end
    end
    out[#out + 1] = flat
    return true
  end
  -- One entry of a due zset: 'taken', 'skipped' (it stays: the next page starts after it), or dropped.
  local function visit(id, zkey)
    local key = JOB .. id
    -- pcall: an error (WRONGTYPE) means the key is not a hash; no field at all is no key
    -- (a stale entry), a hash without the fields is quarantined below.
    -- The whole record is read once: a claim returns it (try() patches what it sets).
    local flat = redis.pcall('HGETALL', key)
    if flat.err then
      foreign[#foreign + 1] = key
    elseif #flat > 0 then
      local f, at = {flat = flat}, {}
      for i = 1, #flat, 2 do
        local name = flat[i]
        local slot = CLAIM_FIELDS[name]
        if slot then f[slot] = flat[i + 1] end
        at[name] = i + 1
      end
      f.at = at
      local token, attempts = tonumber(f[2] or '0'), tonumber(f[3] or '0')
      if f[1] == 'pending' and token and attempts then
        f[2], f[3] = token, attempts
        if try(id, key, f) then return 'taken' end
        return 'skipped'
      elseif f[1] == 'pending' then
        quarantine(id, 'token or attempts is not a number', nownum, ttl)
      elseif f[1] ~= 'running' and f[1] ~= 'complete' and f[1] ~= 'error' and f[1] ~= 'killed' then
        quarantine(id, 'unknown state ' .. tostring(f[1]), nownum, ttl)
      end
      -- a known non-pending state is a stale index entry: dropping it was all there was to do
    end
    redis.call('ZREM', zkey, id)
    return 'dropped'
  end

  for _, source in ipairs(sources) do
    local a_key, b_key = source[1], source[2]
    local a_skip, b_skip = 0, 0
    while not stop and #out < room do
      if looked >= scan then held = true; stop = true; break end
      -- A page of each zset, past the records skipped so far (those taken or dropped are gone).
      -- Exactly what is wanted until a record is skipped (the common case reads no more), then more.
      local extra = 0
      if a_skip + b_skip > 0 then extra = 16 end
      local page = int(room - #out + extra)
      -- Scores only to merge with a second zset (Redis formats each with '%.17g', Lua reads it back).
      local a, step = nil, 2
      if b_key then a = redis.call('ZRANGEBYSCORE', a_key, '-inf', now, 'WITHSCORES', 'LIMIT', a_skip, page)
      else a, step = redis.call('ZRANGEBYSCORE', a_key, '-inf', now, 'LIMIT', a_skip, page), 1 end
      local b = {}
      if b_key then b = redis.call('ZRANGEBYSCORE', b_key, '-inf', now, 'WITHSCORES', 'LIMIT', b_skip, page) end
      if #a == 0 and #b == 0 then break end
      -- Merge the shared and the broadcast zset in (due, id) order: as many entries as a page
      -- holds, so neither page runs out before a record of its zset that sorts earlier.
      local i, j, n = 1, 1, 0
      local size = room - #out + extra
      while n < size and (i <= #a or j <= #b) and #out < room and not stop do
        local from_a
        if i > #a then from_a = false
        elseif j > #b then from_a = true
        else
          local sa, sb = tonumber(a[i + 1]), tonumber(b[j + 1])
          from_a = sa < sb or (sa == sb and a[i] < b[j])
        end
        n = n + 1
        local seen
        if from_a then
          seen = visit(a[i], a_key)
          if seen == 'skipped' then a_skip = a_skip + 1 end
          i = i + step
        else
          seen = visit(b[j], b_key)
          if seen == 'skipped' then b_skip = b_skip + 1 end
          j = j + 2
        end
        -- FLOW_SCAN bounds the records looked at past those taken.
        if seen ~= 'taken' then looked = looked + 1 end
        if looked >= scan then break end
      end
    end
    if stop or #out >= room then break end
  end

  write_rate_times()
  if #out > 0 and #out >= limit then return {out, now, foreign, now} end
  -- Short: when may the next record be claimable? Records due later, and (held) the time a
  -- skipped one may be; the skipped due ones themselves are no reason to look again at once.
  local next_due = ''
  local function consider(score)
    if score and (next_due == '' or tonumber(score) < tonumber(next_due)) then next_due = score end
  end
  for _, source in ipairs(sources) do
    for _, zkey in ipairs({source[1], source[2]}) do
      local first
      if held then first = redis.call('ZRANGEBYSCORE', zkey, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
      else first = redis.call('ZRANGE', zkey, '0', '0', 'WITHSCORES') end
      consider(first[2])
    end
    if source.level then  -- an emptied level is looked at no more
      if redis.call('EXISTS', source[1]) == 0 then redis.call('ZREM', levels_key, source.level) end
      if redis.call('EXISTS', source[2]) == 0 then redis.call('ZREM', mine_key, source.level) end
    end
  end
  if held and wake_at then consider(fmt(wake_at)) end
  if held or next_due == '' or tonumber(next_due) > nownum then
    -- Nothing is claimable now, so any wake-up tokens left are stale.
    redis.call('DEL', KEYS[3], KEYS[4])
  end
  return {out, next_due, foreign, now}
end
