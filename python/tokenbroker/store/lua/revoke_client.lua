-- revoke_client: revokes every live session of one client (reason CLIENT_REVOKED) in one
-- script that reads no session hash: a marker holds the sequence number of the client's
-- newest session now, and every session numbered up to it is revoked.
-- KEYS[1] the client's live sessions  KEYS[2] opening-order set  KEYS[3] sequence counter
-- KEYS[4] client revocation marker
-- ARGV[1] now
-- Returns {"OK", count}. All KEYS share the client's hash tag.
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if count == 0 then
  return {'OK', 0}
end
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
-- The marker must outlive every session it revokes, earlier markers' ones included.
local keep = math.max(tonumber(top[2]) - now, redis.call('TTL', KEYS[4]))
redis.call('SET', KEYS[4], redis.call('GET', KEYS[3]) or 0, 'EX', keep)
extend_ttl(KEYS[3], keep)
redis.call('DEL', KEYS[1], KEYS[2])
return {'OK', count}
