-- continue_session: continues a live session of one client, for the same audience.
-- KEYS[1] the session's hash
-- ARGV[1] client_id  ARGV[2] audience  ARGV[3] now  ARGV[4] client_ip ("" keeps the last one)
-- Returns {"OK", created_at, expires_at, last_ip}, {"NOT_FOUND"} (unknown, expired, revoked
-- or another client's) or {"WRONG_AUDIENCE"}.
local now = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'client_id', 'audience', 'created_at', 'expires_at', 'last_ip', 'revoked')
if not h[1] or h[1] ~= ARGV[1] or h[6] or tonumber(h[4]) <= now then
  return {'NOT_FOUND'}
end
if h[2] ~= ARGV[2] then
  return {'WRONG_AUDIENCE'}
end
local last_ip = h[5] or ''
if ARGV[4] ~= '' then
  last_ip = ARGV[4]
end
redis.call('HSET', KEYS[1], 'last_seen_at', now, 'last_ip', last_ip)
return {'OK', h[3], h[4], last_ip}
