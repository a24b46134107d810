-- check_jti: on a Redis Cluster, the revoked-jti key lives in its own slot (revoke_token
-- knows only the jti): is the token revoked, or may its revocation have been lost with
-- that slot's state (epoch newer than the token's iat)?
-- KEYS[1] the revoked-jti key  KEYS[2] the epoch of its slot
-- ARGV[1] issued_at  ARGV[2] epoch id
-- Returns {"OK" | "TOKEN_REVOKED" | "STALE", redis_now}.
local redis_now = redis_time()
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'TOKEN_REVOKED', redis_now}
end
if tonumber(ARGV[1]) < epoch_start(KEYS[2], ARGV[2], redis_now) then
  return {'STALE', redis_now}
end
return {'OK', redis_now}
