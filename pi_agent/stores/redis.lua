-- The rules of MemoryStore (pi_agent/memory.py), in Lua, for the Redis store (redis.py):
-- Redis runs a script atomically, so a finished turn, a forget, a sweep, a request's
-- limits, a cancel and the claims' renewal are each one step for every gateway.
-- ARGV[1] is the key prefix, ARGV[2..9] the clock and the bounds, ARGV[10] the mode; each
-- mode reads its own arguments after those.
local P = ARGV[1]
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_turns, keep_on_drop = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_conversations, max_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_per_key, local_id = tonumber(ARGV[8]), ARGV[9]
local mode = ARGV[10]

local function size_of(item)
  return tonumber(string.match(item, '^(%d+)|'))
end

local function count(cid, owner, size)
  redis.call('HINCRBY', P .. 'conv:' .. cid, 'bytes', size)
  redis.call('HINCRBY', P .. 'owner_bytes', owner, size)
  redis.call('INCRBY', P .. 'bytes', size)
end

local function remove(cid)
  local conv = P .. 'conv:' .. cid
  local owner = redis.call('HGET', conv, 'owner')
  redis.call('ZREM', P .. 'by_use', cid)
  redis.call('ZREM', P .. 'by_idle', cid)
  if not owner then
    redis.call('DEL', conv, P .. 'turns:' .. cid)
    return 0
  end
  local size = tonumber(redis.call('HGET', conv, 'bytes'))
  redis.call('DEL', conv, P .. 'turns:' .. cid)
  redis.call('ZREM', P .. 'owned:' .. owner, cid)
  redis.call('DECRBY', P .. 'bytes', size)
  if redis.call('HINCRBY', P .. 'owner_count', owner, -1) <= 0 then
    redis.call('HDEL', P .. 'owner_count', owner)
    redis.call('HDEL', P .. 'owner_bytes', owner)
  else
    redis.call('HINCRBY', P .. 'owner_bytes', owner, -size)
  end
  return 1
end

local function drop_oldest(cid, owner, n)
  for _ = 1, n do
    local item = redis.call('LPOP', P .. 'turns:' .. cid)
    if not item then return end
    count(cid, owner, -size_of(item))
  end
end

local function expire()
  for _, cid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'by_idle', '-inf', now - ttl)) do
    remove(cid)
  end
end

local function oldest_of(owner, but)
  for _, cid in ipairs(redis.call('ZRANGE', P .. 'owned:' .. owner, 0, 1)) do
    if cid ~= but then return cid end
  end
  return nil
end

local function cap()
  local over = redis.call('ZCARD', P .. 'by_use') - max_conversations
  if over > 0 then
    for _, cid in ipairs(redis.call('ZRANGE', P .. 'by_use', 0, over - 1)) do remove(cid) end
  end
end

-- Over the budget, the key that keeps the most gives way (MemoryStore._fit_budget).
local function fit_budget(newest, newest_owner)
  while tonumber(redis.call('GET', P .. 'bytes') or '0') > max_bytes do
    local heavy, most = nil, -1
    local owners = redis.call('HGETALL', P .. 'owner_bytes')
    for i = 1, #owners, 2 do
      local kept = tonumber(owners[i + 1])
      if kept > most then heavy, most = owners[i], kept end
    end
    local victim = oldest_of(heavy, newest)
    if victim then
      remove(victim)
    elseif heavy == newest_owner and redis.call('LLEN', P .. 'turns:' .. newest) > 1 then
      drop_oldest(newest, newest_owner, 1)
    else
      local other = nil
      for _, cid in ipairs(redis.call('ZRANGE', P .. 'by_use', 0, 1)) do
        if cid ~= newest then other = cid break end
      end
      if not other then return end
      remove(other)
    end
  end
end

local function spend(first)
  for i = first, #ARGV, 3 do
    local key = P .. 'tokens:' .. ARGV[i] .. ':' .. ARGV[i + 1]
    redis.call('INCRBY', key, ARGV[i + 2])
    redis.call('EXPIRE', key, 2764800)
  end
end

if mode == 'append' then
  local cid, owner, drop = ARGV[11], ARGV[12], tonumber(ARGV[13])
  local item, size, id_bytes = ARGV[14], tonumber(ARGV[15]), tonumber(ARGV[16])
  local claim = ARGV[17]
  if claim ~= '' and redis.call('GET', P .. 'busy:' .. cid) ~= claim then
    spend(18)  -- the claim was lost: the tokens count, the turn is not remembered
    return 0
  end
  expire()
  local conv = P .. 'conv:' .. cid
  local use = redis.call('INCR', P .. 'use')
  local kept_by = redis.call('HGET', conv, 'owner')
  if not kept_by then
    if owner ~= local_id and
        tonumber(redis.call('HGET', P .. 'owner_count', owner) or '0') >= max_per_key then
      local oldest = oldest_of(owner, cid)
      if oldest then remove(oldest) end
    end
    kept_by = owner
    redis.call('HSET', conv, 'owner', owner, 'bytes', 0)
    redis.call('HINCRBY', P .. 'owner_count', owner, 1)
    count(cid, owner, id_bytes)
  end
  redis.call('HSET', conv, 'last_used', ARGV[2])
  redis.call('ZADD', P .. 'by_use', use, cid)
  redis.call('ZADD', P .. 'by_idle', now, cid)
  redis.call('ZADD', P .. 'owned:' .. kept_by, use, cid)
  cap()
  drop_oldest(cid, kept_by, drop)
  redis.call('RPUSH', P .. 'turns:' .. cid, item)
  count(cid, kept_by, size)
  local turns = redis.call('LLEN', P .. 'turns:' .. cid)
  if turns > max_turns then drop_oldest(cid, kept_by, turns - keep_on_drop) end
  fit_budget(cid, kept_by)
  spend(18)
  return 1
elseif mode == 'forget' then
  return remove(ARGV[11])
elseif mode == 'let_go' then
  if redis.call('GET', P .. 'busy:' .. ARGV[11]) == ARGV[12] then
    redis.call('DEL', P .. 'busy:' .. ARGV[11])
  end
  return 1
elseif mode == 'renew' then
  -- The claims still held are renewed; those with a cancel waiting are named.
  local cancelled = {}
  for i = 12, #ARGV, 2 do
    if redis.call('GET', P .. 'busy:' .. ARGV[i]) == ARGV[i + 1] then
      redis.call('PEXPIRE', P .. 'busy:' .. ARGV[i], ARGV[11])
      if redis.call('GET', P .. 'cancel:' .. ARGV[i]) == ARGV[i + 1] then
        table.insert(cancelled, ARGV[i])
      end
    end
  end
  return cancelled
elseif mode == 'cancel' then
  -- Leave a cancel for the turn that holds the conversation (seen at its next renewal)
  -- and tell its gateway now; only for the key whose turn it is, or an admin key.
  local cid, who, admin = ARGV[11], ARGV[12], ARGV[13] == '1'
  local claim = redis.call('GET', P .. 'busy:' .. cid)
  if not claim then return 0 end
  if not admin and string.match(claim, ' (.*)$') ~= who then return 0 end
  redis.call('SET', P .. 'cancel:' .. cid, claim, 'PX', ARGV[14])
  redis.call('PUBLISH', P .. 'cancels', cid .. ' ' .. claim)
  return 1
elseif mode == 'spend' then
  spend(11)
  return 1
elseif mode == 'admit' then
  -- A request of a key: its tokens of the day, then its bucket of requests, refilled on
  -- Redis's own clock, so that every gateway's requests fill one bucket.
  local key_id, rpm, per_day, day = ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13]), ARGV[14]
  local spends, peek = ARGV[15] == '1', ARGV[16] == '1'
  local used = tonumber(redis.call('GET', P .. 'tokens:' .. key_id .. ':' .. day) or '0')
  if not peek and spends and per_day and used >= per_day then
    return {'tokens', '', tostring(used)}
  end
  local left = ''
  if rpm then
    local t = redis.call('TIME')
    local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
    local bucket = P .. 'bucket:' .. key_id
    local kept = redis.call('HMGET', bucket, 'tokens', 'stamp')
    local tokens = tonumber(kept[1]) or rpm
    local stamp = tonumber(kept[2]) or clock
    tokens = math.min(rpm, tokens + math.max(0, clock - stamp) * rpm / 60)
    if not peek then
      if tokens < 1 then return {'requests', tostring(tokens), tostring(used)} end
      tokens = tokens - 1
      redis.call('HSET', bucket, 'tokens', tostring(tokens), 'stamp', tostring(clock))
      redis.call('EXPIRE', bucket, 120)  -- full again after 60 s anyway
    end
    left = tostring(tokens)
  end
  return {'ok', left, tostring(used)}
elseif mode == 'lease_take' then
  -- A place in a bounded set shared by every gateway: an upstream's generation slots
  -- (slots:<upstream>) or the queue's places (queue). Each is a lease in a sorted set by
  -- its end on Redis's clock; leases that ran out (their gateway died) go first. Each is
  -- named by a counter that only grows (the fence): a lease that ran out is never renewed
  -- or ended by mistake in place of a later one, and the queue's order is the fences'.
  local set, limit, ms = P .. ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13])
  local t = redis.call('TIME')
  local clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', set, '-inf', clock)
  local free = limit - redis.call('ZCARD', set)
  if free <= 0 then return '' end
  if ARGV[15] ~= '' then
    -- A slot: the turns that wait for this upstream in any gateway and came before this
    -- one (ARGV[15], the fence of its place in the queue; 'new' for one that has none,
    -- which comes after all of them) have the first free slots.
    local queue, upstream = P .. 'queue', ',' .. ARGV[16] .. ','
    redis.call('ZREMRANGEBYSCORE', queue, '-inf', clock)
    local mine, before = tonumber(ARGV[15]) or math.huge, 0
    for _, waiting in ipairs(redis.call('ZRANGE', queue, 0, -1)) do
      local fence, wants = string.match(waiting, '^(%d+) %S+ (%S*)$')
      if tonumber(fence) < mine and string.find(',' .. wants .. ',', upstream, 1, true) then
        before = before + 1
      end
    end
    if before >= free then return '' end
  end
  local lease = redis.call('INCR', P .. 'fence') .. ' ' .. ARGV[14]
  redis.call('ZADD', set, clock + ms, lease)
  -- A turn that waited gives its place up in the same step (ARGV[17]): never counted twice,
  -- never left behind.
  if ARGV[17] ~= '' then redis.call('ZREM', P .. 'queue', ARGV[17]) end
  return lease
elseif mode == 'lease_renew' then
  -- The leases still held are renewed; those that ran out are named.
  local t = redis.call('TIME')
  local clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local lost = {}
  for i = 12, #ARGV, 2 do
    local set = P .. ARGV[i]
    local ends = tonumber(redis.call('ZSCORE', set, ARGV[i + 1]))
    if ends and ends > clock then
      redis.call('ZADD', set, 'XX', clock + tonumber(ARGV[11]), ARGV[i + 1])
    else
      redis.call('ZREM', set, ARGV[i + 1])
      table.insert(lost, ARGV[i + 1])
    end
  end
  return lost
elseif mode == 'lease_give' then
  redis.call('ZREM', P .. ARGV[11], ARGV[12])
  return 1
elseif mode == 'sweep' then
  expire()
  cap()
  local owners = redis.call('HGETALL', P .. 'owner_count')
  for i = 1, #owners, 2 do
    local owner, mine = owners[i], tonumber(owners[i + 1])
    if owner ~= local_id and mine > max_per_key then
      for _, cid in ipairs(redis.call('ZRANGE', P .. 'owned:' .. owner, 0,
                                      mine - max_per_key - 1)) do
        remove(cid)
      end
    end
  end
  -- A lowered turn bound applies at each conversation's next turn: a pass over every
  -- conversation would hold Redis up for every gateway.
  local newest = redis.call('ZRANGE', P .. 'by_use', -1, -1)[1]
  if newest then fit_budget(newest, redis.call('HGET', P .. 'conv:' .. newest, 'owner')) end
  return 1
end
return redis.error_reply('unknown mode ' .. tostring(mode))
