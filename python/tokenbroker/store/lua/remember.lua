-- remember: records a single-use value of one client (a client assertion's jti) until
-- `until` + skew allowance on Redis's clock, in the client's records set, under its quota.
-- KEYS[1] the client's records (sorted set)  KEYS[2] the epoch of the client's slot
-- ARGV[1] member  ARGV[2] issued_at  ARGV[3] until  ARGV[4] skew allowance (s)
-- ARGV[5] quota of records per client  ARGV[6] epoch id
-- Returns {"NEW" | "SEEN" | "STALE" | "FULL", redis_now}; only NEW records anything.
local redis_now = redis_time()
if tonumber(ARGV[2]) < epoch_start(KEYS[2], ARGV[6], redis_now) then
  return {'STALE', redis_now}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', redis_now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {'SEEN', redis_now}
end
local expires = tonumber(ARGV[3]) + tonumber(ARGV[4])
if expires <= redis_now then
  return {'NEW', redis_now}
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then
  return {'FULL', redis_now}
end
redis.call('ZADD', KEYS[1], expires, ARGV[1])
extend_ttl(KEYS[1], expires - redis_now)
return {'NEW', redis_now}
