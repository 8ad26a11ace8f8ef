-- Push one message onto a kombu Redis queue only while the queue is below its cap.
--
-- The check and the push are one atomic step, so any number of concurrent
-- producers never leave more than the cap of ready messages.
--
-- KEYS[1..n]  every priority sub-list of the queue (kombu stores priority p in
--             "<queue><sep><step>", step 0 in "<queue>"), with the key prefix applied
-- ARGV[1]     the cap: ready messages allowed in the queue (all sub-lists together)
-- ARGV[2]     the index in KEYS of the sub-list that receives the message
-- ARGV[3]     the serialized message, exactly as kombu would LPUSH it
--
-- Returns {1, depth after the push} when pushed, {0, depth} when full.
local depth = 0
for i = 1, #KEYS do
  depth = depth + redis.call('LLEN', KEYS[i])
end
if depth >= tonumber(ARGV[1]) then
  return {0, depth}
end
redis.call('LPUSH', KEYS[tonumber(ARGV[2])], ARGV[3])
return {1, depth + 1}
