-- check_token: step 7 of validation, one round trip. Refuses without writing anything
-- unless every check passes: session live (see session_refusal), token not revoked (single
-- Redis only: on a cluster its key lives in another slot, see redis.py), token issued no
-- earlier than the epoch, replay records new and within the client's quota. Then records
-- them (members of the client's records set, scored by their expiry on Redis's clock:
-- until + skew allowance) and the session's activity. A session that ends when idle has
-- its expiry slid to now + idle seconds (never past its hard end), written only when it
-- moves by at least max(1, idle / 10) seconds: a busy session writes it about ten times
-- per idle window, and it stays at least 0.9 idle ahead of its last use.
-- KEYS[1] the session's hash        KEYS[2] the client's live sessions (sorted set)
-- KEYS[3] client revocation marker  KEYS[4] the client's records (sorted set)
-- KEYS[5] the epoch of this slot    KEYS[6] (optional) the revoked-jti key
-- ARGV[1] client_id  ARGV[2] audience  ARGV[3] now (broker clock)  ARGV[4] client_ip
-- ARGV[5] session id  ARGV[6] issued_at  ARGV[7] epoch id  ARGV[8] skew allowance (s)
-- ARGV[9] quota of records per client  ARGV[10..] pairs: record member, until
-- Returns {reason, redis_now}: OK, SESSION_UNKNOWN, SESSION_REVOKED, CLIENT_REVOKED,
-- TOKEN_REVOKED, STALE, REPLAYED or REPLAY_CACHE_FULL.
local now = tonumber(ARGV[3])
local redis_now = redis_time()
local h = redis.call('HMGET', KEYS[1], 'client_id', 'audience', 'expires_at', 'revoked', 'seq', 'idle', 'ends_at')
local live = redis.call('ZSCORE', KEYS[2], ARGV[5])
local refusal = session_refusal(h, ARGV[1], ARGV[2], redis.call('GET', KEYS[3]), live, now)
if refusal then
  return {refusal, redis_now}
end
if KEYS[6] and redis.call('EXISTS', KEYS[6]) == 1 then
  return {'TOKEN_REVOKED', redis_now}
end
if tonumber(ARGV[6]) < epoch_start(KEYS[5], ARGV[7], redis_now) then
  return {'STALE', redis_now}
end
local count = 0
if #ARGV > 9 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', redis_now)
  for i = 10, #ARGV, 2 do
    if redis.call('ZSCORE', KEYS[4], ARGV[i]) then
      return {'REPLAYED', redis_now}
    end
    count = count + 1
  end
  if redis.call('ZCARD', KEYS[4]) + count > tonumber(ARGV[9]) then
    return {'REPLAY_CACHE_FULL', redis_now}
  end
  local skew = tonumber(ARGV[8])
  local longest = 0
  for i = 10, #ARGV, 2 do
    local expires = tonumber(ARGV[i + 1]) + skew
    if expires > redis_now then
      redis.call('ZADD', KEYS[4], expires, ARGV[i])
      longest = math.max(longest, expires - redis_now)
    end
  end
  extend_ttl(KEYS[4], longest)
end
if ARGV[4] ~= '' then
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
return {'OK', redis_now}
