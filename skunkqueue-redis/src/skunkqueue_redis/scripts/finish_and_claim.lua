-- finish_and_claim: finish(), then claim(), in one round trip (needs finish.lua and claim.lua).
-- KEYS: finish's 3 keys, then claim's 4
-- ARGV: 1 n = how many of finish's arguments follow, then finish's n arguments, then claim's
-- Returns {finish's result, claim's result}.
local function finish_and_claim(KEYS, ARGV)
  local n = tonumber(ARGV[1])
  local fa, ca = {unpack(ARGV, 2, n + 1)}, {unpack(ARGV, n + 2)}
  local applied = finish({KEYS[1], KEYS[2], KEYS[3]}, fa)
  return {applied, claim({KEYS[4], KEYS[5], KEYS[6], KEYS[7]}, ca)}
end
