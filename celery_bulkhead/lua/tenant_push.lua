-- Spend a tenant's token, check the queue's cap and push, in one atomic call.
--
-- The one round trip of a publish into a pool with a tenant limit, on a Redis
-- broker whose tenant state lives in the same Redis: the cap is checked first
-- (a full queue spends no token), then the tenant's bucket (GCRA, as in
-- bucket.lua), and only then is the message pushed.
--
-- KEYS[1]  the queue's base list (priority step 0), key prefix applied
-- KEYS[2]  the tenant's bucket key (its theoretical arrival time, µs)
-- ARGV[1]  the cap: ready messages allowed in the queue (all sub-lists together)
-- ARGV[2]  the suffix of the sub-list that receives the message ("" for the base list)
-- ARGV[3]  the serialized message, exactly as kombu would LPUSH it
-- ARGV[4]  the queue's x-expires in milliseconds ("0": none)
-- ARGV[5]  interval: microseconds one request costs (1 / rate)
-- ARGV[6]  burst: requests allowed at once from a full bucket
--
-- {{SUFFIXES}}: the Lua list of kombu's priority sub-list suffixes (see capped_push.lua).
--
-- Returns, as one reply (an array would cost the client more to parse than the
-- whole bucket costs the server): the depth after the push (> 0) when pushed,
-- -depth when the queue is full, and a status reply holding the µs until the
-- tenant's next token when the tenant is over its limit.
{{QUEUE_DEPTH}}
if depth >= tonumber(ARGV[1]) then
  return -depth
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[2]))
local base_tat = now
if tat ~= nil and tat > now then
  base_tat = tat
end
local new_tat = base_tat + interval
local wait = new_tat - tonumber(ARGV[6]) * interval - now
if wait > 0 then
  return redis.status_reply(string.format('%d', math.ceil(wait)))
end
redis.call('SET', KEYS[2], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
if ARGV[2] == '' then
  redis.call('LPUSH', base, ARGV[3])
else
  redis.call('LPUSH', base .. ARGV[2], ARGV[3])
end
local expires = tonumber(ARGV[4])
if expires > 0 then
  redis.call('PEXPIRE', base, expires)
  for _, suffix in ipairs(suffixes) do
    redis.call('PEXPIRE', base .. suffix, expires)
  end
end
return depth + 1
