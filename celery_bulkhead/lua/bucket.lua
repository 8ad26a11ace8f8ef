-- One request against a tenant's token bucket (GCRA), fleet-wide.
--
-- The same algorithm as celery_bulkhead/tenants/bucket.py, in microseconds of
-- Redis server time (TIME), so every producer and worker agrees whatever its
-- own clock says.
--
-- KEYS[1]  the bucket's key: the tenant's theoretical arrival time (µs)
-- ARGV[1]  interval: microseconds one request costs (1 / rate)
-- ARGV[2]  burst: requests allowed at once from a full bucket
-- ARGV[3]  horizon: microseconds a request may be reserved ahead (0: never)
--
-- Returns one integer (cheaper for the client to read than an array): the µs
-- to wait when allowed (0: now; > 0: reserved until its slot), or -retry_after
-- in µs (< 0) when refused.  The key expires when the bucket is full again, so
-- an idle tenant leaves nothing behind.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]))
local base = now
if tat ~= nil and tat > now then
  base = tat
end
local new_tat = base + interval
local wait = new_tat - burst * interval - now
if wait <= 0 or wait <= horizon then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
  if wait < 0 then
    wait = 0
  end
  return math.ceil(wait)
end
return -math.ceil(wait)
