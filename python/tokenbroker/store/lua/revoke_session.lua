-- revoke_session: revokes one live session (and so every token issued in it).
-- KEYS[1] the session's hash
-- KEYS[2] its client's sessions sorted set
-- ARGV[1] session id  ARGV[2] client_id  ARGV[3] now  ARGV[4] revocation channel
-- Returns 1 when revoked now, 0 when unknown, expired or already revoked.
local now = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'client_id', 'expires_at', 'revoked')
if not h[1] or h[1] ~= ARGV[2] or h[3] or tonumber(h[2]) <= now then
  return 0
end
redis.call('HSET', KEYS[1], 'revoked', 'SESSION_REVOKED')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[4], cjson.encode({kind = 'session', id = ARGV[1]}))
return 1
