-- Push one message onto a kombu Redis queue only while the queue is below its cap.
--
-- The check and the push are one atomic step, so any number of concurrent
-- producers never leave more than the cap of ready messages.
--
-- KEYS[1]  the queue's base list (priority step 0), key prefix applied
-- ARGV[1]  the cap: ready messages allowed in the queue (all sub-lists together)
-- ARGV[2]  the suffix of the sub-list that receives the message ("" for the base list)
-- ARGV[3]  the serialized message, exactly as kombu would LPUSH it
-- ARGV[4]  optional: the queue's x-expires in milliseconds; every sub-list's
--          expiry is refreshed after a push, as kombu's own _put does
--
-- {{SUFFIXES}} is replaced, when the script is loaded, by the Lua list of kombu's
-- priority sub-list suffixes ("<sep><step>" for every step above 0) of the
-- transport's configuration: the sub-lists are derived from KEYS[1], which keeps
-- the call to one key to encode (kombu's Redis transport does not run on Redis
-- Cluster, where every key would have to be declared).
--
-- Returns the depth after the push (> 0) when pushed, -depth when full.
{{QUEUE_DEPTH}}
if depth >= tonumber(ARGV[1]) then
  return -depth
end
if ARGV[2] == '' then
  redis.call('LPUSH', base, ARGV[3])
else
  redis.call('LPUSH', base .. ARGV[2], ARGV[3])
end
if ARGV[4] then
  redis.call('PEXPIRE', base, ARGV[4])
  for _, suffix in ipairs(suffixes) do
    redis.call('PEXPIRE', base .. suffix, ARGV[4])
  end
end
return depth + 1
