-- Take one of the fleet's half-open probe slots for a service.
-- KEYS[1]  probe lease key: a sorted set of owner tokens scored by expiry (ms, Redis clock)
-- ARGV[1]  owner token
-- ARGV[2]  slots (half_open_max_calls)
-- ARGV[3]  lease length in ms: a prober that dies frees its slot when this runs out
-- Returns 0 when a slot was taken, else the ms until the first lease expires.
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then
  redis.call('DEL', KEYS[1])  -- absent, or a foreign value (WRONGTYPE): start afresh
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(first[2]) - now + 1)
end
local expires = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], expires, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 0
