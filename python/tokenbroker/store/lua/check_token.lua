-- check_token: step 7 of validation, one round trip: session live, this client's and for
-- this audience, not revoked; replay records new (then set, each with its own TTL); the
-- session's activity recorded. (Revoked jtis are checked beside this script: see redis.py.)
-- KEYS[1]   the session's hash
-- KEYS[2..] replay record keys
-- ARGV[1] client_id  ARGV[2] audience  ARGV[3] now  ARGV[4] client_ip ("" keeps the last one)
-- ARGV[5..] for each replay key, the Unix time it may be forgotten, same order as KEYS[2..]
-- Returns a reason name: OK, SESSION_UNKNOWN, SESSION_REVOKED, CLIENT_REVOKED or REPLAYED.
local now = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'client_id', 'audience', 'expires_at', 'revoked')
if not h[1] or h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then
  return 'SESSION_UNKNOWN'
end
if h[4] then
  return h[4]
end
if tonumber(h[3]) <= now then
  return 'SESSION_UNKNOWN'
end
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return 'REPLAYED'
  end
end
for i = 2, #KEYS do
  local ttl = tonumber(ARGV[i + 3]) - now
  if ttl > 0 then
    redis.call('SET', KEYS[i], '1', 'EX', ttl)
  end
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'last_seen_at', now, 'last_ip', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'last_seen_at', now)
end
return 'OK'
