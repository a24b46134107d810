-- continue_session: continues a live session of one client, for the same audience. A
-- session that ends when idle has its expiry slid to now + max(its idle seconds, the
-- lifetime of the token about to be issued), never past its hard end, never back.
-- KEYS[1] the session's hash  KEYS[2] the client's live sessions  KEYS[3] client revocation marker
-- ARGV[1] client_id  ARGV[2] audience  ARGV[3] now  ARGV[4] client_ip ("" keeps the last one)
-- ARGV[5] the session id  ARGV[6] the token's lifetime (s)
-- Returns {"OK", created_at, expires_at, last_ip}, {"NOT_FOUND"} (unknown, expired, revoked,
-- evicted or another client's) or {"WRONG_AUDIENCE"}.
local now = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'client_id', 'audience', 'expires_at', 'revoked', 'seq', 'created_at', 'last_ip',
  'idle', 'ends_at')
local live = redis.call('ZSCORE', KEYS[2], ARGV[5])
if session_refusal(h, ARGV[1], h[2], redis.call('GET', KEYS[3]), live, now) then
  return {'NOT_FOUND'}
end
if h[2] ~= ARGV[2] then
  return {'WRONG_AUDIENCE'}
end
local last_ip = h[7] or ''
if ARGV[4] ~= '' then
  last_ip = ARGV[4]
end
redis.call('HSET', KEYS[1], 'last_seen_at', now, 'last_ip', last_ip)
local expires = tonumber(h[3])
local idle = tonumber(h[8])
if idle and h[9] then
  local target = math.min(tonumber(h[9]), now + math.max(idle, tonumber(ARGV[6]) or 0))
  if target > expires then
    expires = target
    redis.call('HSET', KEYS[1], 'expires_at', target)
    redis.call('ZADD', KEYS[2], 'XX', target, ARGV[5])
    redis.call('EXPIRE', KEYS[1], target - now)
  end
end
return {'OK', h[6], expires, last_ip}
