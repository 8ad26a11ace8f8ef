-- Take (or renew) one of a tenant's in-flight slots: a crash-safe lease.
--
-- Leases are members of a sorted set scored by their expiry (ms, Redis TIME):
-- a worker killed with kill -9 never releases its lease, and the slot comes
-- back when the lease expires.  A task renews its own lease (same member).
--
-- KEYS[1]  the tenant's lease set
-- ARGV[1]  the lease's member (the task id)
-- ARGV[2]  max_inflight: leases allowed at once
-- ARGV[3]  lease length in milliseconds
--
-- Returns {1, 0} when the lease is held, {0, ms until the earliest lease expires}
-- when every slot is taken.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
    and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(first[2]) - now}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return {1, 0}
