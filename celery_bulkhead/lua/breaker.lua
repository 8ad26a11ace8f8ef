-- One step of a fleet-wide circuit breaker (celery_bulkhead/breaker/machine.py, in Lua).
--
-- Every transition is this one atomic call, on Redis server time (ms).  The
-- half-open trials are leases (SET NX PX), so at most ARGV[4] trial calls run
-- at once, however many processes reach the reset time together.
--
-- KEYS[1]  the breaker's record (a hash: state, failures, window_start, opened_at)
-- KEYS[2..] its trial leases, one key per slot (half_open_max_calls of them); same {hash tag}
-- ARGV[1]  the operation: "peek" | "acquire" | "failure" | "success" | "release"
-- ARGV[2]  reset_timeout in ms (open -> half-open)
-- ARGV[3]  fail_max (failures within the window that open the breaker)
-- ARGV[4]  half_open_max_calls (trial leases: #KEYS - 1)
-- ARGV[5]  trial lease length in ms
-- ARGV[6]  the caller's token ("" when it holds no trial)
-- ARGV[7]  the failure window in ms
-- ARGV[8]  TTL of the record in ms (refreshed on every write; a trial's lease when longer)
--
-- Returns {state or answer, wait ms, transition ("" when none)}.  acquire answers
-- "closed" or "trial" (run), "open" (not before wait ms) or "half-open" (every
-- trial is taken: look again in wait ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local reset = tonumber(ARGV[2])
local ttl = tonumber(ARGV[8])
local rec = redis.call('HMGET', KEYS[1], 'state', 'failures', 'window_start', 'opened_at')
local state = rec[1] or 'closed'
local failures = tonumber(rec[2] or '0')
local window_start = tonumber(rec[3] or '0')
local opened_at = tonumber(rec[4] or '0')
local token = ARGV[6]

local function save()
  redis.call('HSET', KEYS[1], 'state', state, 'failures', failures,
             'window_start', window_start, 'opened_at', opened_at)
  redis.call('PEXPIRE', KEYS[1], ttl)
end

local function drop_trials()
  for slot = 1, tonumber(ARGV[4]) do
    redis.call('DEL', KEYS[1 + slot])
  end
end

local function holds()
  if token == '' then
    return false
  end
  for slot = 1, tonumber(ARGV[4]) do
    if redis.call('GET', KEYS[1 + slot]) == token then
      return true
    end
  end
  return false
end

-- The state as a caller sees it (an open breaker past its reset is half-open),
-- with the ms until the next trial: what every call that changes nothing returns.
local function seen()
  if state == 'open' then
    local wait = opened_at + reset - now
    if wait > 0 then
      return {'open', wait, ''}
    end
    return {'half-open', 0, ''}
  end
  return {state, 0, ''}
end

if op == 'peek' then
  return seen()
end

if op == 'acquire' then
  local transition = ''
  if state == 'closed' then
    return {'closed', 0, ''}
  end
  if state == 'open' then
    local wait = opened_at + reset - now
    if wait > 0 then
      return {'open', wait, ''}
    end
    state = 'half-open'
    drop_trials()
    save()
    transition = 'half-open'
  end
  local soonest = -1
  for slot = 1, tonumber(ARGV[4]) do
    if redis.call('SET', KEYS[1 + slot], token, 'NX', 'PX', tonumber(ARGV[5])) then
      -- The record outlives the lease: expiring under a running trial would
      -- close the breaker on a downstream nobody has seen answer.
      redis.call('PEXPIRE', KEYS[1], math.max(ttl, tonumber(ARGV[5])))
      return {'trial', 0, transition}
    end
    local left = redis.call('PTTL', KEYS[1 + slot])
    if left >= 0 and (soonest < 0 or left < soonest) then
      soonest = left
    end
  end
  -- Every trial is taken: look again when the first lease ends, or after one
  -- reset_timeout at most (a trial usually ends long before its lease does).
  if soonest < 0 or soonest > reset then
    soonest = reset
  end
  return {'half-open', soonest, transition}
end

if op == 'failure' then
  if state == 'closed' then
    if now - window_start > tonumber(ARGV[7]) then
      failures = 0
      window_start = now
    end
    failures = failures + 1
    if failures >= tonumber(ARGV[3]) then
      state = 'open'
      opened_at = now
      failures = 0
      save()
      return {state, reset, 'open'}
    end
    save()
    return {state, 0, ''}
  end
  if state == 'half-open' and holds() then
    state = 'open'
    opened_at = now
    failures = 0
    drop_trials()
    save()
    return {state, reset, 'open'}
  end
  return seen()
end

if op == 'success' then
  if state == 'half-open' and holds() then
    state = 'closed'
    failures = 0
    window_start = now
    drop_trials()
    save()
    return {state, 0, 'closed'}
  end
  return seen()
end
if op == 'release' then
  -- A trial granted to a call that then did not run: free its slot now.
  for slot = 1, tonumber(ARGV[4]) do
    if token ~= '' and redis.call('GET', KEYS[1 + slot]) == token then
      redis.call('DEL', KEYS[1 + slot])
    end
  end
  return seen()
end
return redis.error_reply('unknown breaker operation ' .. op)
