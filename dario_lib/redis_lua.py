"""The Lua scripts of the Redis store (`redis_store.py`): every change to shared state.

Why Lua rather than MULTI/EXEC: a reservation must read the spend and the reservations
in flight and then decide, atomically. MULTI/EXEC cannot branch on what it reads (the
reads only return at EXEC), so it would need WATCH and an optimistic retry loop: at
least three round trips, and under thirty contending gateways a loop that may starve.
A script runs atomically on the server, branches, reads the server's clock (`TIME`)
and costs one round trip. Redis runs one script at a time, so every script below is
a critical section across all gateways.

Each script is PRELUDE + its body. Arguments (no KEYS: every key is built from the
namespace prefix, so this needs a standalone Redis or a Sentinel set-up, not a Cluster):

    ARGV[1]  key prefix, "<namespace>:"
    ARGV[2]  clock offset in ms added to TIME: always 0 outside tests (Redis's clock
             cannot be moved; tests move the team's clock forward through this seam)
    ARGV[3]  the calling gateway's id (events carry it)
    ARGV[4…] the script's own, listed above each body

Keys under the prefix:
    marker                string  random per Redis "life"; its loss means lost state
    lost                  set     markers whose loss was already turned into a halt
    halts                 hash    "*" or account label -> halt JSON
    levels                hash    JSON [key, metric] -> "warn" | "halt" (threshold crossings)
    reservations          hash    id -> "<micro-dollars>|<account>"
    xreservations         hash    "<id>#x" -> "<micro-dollars>|<cap scope>": holds against the extra-usage cap
    expiry                zset    id (and "<id>#x") scored by its expiry (server ms)
    reserved              hash    scope -> micro-dollars in flight
    spend:<scope>         hash    minute number -> micro-dollars settled in that minute
    minutes:<scope>       zset    the same minute numbers, scored by themselves (range scans)
    total:<scope>:<win>   hash    {from: first minute counted, sum: micro-dollars since}
    totals:<scope>        set     windows with a running total for this scope
    settled:<id>          string  a reservation already settled (kept for an hour)
    extra                 hash    cap scope -> "1" while its last answer was served from extra usage
    xscopes               set     cap scopes with extra-usage spend or holds (for status)
    events                channel JSON {gateway, type, data}

<scope> is "*" (all traffic) or "a:<account label>"; the extra-usage cap's scopes are the
same with "x:" in front ("x:*", "x:a:<label>"): spend of answers served from extra usage
only, next to (not instead of) their spend in the plain scopes. Amounts are integer micro-dollars,
exact in Lua's doubles up to 2^53. Numbers handed back to redis.call go through int()
(Lua would otherwise format large ones as 1e+14).
"""

PRELUDE = r"""
local P = ARGV[1]
local gateway = ARGV[3]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) + tonumber(ARGV[2])
local MINUTE = 60000
local KEEP = 91 * 86400000          -- spend older than the longest window (90 days) is dropped
local CHUNK = 1000                  -- arguments per HMGET/HDEL: unpack() has a limit

local function int(x) return string.format('%.0f', x) end

local function publish(kind, data_json)
  redis.call('PUBLISH', P .. 'events',
    '{"gateway":' .. cjson.encode(gateway) .. ',"type":"' .. kind .. '","data":' .. data_json .. '}')
end

local function expired(halt_json)
  local until_ms = cjson.decode(halt_json).cooldownUntil
  return type(until_ms) == 'number' and until_ms <= now
end

local function remove_halt(key, halt_json, reason)
  redis.call('HDEL', P .. 'halts', key)
  local h = cjson.decode(halt_json)
  publish('overage_resume', cjson.encode({reason = reason, previousSince = h.since, resumedAt = now,
    account = h.account, previousReason = h.reason, id = h.id}))
end

local function unreserve(field, micro)
  if redis.call('HINCRBY', P .. 'reserved', field, -micro) <= 0 then
    redis.call('HDEL', P .. 'reserved', field)
  end
end

local function release(id)
  redis.call('ZREM', P .. 'expiry', id)
  local entry = redis.call('HGET', P .. 'reservations', id)
  if entry then
    redis.call('HDEL', P .. 'reservations', id)
    local bar = string.find(entry, '|', 1, true)
    local micro = tonumber(string.sub(entry, 1, bar - 1))
    unreserve('*', micro)
    unreserve('a:' .. string.sub(entry, bar + 1), micro)
    return true
  end
  entry = redis.call('HGET', P .. 'xreservations', id)      -- a hold against the extra-usage cap
  if not entry then return false end
  redis.call('HDEL', P .. 'xreservations', id)
  local bar = string.find(entry, '|', 1, true)
  unreserve(string.sub(entry, bar + 1), tonumber(string.sub(entry, 1, bar - 1)))
  return true
end

local function is_cap(scope) return string.sub(scope, 1, 2) == 'x:' end

local function prune_reservations()
  local ids = redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', int(now), 'LIMIT', 0, 500)
  for _, id in ipairs(ids) do release(id) end
end

local function amounts(scope, minutes, i)
  return redis.call('HMGET', P .. 'spend:' .. scope, unpack(minutes, i, math.min(i + CHUNK - 1, #minutes)))
end

local function minutes_sum(scope, lo, hi)
  local minutes = redis.call('ZRANGEBYSCORE', P .. 'minutes:' .. scope, lo, hi)
  local sum = 0
  for i = 1, #minutes, CHUNK do
    for _, amount in ipairs(amounts(scope, minutes, i)) do sum = sum + (tonumber(amount) or 0) end
  end
  return sum
end

-- Spend in the window: a running total, caught up lazily. Minutes that aged out since the
-- last look are subtracted (a few per call), so a 90-day window is not re-summed per
-- request. A missing total (new budget) or one older than the kept spend is rebuilt.
local function spent(scope, window)
  local key = P .. 'total:' .. scope .. ':' .. window
  local cutoff = math.floor((now - window) / MINUTE)        -- the oldest minute counted
  local kept = redis.call('HMGET', key, 'from', 'sum')
  local from, sum = tonumber(kept[1]), tonumber(kept[2])
  if not from or not sum or from < math.floor((now - KEEP) / MINUTE) then
    sum = minutes_sum(scope, cutoff, '+inf')
    redis.call('HSET', key, 'from', cutoff, 'sum', int(sum))
    redis.call('SADD', P .. 'totals:' .. scope, window)
  elseif from < cutoff then
    sum = sum - minutes_sum(scope, from, cutoff - 1)
    redis.call('HSET', key, 'from', cutoff, 'sum', int(sum))
  end
  return sum
end

-- When enough of the oldest spend will have aged out to be under the limit (ms), or 0.
local function roll(scope, window, limit, sum)
  local minutes = redis.call('ZRANGEBYSCORE', P .. 'minutes:' .. scope, math.floor((now - window) / MINUTE), '+inf')
  for i = 1, #minutes, CHUNK do
    local found = amounts(scope, minutes, i)
    for j = 1, #found do
      sum = sum - (tonumber(found[j]) or 0)
      if sum < limit then return (tonumber(minutes[i + j - 1]) + 1) * MINUTE + window end
    end
  end
  return 0
end

local function add_spend(scope, minute, micro)
  local series, minutes = P .. 'spend:' .. scope, P .. 'minutes:' .. scope
  redis.call('HINCRBY', series, minute, micro)
  redis.call('ZADD', minutes, minute, minute)
  local old = redis.call('ZRANGEBYSCORE', minutes, '-inf', '(' .. math.floor((now - KEEP) / MINUTE),
                         'LIMIT', 0, CHUNK)
  if #old > 0 then
    redis.call('HDEL', series, unpack(old))
    redis.call('ZREM', minutes, unpack(old))
  end
  redis.call('PEXPIRE', series, KEEP)
  redis.call('PEXPIRE', minutes, KEEP)
  for _, window in ipairs(redis.call('SMEMBERS', P .. 'totals:' .. scope)) do
    local key = P .. 'total:' .. scope .. ':' .. window
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'sum', micro)
    else
      redis.call('SREM', P .. 'totals:' .. scope, window)
    end
  end
end

-- Appends spent, reserved and roll time for each budget (from ARGV[first], four arguments
-- each: scope, window ms, limit micro-dollars, crossing field).
local function report(out, first)
  for i = first, #ARGV, 4 do
    local scope, window, limit = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    local sum = spent(scope, window)
    out[#out + 1] = sum
    out[#out + 1] = tonumber(redis.call('HGET', P .. 'reserved', scope)) or 0
    out[#out + 1] = sum >= limit and roll(scope, window, limit, sum) or 0
  end
  return out
end
"""

# ARGV[4] marker this gateway knows ("" if none), [5] account ("" if none),
# [6] reservation id ("" for none), [7] micro-dollars, [8] ttl ms,
# [9…] budgets, four arguments each: scope, window ms, limit micro-dollars, and the field in
# `levels` of the budget's crossing ("" for none). A cap scope ("x:…", at most one) is the
# extra-usage cap: held (as "<id>#x", settled apart by CAP_SETTLE) only while its scope is
# in extra usage (`extra`).
# Returns {lost, now, marker, status, refused budget (1-based, 0 none), spent, reserved,
#          plain held (0/1), cap held (0/1), cap scope in extra usage (0/1, -1 no cap asked),
#          n, n halts this call cleared (their cooldown had passed), the blocking halts…}
GATE = PRELUDE + r"""
local known, account, id = ARGV[4], ARGV[5], ARGV[6]
local lost = 0
local marker = redis.call('GET', P .. 'marker')
if not marker then
  marker = gateway .. '/' .. clock[1] .. '.' .. clock[2]
  redis.call('SET', P .. 'marker', marker)
end
-- A marker this gateway knew is gone: Redis lost its state (a restart without persistence,
-- a flush, a failover to an empty replica). Halt the team once per loss: `lost` remembers
-- the markers whose loss is already a halt, so gateways that knew the same one follow.
if known ~= '' and marker ~= known and redis.call('SISMEMBER', P .. 'lost', known) == 0 then
  lost = 1
  redis.call('SADD', P .. 'lost', known)
  local halt = cjson.encode({since = now, cooldownUntil = cjson.null, reason = 'store_state_lost',
    request = {}, account = cjson.null, detail = {}, id = gateway .. '/' .. clock[1] .. '.' .. clock[2],
    gateway = gateway})
  if redis.call('HSETNX', P .. 'halts', '*', halt) == 1 then publish('overage_halt', halt) end
end

local blocking, cleared = {}, {}
local keys = {'*'}
if account ~= '' and account ~= '*' then keys[2] = account end
for _, key in ipairs(keys) do
  local halt = redis.call('HGET', P .. 'halts', key)
  if halt then
    if expired(halt) then
      remove_halt(key, halt, 'cooldown')
      cleared[#cleared + 1] = halt
    else
      blocking[#blocking + 1] = halt
    end
  end
end

-- A plain reservation unless only the cap was asked (none applied: still one, as before).
local mode, plain, cap = -1, true, false
for i = 9, #ARGV, 4 do
  if is_cap(ARGV[i]) then
    mode = redis.call('HGET', P .. 'extra', ARGV[i]) == '1' and 1 or 0
    if mode == 1 then cap = ARGV[i] end
    plain = #ARGV > 12
  end
end

local status, refused, at_spent, at_reserved, held_plain, held_cap = 'ok', 0, 0, 0, 0, 0
if #blocking > 0 then
  status = 'halted'
elseif id ~= '' then
  prune_reservations()
  local capid = id .. '#x'
  if redis.call('HEXISTS', P .. 'reservations', id) == 1 or redis.call('HEXISTS', P .. 'xreservations', capid) == 1 then
    status = 'reserved'                     -- the same call, retried
    held_plain = redis.call('HEXISTS', P .. 'reservations', id)
    held_cap = redis.call('HEXISTS', P .. 'xreservations', capid)
  else
    for i = 9, #ARGV, 4 do
      local scope, limit, field = ARGV[i], tonumber(ARGV[i + 2]), ARGV[i + 3]
      if not is_cap(scope) or scope == cap then
        local sum = spent(scope, tonumber(ARGV[i + 1]))
        local held = tonumber(redis.call('HGET', P .. 'reserved', scope)) or 0
        -- As budgets.Budgets.reserve: refused while reservations in flight fill the budget.
        -- Past the limit the guard's halt decides (and a person may have resumed it), but
        -- only once the crossing is recorded: between the settle that crossed and the
        -- cross() that halts, another gateway must not slip a request through.
        if (sum < limit and limit <= sum + held) or (sum >= limit and field ~= ''
            and redis.call('HGET', P .. 'levels', field) ~= 'halt') then
          status, refused, at_spent, at_reserved = 'refused', (i - 5) / 4, sum, held
          break
        end
      end
    end
    if status == 'ok' and plain then
      redis.call('HSET', P .. 'reservations', id, ARGV[7] .. '|' .. account)
      redis.call('ZADD', P .. 'expiry', int(now + tonumber(ARGV[8])), id)
      redis.call('HINCRBY', P .. 'reserved', '*', ARGV[7])
      redis.call('HINCRBY', P .. 'reserved', 'a:' .. account, ARGV[7])
      status, held_plain = 'reserved', 1
    end
    if status ~= 'refused' and cap then
      redis.call('HSET', P .. 'xreservations', capid, ARGV[7] .. '|' .. cap)
      redis.call('ZADD', P .. 'expiry', int(now + tonumber(ARGV[8])), capid)
      redis.call('HINCRBY', P .. 'reserved', cap, ARGV[7])
      redis.call('SADD', P .. 'xscopes', cap)
      status, held_cap = 'reserved', 1
    end
  end
end
local out = {lost, now, marker, status, refused, at_spent, at_reserved, held_plain, held_cap, mode, #cleared}
for _, halt in ipairs(cleared) do out[#out + 1] = halt end
for _, halt in ipairs(blocking) do out[#out + 1] = halt end
return out
"""

# ARGV[4] reservation id, [5] account, [6] micro-dollars, [7] how long to remember the id (ms),
# [8…] budgets to report, four arguments each (as GATE's). Returns {counted, was reserved, now, (spent, reserved, roll)…}
SETTLE = PRELUDE + r"""
local id, account, micro = ARGV[4], ARGV[5], tonumber(ARGV[6])
local counted, held = 0, 0
if redis.call('SET', P .. 'settled:' .. id, '1', 'NX', 'PX', ARGV[7]) then
  counted = 1
  if release(id) then held = 1 end
  -- Counted even when the reservation expired meanwhile: the cost was incurred.
  if micro > 0 then
    local minute = math.floor(now / MINUTE)
    add_spend('*', minute, ARGV[6])
    add_spend('a:' .. account, minute, ARGV[6])
  end
end
prune_reservations()
return report({counted, held, now}, 8)
"""

# ARGV[4] the cap hold's id ("<reservation id>#x"), [5] account, [6] micro-dollars of extra
# usage (0: the answer was not served from extra usage: only the hold is released),
# [7] how long to remember the id (ms), [8…11] the cap, four arguments (as GATE's budgets).
# Idempotent per id, as SETTLE. Spend goes to "x:*" and "x:a:<account>" whatever the scope,
# so a change of scope finds it. Returns {counted, was held, now, spent, reserved, roll}.
CAP_SETTLE = PRELUDE + r"""
local id, account, micro = ARGV[4], ARGV[5], tonumber(ARGV[6])
local counted, held = 0, 0
if redis.call('SET', P .. 'settled:' .. id, '1', 'NX', 'PX', ARGV[7]) then
  counted = 1
  if release(id) then held = 1 end
  if micro > 0 then
    local minute = math.floor(now / MINUTE)
    add_spend('x:*', minute, ARGV[6])
    add_spend('x:a:' .. account, minute, ARGV[6])
    redis.call('SADD', P .. 'xscopes', 'x:*', 'x:a:' .. account)
  end
end
prune_reservations()
return report({counted, held, now}, 8)
"""

# ARGV[4] cap scope, [5] "1": its answers are now served from extra usage, "0": from the
# subscription, [6] the cap's crossing field in `levels`. Back on the subscription, a cap
# crossing recorded as "halt" is lowered to "warn": going back into extra usage while the
# window's spend is still at the cap then halts again (see guard.py). Returns the previous
# mode ("1" or "0").
EXTRA_MODE = PRELUDE + r"""
local previous = redis.call('HGET', P .. 'extra', ARGV[4]) or '0'
if ARGV[5] == '1' then
  if previous ~= '1' then redis.call('HSET', P .. 'extra', ARGV[4], '1') end
elseif previous == '1' then
  redis.call('HDEL', P .. 'extra', ARGV[4])
  if redis.call('HGET', P .. 'levels', ARGV[6]) == 'halt' then
    redis.call('HSET', P .. 'levels', ARGV[6], 'warn')
  end
end
return previous
"""

# ARGV[4] window ms, [5] "account" (every account's cap) or "proxy" (the one of all traffic).
# Returns {now, (scope, spent, reserved, in extra usage 0/1)…}. Account scopes with nothing
# spent in the window, nothing held and not in extra usage are forgotten.
CAP_STATUS = PRELUDE + r"""
prune_reservations()
local window = tonumber(ARGV[4])
local scopes = {'x:*'}
if ARGV[5] == 'account' then
  scopes = {}
  for _, scope in ipairs(redis.call('SMEMBERS', P .. 'xscopes')) do
    if scope ~= 'x:*' then scopes[#scopes + 1] = scope end
  end
  table.sort(scopes)
end
local out = {now}
for _, scope in ipairs(scopes) do
  local sum = spent(scope, window)
  local held = tonumber(redis.call('HGET', P .. 'reserved', scope)) or 0
  local mode = redis.call('HGET', P .. 'extra', scope) == '1' and 1 or 0
  if ARGV[5] == 'account' and sum == 0 and held == 0 and mode == 0 then
    redis.call('SREM', P .. 'xscopes', scope)
  else
    out[#out + 1] = scope
    out[#out + 1] = sum
    out[#out + 1] = held
    out[#out + 1] = mode
  end
end
return out
"""

# ARGV[4…] budgets, four arguments each (as GATE's). Returns {now, (spent, reserved, roll)…}
SPENT = PRELUDE + r"""
prune_reservations()
return report({now}, 4)
"""

# ARGV[4] ttl ms, [5…] reservation ids. Returns the ids no longer held (expired or settled).
REFRESH = PRELUDE + r"""
prune_reservations()
local missing = {}
local until_ms = int(now + tonumber(ARGV[4]))
for i = 5, #ARGV do
  if redis.call('HEXISTS', P .. 'reservations', ARGV[i]) == 1
      or redis.call('HEXISTS', P .. 'xreservations', ARGV[i]) == 1 then
    redis.call('ZADD', P .. 'expiry', 'XX', until_ms, ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
return missing
"""

# ARGV[4] halt key, [5] halt JSON. Sets it only if absent (an expired one is cleared first).
# Returns {1 or 0, the halt now in place}.
PUT_HALT = PRELUDE + r"""
local current = redis.call('HGET', P .. 'halts', ARGV[4])
if current and expired(current) then
  remove_halt(ARGV[4], current, 'cooldown')
  current = false
end
if current then return {0, current} end
redis.call('HSET', P .. 'halts', ARGV[4], ARGV[5])
publish('overage_halt', ARGV[5])
return {1, ARGV[5]}
"""

# ARGV[4] halt key ("" for every halt), [5] expected halt id ("" for any), [6] reason.
# Returns {now, removed halt JSON…}; publishes one resume event per removed halt, none otherwise.
CLEAR_HALT = PRELUDE + r"""
local found = {}
if ARGV[4] == '' then
  found = redis.call('HGETALL', P .. 'halts')
else
  local halt = redis.call('HGET', P .. 'halts', ARGV[4])
  if halt then found = {ARGV[4], halt} end
end
local out = {now}
for i = 1, #found, 2 do
  if ARGV[5] == '' or cjson.decode(found[i + 1]).id == ARGV[5] then
    remove_halt(found[i], found[i + 1], ARGV[6])
    out[#out + 1] = found[i + 1]
  end
end
return out
"""

# ARGV[4…] crossings, four arguments each: field (JSON [key, metric]), level ("" for none),
# halt key, halt JSON ("" for none): the halt is set, with the level, when the level rises to
# "halt" and no halt is in place. One call records every crossing a response or a settle saw.
# Returns {previous level or nil, the halt set or nil} for each crossing, in order.
CROSS = PRELUDE + r"""
local rank = {warn = 1, halt = 2}
local out = {}
for i = 4, #ARGV, 4 do
  local field, level, key, halt = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local previous = redis.call('HGET', P .. 'levels', field)
  if level == '' then
    if previous then redis.call('HDEL', P .. 'levels', field) end
  elseif previous ~= level then
    redis.call('HSET', P .. 'levels', field, level)
  end
  local created = false
  if halt ~= '' and level == 'halt' and (rank[previous] or 0) < 2 then
    local current = redis.call('HGET', P .. 'halts', key)
    if current and expired(current) then
      remove_halt(key, current, 'cooldown')
      current = false
    end
    if not current then
      redis.call('HSET', P .. 'halts', key, halt)
      publish('overage_halt', halt)
      created = halt
    end
  end
  out[#out + 1] = previous
  out[#out + 1] = created
end
return out
"""
