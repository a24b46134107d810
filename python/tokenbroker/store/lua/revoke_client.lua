-- revoke_client: revokes every live session of one client (reason CLIENT_REVOKED).
-- KEYS[1]   the client's sessions sorted set
-- KEYS[2..] the hashes of the client's live sessions, as the caller last saw them
-- ARGV[1] client_id  ARGV[2] now  ARGV[3] revocation channel
-- ARGV[4..] the session ids of KEYS[2..], same order
-- Returns {"OK", count} or, when a live session is missing from KEYS (the caller must pass
-- it and call again), {"RETRY", live session ids...}. All KEYS share the client's hash tag.
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local key_of = {}
for i = 4, #ARGV do
  key_of[ARGV[i]] = KEYS[i - 2]
end
for _, sid in ipairs(live) do
  if not key_of[sid] then
    return {'RETRY', unpack(live)}
  end
end
local count = 0
for _, sid in ipairs(live) do
  local key = key_of[sid]
  local h = redis.call('HMGET', key, 'client_id', 'expires_at', 'revoked')
  if h[1] == ARGV[1] and not h[3] and tonumber(h[2]) > now then
    redis.call('HSET', key, 'revoked', 'CLIENT_REVOKED')
    count = count + 1
  end
  redis.call('ZREM', KEYS[1], sid)
end
if count > 0 then
  redis.call('PUBLISH', ARGV[3], cjson.encode({kind = 'client', id = ARGV[1]}))
end
return {'OK', count}
