-- A fragment, not a script: pasted into capped_push.lua and tenant_push.lua
-- (in place of their QUEUE_DEPTH placeholder) when they are loaded.  It sets
-- `base` (KEYS[1], the queue's base list) and `depth` (ready messages in the
-- base list and in every priority sub-list of kombu's suffixes).
local base = KEYS[1]
local suffixes = {{SUFFIXES}}
local depth = redis.call('LLEN', base)
-- The sub-lists exist only once a message with a priority was sent: one EXISTS
-- for all of them is cheaper than an LLEN of each.
local subs = {}
for i, suffix in ipairs(suffixes) do
  subs[i] = base .. suffix
end
if #subs > 0 and redis.call('EXISTS', unpack(subs)) > 0 then
  for _, key in ipairs(subs) do
    depth = depth + redis.call('LLEN', key)
  end
end
