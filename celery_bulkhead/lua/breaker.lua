-- One step of a fleet-wide circuit breaker (celery_bulkhead/breaker/machine.py, in Lua).
--
-- Every transition is this one atomic call, on Redis server time (ms).  The
-- half-open trials are leases (SET NX PX), so at most ARGV[4] trial calls run
-- at once, however many processes reach the reset time together.
--
-- KEYS[1]  the breaker's record (a hash: state, failures, window_start, opened_at, and
--          the rate window's counts: "<bucket>:c" calls, "<bucket>:f" failures, "<bucket>:s" slow)
-- KEYS[2..] its trial leases, one key per slot (half_open_max_calls of them); same {hash tag}
-- ARGV[1]  the operation: "peek" | "acquire" | "failure" | "success" | "release" | "count"
-- ARGV[2]  reset_timeout in ms (open -> half-open)
-- ARGV[3]  fail_max (failures within the window that open the breaker)
-- ARGV[4]  half_open_max_calls (trial leases: #KEYS - 1)
-- ARGV[5]  trial lease length in ms
-- ARGV[6]  the caller's token ("" when it holds no trial)
-- ARGV[7]  the failure window in ms
-- ARGV[8]  TTL of the record in ms (refreshed on every write; a trial's lease when longer)
-- ARGV[9]  the rate window's bucket width in ms ("": no rate window)
-- ARGV[10] buckets per window (the window slides by one bucket)
-- ARGV[11] minimum_calls (calls in the window before a rate can open it)
-- ARGV[12] failure rate threshold in percent ("": no failure-rate rule)
-- ARGV[13] slow-call rate threshold in percent ("": no slow-call rule)
-- ARGV[14..16] the caller's calls, failures and slow calls not reported yet ("count", and
--          "failure" with a rate window: this failure among them)
--
-- With a rate window, "count" and "failure" add the caller's counts to the current
-- bucket of a closed breaker and open it when failures / calls >= ARGV[12] % or
-- slow / calls >= ARGV[13] % over the buckets in the window, with >= ARGV[11] calls.
-- Every transition starts with an empty window.
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

-- A transition: the record alone, without the counts of the window before it.
local function save_anew()
  redis.call('DEL', KEYS[1])
  save()
end

-- The rate window: add the caller's counts to the current bucket (dropping the
-- buckets that slid out) and say whether a rate crossed its threshold.
local function count_crossed()
  local width = tonumber(ARGV[9])
  if not width then
    return false
  end
  local current = math.floor(now / width)
  local oldest = current - tonumber(ARGV[10]) + 1
  local total = {c = 0, f = 0, s = 0}
  local stale = {}
  local flat = redis.call('HGETALL', KEYS[1])
  for i = 1, #flat, 2 do
    local bucket, kind = string.match(flat[i], '^(%d+):(%a)$')
    if bucket then
      if tonumber(bucket) < oldest then
        stale[#stale + 1] = flat[i]
      else
        total[kind] = total[kind] + tonumber(flat[i + 1])
      end
    end
  end
  if #stale > 0 then
    redis.call('HDEL', KEYS[1], unpack(stale))
  end
  local mine = {c = tonumber(ARGV[14]), f = tonumber(ARGV[15]), s = tonumber(ARGV[16])}
  if mine.c > 0 then
    for kind, n in pairs(mine) do
      if n > 0 then
        redis.call('HINCRBY', KEYS[1], string.format('%d:%s', current, kind), n)
        total[kind] = total[kind] + n
      end
    end
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  if total.c < tonumber(ARGV[11]) then
    return false
  end
  local failure_rate, slow_rate = tonumber(ARGV[12]), tonumber(ARGV[13])
  if failure_rate and total.f * 100 >= failure_rate * total.c then
    return true
  end
  return slow_rate ~= nil and total.s * 100 >= slow_rate * total.c
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

-- The transition to open: a fresh record (no window counts), and the answer.
local function open_now()
  state = 'open'
  opened_at = now
  failures = 0
  save_anew()
  return {state, reset, 'open'}
end

if op == 'failure' then
  if state == 'closed' then
    if now - window_start > tonumber(ARGV[7]) then
      failures = 0
      window_start = now
    end
    failures = failures + 1
    if failures >= tonumber(ARGV[3]) then
      return open_now()
    end
    save()
    if tonumber(ARGV[14]) > 0 and count_crossed() then
      return open_now()
    end
    return {state, 0, ''}
  end
  if state == 'half-open' and holds() then
    drop_trials()
    return open_now()
  end
  return seen()
end

if op == 'count' then
  -- Only a closed breaker counts calls: those that ran on a stale view of an
  -- open one say nothing new.
  if state == 'closed' and count_crossed() then
    return open_now()
  end
  return seen()
end

if op == 'success' then
  if state == 'half-open' and holds() then
    state = 'closed'
    failures = 0
    window_start = now
    drop_trials()
    save_anew()
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
