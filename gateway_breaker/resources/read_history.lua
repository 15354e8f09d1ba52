-- A service's newest history entries, each field cut to a bounded length, so that whatever was
-- planted in the stream (a value of megabytes) never crosses the wire whole.
-- KEYS[1]  history stream
-- ARGV[1]  entries to return, newest first
-- ARGV[2]  longest field value returned; a longer one comes back one byte longer than this
--          (cut), so the reader can tell it was too long and leave the entry out
-- A key of another type holds no history of ours: an empty history.
local entries = redis.pcall('XREVRANGE', KEYS[1], '+', '-', 'COUNT', tonumber(ARGV[1]))
if type(entries) ~= 'table' or entries.err then
  return {}
end
local limit = tonumber(ARGV[2])
for _, entry in ipairs(entries) do
  local fields = entry[2]
  for i = 1, #fields do
    if #fields[i] > limit then
      fields[i] = string.sub(fields[i], 1, limit + 1)
    end
  end
end
return entries
