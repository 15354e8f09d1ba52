-- One instance's counts for the fleet's decision, and the decision, in one atomic step.
-- KEYS[1]  state key
-- KEYS[2]  probe lease key (cleared when the fleet opens: a new period starts)
-- KEYS[3]  history stream (capped at ARGV[15] entries, approximately)
-- KEYS[4]  evidence hash: field = instance id, value = "run,calls,failures,ts_ms" (Redis clock);
--          field "_v" = version of the closed state the evidence belongs to: any transition
--          (written by this script or by write_state.lua) starts the evidence over;
--          field "_n" = set while some instance's counts hold failures (the fleet was told)
-- ARGV[1]  instance id (the evidence field, and the history entry's instance)
-- ARGV[2]  its run of consecutive failures since its last success
-- ARGV[3]  calls in its rolling window
-- ARGV[4]  failures in its rolling window
-- ARGV[5]  window length in ms: contributions older than this are dropped (dead instances)
-- ARGV[6]  failure_threshold
-- ARGV[7]  min_calls
-- ARGV[8]  error_rate_threshold
-- ARGV[9]  quorum: distinct instances with failures needed before the fleet opens
-- ARGV[10] version the instance last agreed with
-- ARGV[11] TTL of the state key in seconds
-- ARGV[12] channel to announce the stored state on
-- ARGV[13] service name (service names are validated: no quotes or backslashes)
-- ARGV[14] announcing instance (an instance ignores its own announcements)
-- ARGV[15] history stream length
-- ARGV[16] optional SHA1 of a stored state the caller's codec rejected: that value counts as
--          absent and is overwritten when the fleet opens (write_state.lua's rule, ARGV[8])
-- While some instance's counts hold failures, every instance that has calls sends them too
-- (healthy ones hear of it from the notice published when the first failures arrive), so the
-- fleet's window holds every live instance's calls and successes.
-- Returns {code, text, fleet run, fleet calls, fleet failures, failing instances}:
--   1, stored JSON: the fleet opened now (written as write_state.lua writes a transition)
--   0, current JSON: the stored state is newer or not closed; the counts were not recorded
--   2, cause: the rule holds on this instance's own counts but the quorum is not met
--   3, '': counted; the fleet stays closed
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expected = tonumber(ARGV[10])

-- A key of another type (WRONGTYPE) holds nothing usable, as in write_state.lua.
local got = redis.pcall('GET', KEYS[1])
local current = nil
if type(got) == 'string' then
  current = got
end
local stored = nil
if current and ARGV[16] and ARGV[16] ~= '' and redis.sha1hex(current) == ARGV[16] then
  current = nil  -- rejected by the caller's codec
end
if current then
  local ok, doc = pcall(cjson.decode, current)
  -- Only a well-formed state counts (as in write_state.lua); anything else is overwritten.
  if ok and type(doc) == 'table'
      and (doc['state'] == 'closed' or doc['state'] == 'open' or doc['state'] == 'half_open') then
    stored = tonumber(doc['version']) or 0
    local manual = doc['manual']
    if stored > expected or doc['state'] ~= 'closed'
        or (manual ~= nil and manual ~= cjson.null) then
      return {0, current, 0, 0, 0, 0}
    end
  end
end

local me = ARGV[1]
local run, calls, failures = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local period = string.format('%d', stored or 0)
local seen = redis.pcall('HGET', KEYS[4], '_v')
if type(seen) == 'table' and seen.err then
  redis.call('DEL', KEYS[4])  -- not a hash of ours: replace it
  seen = false
end
if seen ~= period then
  redis.call('DEL', KEYS[4])  -- counts of an earlier closed period: they decided already
end
if run > 0 or failures > 0 or calls > 0 then
  redis.call('HSET', KEYS[4], me, string.format('%d,%d,%d,%d', run, calls, failures, now),
    '_v', period)
  redis.call('PEXPIRE', KEYS[4], window)
else
  redis.call('HDEL', KEYS[4], me)  -- nothing of ours is evidence any more
end

local fleet_run, fleet_calls, fleet_failures, failing = 0, 0, 0, 0
local entries = redis.call('HGETALL', KEYS[4])
for i = 1, #entries, 2 do
  -- Counts of at most 12 digits (no instance sees a trillion calls in one window), a time of
  -- 13 digits at most and not from the future: anything else was not written by an instance.
  local r, c, f, ts = string.match(entries[i + 1], '^(%d+),(%d+),(%d+),(%d+)$')
  if r ~= nil and (#r > 12 or #c > 12 or #f > 12 or #ts > 13) then
    r = nil
  end
  if entries[i] == '_v' or entries[i] == '_n' then
    r = nil  -- the period's version, or the notice flag: not a contribution
  elseif r == nil or now - tonumber(ts) > window or tonumber(ts) > now + 1000 then
    redis.call('HDEL', KEYS[4], entries[i])  -- stale (its instance died), future or not ours
  else
    r, c, f = tonumber(r), tonumber(c), tonumber(f)
    fleet_run = fleet_run + r
    fleet_calls = fleet_calls + c
    fleet_failures = fleet_failures + f
    if r > 0 or f > 0 then
      failing = failing + 1
    end
  end
end

-- The first failures of a period: tell every instance, so that those without failures send
-- their calls too (a hint on the announcement channel, like a policy notice).
if failing > 0 then
  if not redis.call('HGET', KEYS[4], '_n') then
    redis.call('HSET', KEYS[4], '_n', '1')
    redis.call('PUBLISH', ARGV[12],
      '{"kind":"evidence","origin":"' .. ARGV[14] .. '","service":"' .. ARGV[13] .. '"}')
  end
else
  redis.call('HDEL', KEYS[4], '_n')  -- nothing fails any more: the next failures tell again
end

local threshold, min_calls = tonumber(ARGV[6]), tonumber(ARGV[7])
local rate, quorum = tonumber(ARGV[8]), tonumber(ARGV[9])
local function rule(r, c, f)
  if r >= threshold then
    return 'failure_threshold'
  end
  if c >= min_calls and f > 0 and f >= rate * c then
    return 'error_rate'
  end
  return nil
end
local cause = rule(fleet_run, fleet_calls, fleet_failures)
if cause == nil or failing < quorum then
  local own = rule(run, calls, failures)
  if own ~= nil then
    return {2, own, fleet_run, fleet_calls, fleet_failures, failing}
  end
  return {3, '', fleet_run, fleet_calls, fleet_failures, failing}
end

-- The fleet opens. The block below writes a transition exactly as write_state.lua does:
-- version bump over the stored one, SET with TTL, DEL of the probe lease, XADD to the
-- history, PUBLISH of the stored state.
local version = math.max(expected, stored or 0) + 1
if version >= 9007199254740992 then
  version = 1  -- 2^53, as in write_state.lua
end
local seconds = math.floor(now / 1000)
local encoded = '{"state":"open","failure_count":' .. string.format('%d', fleet_run)
  .. ',"success_count":0,"last_failure_time":' .. string.format('%d', seconds)
  .. ',"opened_at":' .. string.format('%d', seconds)
  .. ',"opened_at_ms":' .. string.format('%d', now)
  .. ',"cause":"' .. cause .. '","version":' .. string.format('%d', version) .. '}'
redis.call('SET', KEYS[1], encoded, 'EX', tonumber(ARGV[11]))
redis.call('DEL', KEYS[2])
local failure_rate = ''
if fleet_calls > 0 then
  failure_rate = string.format('%.4f', fleet_failures / fleet_calls)
end
local function append()
  return redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', tonumber(ARGV[15]), '*',
    'at', string.format('%d', now), 'from', 'closed', 'to', 'open', 'cause', cause,
    'origin', 'local', 'instance', me, 'version', string.format('%d', version),
    'failure_count', string.format('%d', fleet_run), 'failure_rate', failure_rate, 'reason', '')
end
local added = append()
if type(added) == 'table' and added.err then
  redis.call('DEL', KEYS[3])  -- not a stream of ours: replace it (the state is written)
  append()
end
redis.pcall('EXPIRE', KEYS[3], 604800)  -- a week after the last transition
redis.call('DEL', KEYS[4])  -- the fleet's evidence starts over with the next closed period
redis.call('PUBLISH', ARGV[12],
  '{"origin":"' .. ARGV[14] .. '","service":"' .. ARGV[13] .. '","state":' .. encoded .. '}')
return {1, encoded, fleet_run, fleet_calls, fleet_failures, failing}
