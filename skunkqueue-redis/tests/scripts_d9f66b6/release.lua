-- release: workflows' count-down, run inside enqueue and finish (no entry of its own).
-- KEYS: none of its own (its callers' scripts declare theirs); the keys it touches share the
--       queue's hash tag: JOB .. id, and two more per record, named from the job prefix as keys.py does:
--   sq:{Q}:deps:<parent>   set   ids of the records waiting (or that waited) for <parent>
--   sq:{Q}:settled:<child> hash  the SET of <child>'s finished parents: parent id -> how it ended
--                                (while <child> waits: deleted when it is released or ended)
-- ARGV: none of its own.
-- A waiting record is pending with due = WAITING_DUE (never claimed) and a 'wait_left' field
-- (how many parents have not finished); the field exists while it waits. A parent's hash gets
-- 'has_deps' when a dependent attaches, so a finish without dependents skips all of this. HSETNX on the
-- settled hash is the set: a parent counts once however often its finish is replayed, and a
-- fenced-off finish never gets here. dependencies.py holds the same rules for Python stores.
local BASE = sub(JOB, 1, #JOB - 2)
local DEPS, SETTLED = BASE .. 'deps:', BASE .. 'settled:'

local function dependency_failed(parent, state)
  return cjson.encode({type = 'DependencyFailed', message = parent .. ' ended ' .. state, traceback = ''})
end

-- End a waiting record killed (a parent failed); false if it is not pending any more.
local function end_waiting(id, err, now, default_ttl)
  local key = JOB .. id
  local f = redis.call('HMGET', key, 'state', 'route', 'target', 'key', 'result_ttl', 'priority')
  if f[1] ~= 'pending' or not f[2] then return false end
  local ttl = tonumber(f[5] or '') or default_ttl
  redis.call('ZREM', due_key(f[2], f[3] or nil, f[6]), id)
  redis.call('HSET', key, 'state', 'killed', 'error', err, 'finished', fmt(now), 'dead', '0', 'kill_requested', '0')
  redis.call('HDEL', key, 'owner', 'lease_until', 'result', 'wait_left')
  redis.call('DEL', SETTLED .. id)
  local ms = math.max(1, math.floor(ttl * 1000))
  redis.call('PEXPIRE', key, int(ms))
  redis.call('PEXPIRE', DEPS .. id, int(ms))  -- its own dependents are counted next
  key_follows(id, f[4], ms)
  local expires = fmt(now + ttl)
  redis.call('ZADD', INDEX, expires, id)
  tally(id, f[2], 'pending', 'killed', '0', expires, now)
  redis.call('DEL', DONE .. id)
  signal_done(id)
  return true
end

-- Make a waiting record claimable now, and wake its route.
local function release_now(id, now)
  local key = JOB .. id
  local f = redis.call('HMGET', key, 'state', 'route', 'target', 'priority')
  if f[1] ~= 'pending' or not f[2] then return end
  local due = fmt(now)
  redis.call('HSET', key, 'due', due)
  redis.call('HDEL', key, 'wait_left')
  redis.call('DEL', SETTLED .. id)
  redis.call('ZADD', due_key(f[2], f[3] or nil, f[4]), due, id)
  levels_add(f[2], f[3] or nil, f[4])
  tally(id, f[2], 'pending', 'pending', nil, due, now)
  wake(notify_key(f[2], f[3] or nil), 1)
end

-- Count parent (ended `state`) into its dependents' sets (children: those given, else every
-- dependent it has); release or end each one it completes. A dependent ended here counts for
-- its own dependents in turn (a worklist: a chain may be long).
local function settle(parent, state, now, default_ttl, children)
  local work = {{parent, state, children}}
  while #work > 0 do
    local item = table.remove(work)
    local pid, pstate, kids = item[1], item[2], item[3]
    if not kids then kids = redis.call('SMEMBERS', DEPS .. pid) end
    for _, child in ipairs(kids) do
      local f = redis.call('HMGET', JOB .. child, 'state', 'wait_left', 'on_failure')
      local left = tonumber(f[2] or '')
      -- Only a waiting record has a set (it goes when the record is released or ended).
      if f[1] == 'pending' and left and redis.call('HSETNX', SETTLED .. child, pid, pstate) == 1 then
        if pstate ~= 'complete' and f[3] ~= 'run' then
          if end_waiting(child, dependency_failed(pid, pstate), now, default_ttl) then
            work[#work + 1] = {child, 'killed', nil}
          end
        elseif left <= 1 then
          release_now(child, now)
        else
          redis.call('HSET', JOB .. child, 'wait_left', int(left - 1))
        end
      end
    end
  end
end

-- A record that finished: count it for its dependents, and let its workflow keys expire with it.
-- waited: it was a waiting record itself (killed by request while it waited).
local function settle_finished(id, state, now, default_ttl, ms, waited)
  if waited then
    redis.call('HDEL', JOB .. id, 'wait_left')
    redis.call('DEL', SETTLED .. id)
  end
  settle(id, state, now, default_ttl, nil)
  redis.call('PEXPIRE', DEPS .. id, int(ms))
end

-- A new waiting record (fields f, parents: its JSON list): becomes a dependent of each parent;
-- parents that already finished (or no longer exist: they count as killed) count at once.
local function attach(f, now, default_ttl)
  local id = f['id']
  local parents, seen, unique = cjson.decode(f['parents']), {}, {}
  for _, p in ipairs(parents) do
    if not seen[p] then seen[p] = true; unique[#unique + 1] = p end
  end
  redis.call('HSET', JOB .. id, 'wait_left', int(#unique))
  for _, p in ipairs(unique) do redis.call('SADD', DEPS .. p, id) end
  for _, p in ipairs(unique) do
    local state = redis.pcall('HGET', JOB .. p, 'state')
    if type(state) ~= 'string' then
      settle(p, 'killed', now, default_ttl, {id})
    elseif FINISHED[state] then
      settle(p, state, now, default_ttl, {id})
    else
      redis.call('HSET', JOB .. p, 'has_deps', '1')  -- its finish counts this dependent
    end
  end
end
