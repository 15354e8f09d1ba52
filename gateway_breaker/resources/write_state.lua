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
-- ARGV[8]  optional SHA1 of a stored value the writer's codec rejected: that value is overwritten
--          (the codec alone decides which values are valid, so the two can never disagree)
-- KEYS[3]  history stream (capped at ARGV[9] entries, approximately)
-- ARGV[10] number of history entries that follow, 9 values each: at (ms, Redis clock), from, to,
--          cause, origin, instance, failure_count, failure_rate ('' when none), reason ('' none).
--          They are appended with the version written, only when the write is accepted.
-- Returns {1, stored_json} when written, {0, current_json} when a newer version is stored.
-- A key of another type (WRONGTYPE) holds nothing usable: SET below replaces it.
local got = redis.pcall('GET', KEYS[1])
local current = nil
if type(got) == 'string' then
  current = got
end
local expected = tonumber(ARGV[1])
local stored = nil
if current and ARGV[8] and ARGV[8] ~= '' and redis.sha1hex(current) == ARGV[8] then
  current = nil  -- rejected by the writer's codec
end
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
if version >= 9007199254740992 then
  version = 1  -- 2^53: past it a double (and the codec) loses exactness; start again
end
local body = string.sub(ARGV[2], 1, -2)
local encoded = body .. ',"version":' .. string.format('%d', version) .. '}'
redis.call('SET', KEYS[1], encoded, 'EX', tonumber(ARGV[3]))
if ARGV[6] ~= 'half_open' then
  redis.call('DEL', KEYS[2])
end
local entries = tonumber(ARGV[10] or '0') or 0
local function append(b)
  return redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', tonumber(ARGV[9]), '*',
    'at', ARGV[b + 1], 'from', ARGV[b + 2], 'to', ARGV[b + 3], 'cause', ARGV[b + 4],
    'origin', ARGV[b + 5], 'instance', ARGV[b + 6], 'version', string.format('%d', version),
    'failure_count', ARGV[b + 7], 'failure_rate', ARGV[b + 8], 'reason', ARGV[b + 9])
end
for i = 0, entries - 1 do
  local added = append(10 + i * 9)
  if type(added) == 'table' and added.err then
    -- A key of another type holds no history of ours: replace it (the state is written).
    redis.call('DEL', KEYS[3])
    append(10 + i * 9)
  end
end
if entries > 0 then
  redis.pcall('EXPIRE', KEYS[3], 604800)  -- a week after the last transition
end
redis.call('PUBLISH', ARGV[4],
  '{"origin":"' .. ARGV[7] .. '","service":"' .. ARGV[5] .. '","state":' .. encoded .. '}')
return {1, encoded}
