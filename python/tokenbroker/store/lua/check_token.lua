-- check_token: step 7 of validation, one round trip. Refuses without writing anything
-- unless every check passes: session live (see session_refusal), token not revoked (single
-- Redis only: on a cluster its key lives in another slot, see redis.py), token issued no
-- earlier than the epoch, replay records new and within the client's quota. Then, when the
-- validation is observed, the detection signals are computed (see watch below): a finding
-- whose action is deny or revoke_session refuses it (ANOMALY) with nothing written. Else
-- the replay records are recorded (members of the client's records set, scored by their
-- expiry on Redis's clock: until + skew allowance) and the session's activity. A session
-- that ends when idle has its expiry slid to now + idle seconds (never past its hard end),
-- written only when it moves by at least max(1, idle / 10) seconds: a busy session writes
-- it about ten times per idle window, and it stays at least 0.9 idle ahead of its last use.
-- KEYS[1] the session's hash        KEYS[2] the client's live sessions (sorted set)
-- KEYS[3] client revocation marker  KEYS[4] the client's records (sorted set)
-- KEYS[5] the epoch of this slot    KEYS[6] (optional) the revoked-jti key
-- then, only when observed (the last 4 KEYS): the client's networks (sorted set), the
-- client's watch (hash), the session's resources (set), the client's opening-order set
-- ARGV[1] client_id  ARGV[2] audience  ARGV[3] now (broker clock)  ARGV[4] client_ip
-- ARGV[5] session id  ARGV[6] issued_at  ARGV[7] epoch id  ARGV[8] skew allowance (s)
-- ARGV[9] quota of records per client  ARGV[10..] pairs: record member, until
-- then, only when observed (the last OBSERVE_ARGS ARGV): see watch.
-- Returns {reason, redis_now, signal, evidence, signal, evidence...}: reason OK, ANOMALY,
-- SESSION_UNKNOWN, SESSION_REVOKED, CLIENT_REVOKED, TOKEN_REVOKED, STALE, REPLAYED or
-- REPLAY_CACHE_FULL; each finding's signal name and evidence (JSON), OK or ANOMALY only.
local OBSERVE_ARGS = 9
local HOUR = 3600

-- Detection: the same semantics as the memory store, exactly (the list at the top of
-- tokenbroker/detection/memory_watch.py). State, all under the client's hash tag:
-- - the client's networks: member = network, score = last seen (refreshed at most once
--   an hour), at most network_history_max, older than the history forgotten;
-- - the client's watch: first (first allowed observation with a network), n (sessions
--   in the breadth histogram), b1..bB (sessions per distinct resources), h0..h23 (usage
--   hours);
-- both expire after the history of no writes (EXPIRE when written, never on a read);
-- - the session's resource digests, at most session_resources_max (once full, a new
--   resource is neither added nor counted), until the session's hard end;
-- - on the session's hash: o, ow (origin network and its /16), oa (origin seen at), bc
--   (allowed requests in the burst window), lh (now // 3600 of its last observation), lr
--   (the resource of its last allowed request).
-- The common request (known network seen within the hour, same origin, known resource,
-- past the burst window, same hour) only reads, and adds oa (and lr when the resource
-- changed) to the session's HSET.

-- The findings, {signal, evidence JSON, ...}, and the strongest action (0 none, 1 alert,
-- 2 deny, 3 revoke_session) given the inline and revoke bits (ARGV, as SIGNAL_BITS).
local findings, strongest, inline_bits, revoke_bits = {}, 0, '0', '0'
local function find(signal, flag, evidence)
  findings[#findings + 1] = signal
  findings[#findings + 1] = cjson.encode(evidence)
  local action = 1
  if bit.band(tonumber(revoke_bits), flag) ~= 0 then
    action = 3
  elseif bit.band(tonumber(inline_bits), flag) ~= 0 then
    action = 2
  end
  strongest = math.max(strongest, action)
end

-- The smallest k whose cumulative count reaches 95% of total (integers); B when none.
local function breadth_p95(watch_key, buckets, total)
  local fields = {}
  for k = 1, buckets do
    fields[k] = 'b' .. k
  end
  local counts = redis.call('HMGET', watch_key, unpack(fields))
  local cumulative = 0
  for k = 1, buckets do
    cumulative = cumulative + (tonumber(counts[k]) or 0)
    if 100 * cumulative >= 95 * total then
      return k
    end
  end
  return buckets
end

-- A session now touches `distinct` resources: it moves from bucket distinct-1 to distinct
-- (enters bucket 1 at its first; one already in the last bucket stays). After a halving,
-- bucket distinct-1 may have lost it: then it is counted anew. Over the history maximum
-- every bucket is halved (integers), so old behaviour fades.
local function breadth_grow(watch_key, distinct, buckets, history_max)
  if distinct > buckets then
    return
  end
  local from = 0
  if distinct > 1 then
    from = tonumber(redis.call('HGET', watch_key, 'b' .. (distinct - 1))) or 0
  end
  redis.call('HINCRBY', watch_key, 'b' .. distinct, 1)
  if from > 0 then
    redis.call('HINCRBY', watch_key, 'b' .. (distinct - 1), -1)
    return
  end
  if redis.call('HINCRBY', watch_key, 'n', 1) <= history_max then
    return
  end
  local fields = {}
  for k = 1, buckets do
    fields[k] = 'b' .. k
  end
  local counts = redis.call('HMGET', watch_key, unpack(fields))
  local halved, total = {}, 0
  for k = 1, buckets do
    local half = math.floor((tonumber(counts[k]) or 0) / 2)
    total = total + half
    halved[#halved + 1] = fields[k]
    halved[#halved + 1] = half
  end
  redis.call('HSET', watch_key, 'n', total, unpack(halved))
end

-- Observes a validation that passed every check. ARGV from `a`: network, wide (its /16,
-- IPv6 /32), resource digest ("" for each: none), inline bits, revoke bits, outside the
-- usage window ("1"), history (seconds), burst_window_seconds, then the other thresholds
-- in one ARGV, read only when needed (not by the common request), space-separated:
-- network_history_max, learning_seconds, concurrent_window_seconds, breadth_min_sessions,
-- breadth_min_resources, session_resources_max, burst_requests, BREADTH_BUCKETS,
-- BREADTH_HISTORY_MAX. `s` holds the session's hash fields created_at, o, ow, oa, bc, lh,
-- lr. Appends to `findings`; when the strongest action refuses (deny, revoke_session)
-- writes nothing and returns true. Else writes the detection state and returns false and
-- the session hash's fields to set.
local function watch(nets_key, watch_key, resources_key, a, now, ends_at, s)
  local network, wide, resource = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  inline_bits, revoke_bits = ARGV[a + 3], ARGV[a + 4]
  local history, burst_window = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local t
  local function threshold(i) -- the i-th of the other thresholds
    if not t then
      t = {}
      for number in string.gmatch(ARGV[a + 8], '%d+') do
        t[#t + 1] = tonumber(number)
      end
    end
    return t[i]
  end
  local opened_at, origin = tonumber(s[1]) or 0, s[2] or ''

  local seen, known, first = nil, false, nil
  if network ~= '' then
    seen = tonumber(redis.call('ZSCORE', nets_key, network))
    known = seen ~= nil and now - seen <= history
    if not known then
      -- Learning: no first observation yet, or within learning_seconds of it. (A known
      -- network implies a first observation: it is read only for an unknown one.)
      first = tonumber(redis.call('HGET', watch_key, 'first'))
      if first and now >= first + threshold(2) then
        local count = redis.call('ZCOUNT', nets_key, now - history, '+inf')
        find('new_network', 1, {network = network, known_networks = count})
      end
    end
    if origin ~= '' and wide ~= s[3] then
      local apart = now - (tonumber(s[4]) or 0)
      if apart < threshold(3) then
        find('concurrent_origins', 2, {network = network, other_network = origin, seconds_apart = apart})
      end
    end
  end

  -- lr, the resource of the session's last allowed request, is in its set (or the set was
  -- full then, and stays full: either way it adds nothing), so a repeat needs no lookup.
  local distinct, adds = 0, false
  if resource ~= '' and resource ~= s[7] and redis.call('SISMEMBER', resources_key, resource) == 0 then
    distinct = redis.call('SCARD', resources_key) + 1
    adds = distinct <= threshold(6)
  end
  if adds and distinct >= threshold(5) then
    local total = tonumber(redis.call('HGET', watch_key, 'n')) or 0
    if total >= threshold(4) then
      local buckets = threshold(8)
      local p95 = breadth_p95(watch_key, buckets, total)
      if distinct > p95 and p95 < buckets then
        find('resource_breadth', 4, {distinct_resources = distinct, p95 = p95, sessions = total})
      end
    end
  end

  if ARGV[a + 5] == '1' then
    find('outside_usage_window', 8, {hour = math.floor(now / HOUR) % 24})
  end

  local burst_open = now < opened_at + burst_window
  local requests = (tonumber(s[5]) or 0) + 1
  if burst_open and requests > threshold(7) then
    find('burst_after_auth', 16, {requests = requests, seconds_since_open = now - opened_at})
  end
  if strongest >= 2 then
    return true -- refused: nothing of it is remembered
  end

  local fields, watched = {}, false
  local function set(field, value)
    fields[#fields + 1] = field
    fields[#fields + 1] = value
  end
  if network ~= '' then
    if not known then
      redis.call('ZREMRANGEBYSCORE', nets_key, '-inf', '(' .. (now - history))
      redis.call('ZADD', nets_key, now, network)
      local over = redis.call('ZCARD', nets_key) - threshold(1)
      if over > 0 then -- the least recently seen go (ties: the smallest name)
        redis.call('ZREMRANGEBYRANK', nets_key, 0, over - 1)
      end
      redis.call('EXPIRE', nets_key, history)
      if not first then
        redis.call('HSET', watch_key, 'first', now)
        watched = true
      end
    elseif now - seen >= HOUR then -- at most once an hour: a busy client does not rewrite it
      redis.call('ZADD', nets_key, now, network)
      redis.call('EXPIRE', nets_key, history)
    end
    if origin ~= network then
      set('o', network)
      set('ow', wide)
    end
    set('oa', now)
  end
  if resource ~= '' and resource ~= s[7] then
    set('lr', resource)
  end
  if adds then
    redis.call('SADD', resources_key, resource)
    redis.call('EXPIRE', resources_key, math.max(1, ends_at - now))
    breadth_grow(watch_key, distinct, threshold(8), threshold(9))
    watched = true
  end
  if burst_open then
    set('bc', requests)
  end
  local hour = math.floor(now / HOUR)
  if tonumber(s[6]) ~= hour then
    set('lh', hour)
    redis.call('HINCRBY', watch_key, 'h' .. (hour % 24), 1)
    watched = true
  end
  if watched then
    redis.call('EXPIRE', watch_key, history)
  end
  return false, fields
end

local now = tonumber(ARGV[3])
local redis_now = redis_time()
local observed = #KEYS >= 9 -- the 4 detection keys come last
local h
if observed then -- with the session's detection fields, h[8..14] (see watch)
  h = redis.call('HMGET', KEYS[1], 'client_id', 'audience', 'expires_at', 'revoked', 'seq', 'idle', 'ends_at',
    'created_at', 'o', 'ow', 'oa', 'bc', 'lh', 'lr')
else
  h = redis.call('HMGET', KEYS[1], 'client_id', 'audience', 'expires_at', 'revoked', 'seq', 'idle', 'ends_at')
end
local live = redis.call('ZSCORE', KEYS[2], ARGV[5])
local refusal = session_refusal(h, ARGV[1], ARGV[2], redis.call('GET', KEYS[3]), live, now)
if refusal then
  return {refusal, redis_now}
end
if (#KEYS == 6 or #KEYS == 10) and redis.call('EXISTS', KEYS[6]) == 1 then
  return {'TOKEN_REVOKED', redis_now}
end
if tonumber(ARGV[6]) < epoch_start(KEYS[5], ARGV[7], redis_now) then
  return {'STALE', redis_now}
end
local last_record = #ARGV -- the last ARGV of the replay records
if observed then
  last_record = #ARGV - OBSERVE_ARGS
end
local count = 0
if last_record > 9 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', redis_now)
  for i = 10, last_record, 2 do
    if redis.call('ZSCORE', KEYS[4], ARGV[i]) then
      return {'REPLAYED', redis_now}
    end
    count = count + 1
  end
  if redis.call('ZCARD', KEYS[4]) + count > tonumber(ARGV[9]) then
    return {'REPLAY_CACHE_FULL', redis_now}
  end
end
-- Every check passed: only now is anything written (and not at all when refused here).
local session_fields
if observed then
  local n = #KEYS
  local refused
  local s, ends_at = {h[8], h[9], h[10], h[11], h[12], h[13], h[14]}, tonumber(h[7] or h[3])
  refused, session_fields = watch(KEYS[n - 3], KEYS[n - 2], KEYS[n - 1], last_record + 1, now, ends_at, s)
  if refused then
    if strongest == 3 then
      revoke_live_session(KEYS[1], KEYS[2], KEYS[n], ARGV[5])
    end
    return {'ANOMALY', redis_now, unpack(findings)}
  end
end
if last_record > 9 then
  local skew = tonumber(ARGV[8])
  local longest = 0
  for i = 10, last_record, 2 do
    local expires = tonumber(ARGV[i + 1]) + skew
    if expires > redis_now then
      redis.call('ZADD', KEYS[4], expires, ARGV[i])
      longest = math.max(longest, expires - redis_now)
    end
  end
  extend_ttl(KEYS[4], longest)
end
if session_fields then -- observed: the activity and the session's detection fields in one HSET
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[1], 'last_seen_at', now, 'last_ip', ARGV[4], unpack(session_fields))
  else
    redis.call('HSET', KEYS[1], 'last_seen_at', now, unpack(session_fields))
  end
elseif ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'last_seen_at', now, 'last_ip', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'last_seen_at', now)
end
local idle = tonumber(h[6])
if idle and h[7] then
  local target = math.min(tonumber(h[7]), now + idle)
  if target - tonumber(h[3]) >= math.max(1, math.floor(idle / 10)) then
    redis.call('HSET', KEYS[1], 'expires_at', target)
    redis.call('ZADD', KEYS[2], 'XX', target, ARGV[5])
    redis.call('EXPIRE', KEYS[1], target - now)
  end
end
return {'OK', redis_now, unpack(findings)}
