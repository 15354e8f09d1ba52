-- Compare-and-set of one service's breaker state, announced to the fleet.
-- KEYS[1]  state key
-- KEYS[2]  probe lease key (cleared when the breaker opens or closes: a new period starts)
-- ARGV[1]  version the writer last agreed with
-- ARGV[2]  the new state as a JSON object, without "version" (this script appends it)
-- ARGV[3]  TTL in seconds
-- ARGV[4]  channel to announce the stored state on
-- ARGV[5]  service name (service names are validated: no quotes or backslashes)
-- ARGV[6]  the new state's name
-- ARGV[7]  writer's instance id (an instance ignores its own announcements)
-- KEYS[3]  history stream (capped at ARGV[8] entries, approximately)
-- ARGV[9]  number of history entries that follow, 9 values each: at (ms, Redis clock), from, to,
--          cause, origin, instance, failure_count, failure_rate ('' when none), reason ('' none).
--          They are appended with the version written, only when the write is accepted.
-- Returns {1, stored_json} when written, {0, current_json} when a newer version is stored.
local current = redis.call('GET', KEYS[1])
local expected = tonumber(ARGV[1])
local stored = nil
if current then
  local ok, doc = pcall(cjson.decode, current)
  -- Only a well-formed state's version counts; anything else is overwritten.
  if ok and type(doc) == 'table'
      and (doc['state'] == 'closed' or doc['state'] == 'open' or doc['state'] == 'half_open') then
    stored = tonumber(doc['version'])
  end
end
if stored ~= nil and stored > expected then
  return {0, current}
end
local version = math.max(expected, stored or 0) + 1
local body = string.sub(ARGV[2], 1, -2)
local encoded = body .. ',"version":' .. string.format('%d', version) .. '}'
redis.call('SET', KEYS[1], encoded, 'EX', tonumber(ARGV[3]))
if ARGV[6] ~= 'half_open' then
  redis.call('DEL', KEYS[2])
end
local entries = tonumber(ARGV[9] or '0') or 0
for i = 0, entries - 1 do
  local b = 9 + i * 9
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', tonumber(ARGV[8]), '*',
    'at', ARGV[b + 1], 'from', ARGV[b + 2], 'to', ARGV[b + 3], 'cause', ARGV[b + 4],
    'origin', ARGV[b + 5], 'instance', ARGV[b + 6], 'version', string.format('%d', version),
    'failure_count', ARGV[b + 7], 'failure_rate', ARGV[b + 8], 'reason', ARGV[b + 9])
end
if entries > 0 then
  redis.call('EXPIRE', KEYS[3], 604800)  -- a week after the last transition
end
redis.call('PUBLISH', ARGV[4],
  '{"origin":"' .. ARGV[7] .. '","service":"' .. ARGV[5] .. '","state":' .. encoded .. '}')
return {1, encoded}
