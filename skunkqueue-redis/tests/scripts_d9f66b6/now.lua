-- now: the store's clock, formatted as every script stores times.
-- KEYS: 1 index zset (not read: it sends the call to the node that holds the queue)
-- ARGV: none of its own
-- Returns the store's now (seconds since the epoch, as a string).
local function now(KEYS, ARGV)
  return fmt(clock())
end
