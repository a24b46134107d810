-- revoke_session: revokes one live session (and so every token issued in it).
-- KEYS[1] the session's hash  KEYS[2] its client's live sessions  KEYS[3] opening-order set
-- KEYS[4] client revocation marker
-- ARGV[1] session id  ARGV[2] client_id  ARGV[3] now
-- Returns 1 when revoked now, 0 when unknown, expired or already revoked (or evicted).
local now = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'client_id', 'audience', 'expires_at', 'revoked', 'seq')
local live = redis.call('ZSCORE', KEYS[2], ARGV[1])
if session_refusal(h, ARGV[2], h[2], redis.call('GET', KEYS[4]), live, now) then
  return 0
end
revoke_live_session(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
return 1
