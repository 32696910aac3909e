-- claim: take up to `limit` records of a route that are due by the store's clock, in (due, id) order.
-- KEYS: 1 route zset, 2 (route, worker) zset, 3 route notify list, 4 (route, worker) notify list
-- ARGV: 1 lease (s), 2 worker id, 3 limit, 4 result ttl (s, for quarantined records)
-- Returns {claimed records (each packed), next due score or '', foreign keys skipped, the store's now}.
-- A claim that filled its limit skips looking for the next due and returns the store's now for it
-- (look again at once): its worker is busy and claims again before it waits, and that claim,
-- if it comes back short, finds the next due and drops stale wake-up tokens.
local function claim(KEYS, ARGV)
  local lease, worker, limit, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local nownum = clock()
  local now, until_ = fmt(nownum), fmt(nownum + lease)
  local out, foreign = {}, {}
  for _ = 1, CLAIM_ROUNDS do
    local want = limit - #out
    if want <= 0 then break end
    local wants = int(want)
    local a = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', '0', wants)
    local b = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES', 'LIMIT', '0', wants)
    if #a == 0 and #b == 0 then break end
    -- Merge the shared and the broadcast zset in (due, id) order.
    local i, j, picked = 1, 1, {}
    while #picked < want and (i <= #a or j <= #b) do
      local from_a
      if i > #a then from_a = false
      elseif j > #b then from_a = true
      else
        local sa, sb = tonumber(a[i + 1]), tonumber(b[j + 1])
        from_a = sa < sb or (sa == sb and a[i] < b[j])
      end
      if from_a then picked[#picked + 1] = {a[i], KEYS[1]}; i = i + 2
      else picked[#picked + 1] = {b[j], KEYS[2]}; j = j + 2 end
    end
    for _, p in ipairs(picked) do
      local id, zkey = p[1], p[2]
      local key = JOB .. id
      redis.call('ZREM', zkey, id)
      -- pcall: an error (WRONGTYPE) means the key is not a hash; no field at all, a hash
      -- without them (quarantined below) or no key (a stale entry: EXISTS tells them apart).
      local f = redis.pcall('HMGET', key, 'state', 'token', 'attempts', 'route')
      if f.err then
        foreign[#foreign + 1] = key
      elseif (f[1] or f[2] or f[3] or f[4]) or redis.call('EXISTS', key) == 1 then
        local token, attempts = tonumber(f[2] or '0'), tonumber(f[3] or '0')
        if f[1] == 'pending' and token and attempts then
          redis.call('HSET', key, 'state', 'running', 'owner', worker, 'lease_until', until_,
            'token', int(token + 1), 'attempts', int(attempts + 1), 'started', now, 'kill_requested', '0')
          redis.call('ZADD', LEASE, until_, id)
          tally(id, f[4], 'pending', 'running', nil, '+inf', nownum)
          out[#out + 1] = pack(redis.call('HGETALL', key))
        elseif f[1] == 'pending' then
          quarantine(id, 'token or attempts is not a number', nownum, ttl)
        elseif f[1] ~= 'running' and f[1] ~= 'complete' and f[1] ~= 'error' and f[1] ~= 'killed' then
          quarantine(id, 'unknown state ' .. tostring(f[1]), nownum, ttl)
        end
        -- a known non-pending state is a stale index entry: dropping it was all there was to do
      end
    end
  end
  if #out > 0 and #out >= limit then return {out, now, foreign, now} end
  local next_due = ''
  local n1 = redis.call('ZRANGE', KEYS[1], '0', '0', 'WITHSCORES')
  local n2 = redis.call('ZRANGE', KEYS[2], '0', '0', 'WITHSCORES')
  if n1[2] then next_due = n1[2] end
  if n2[2] and (next_due == '' or tonumber(n2[2]) < tonumber(next_due)) then next_due = n2[2] end
  if next_due == '' or tonumber(next_due) > nownum then
    -- Nothing is claimable now, so any wake-up tokens left are stale.
    redis.call('DEL', KEYS[3], KEYS[4])
  end
  return {out, next_due, foreign, now}
end
