-- open_session: opens a new session for one client under its session limit.
-- KEYS[1]   the client's sessions sorted set (member: session id, score: expires_at)
-- KEYS[2]   the client's session sequence counter (orders sessions opened in one second)
-- KEYS[3]   the new session's hash
-- KEYS[4..] the hashes of the client's live sessions, as the caller last saw them
-- ARGV[1] client_id  ARGV[2] audience  ARGV[3] now  ARGV[4] expires_at  ARGV[5] client_ip
-- ARGV[6] max_sessions  ARGV[7] policy ("reject" or "evict_oldest")  ARGV[8] revocation channel
-- ARGV[9] the new session id  ARGV[10..] the session ids of KEYS[4..], same order
-- Returns {"OK", evicted ids...}, {"LIMIT", live count} or, when a live session is missing
-- from KEYS (the caller must pass it and call again), {"RETRY", live session ids...}.
-- All KEYS share the client's hash tag.
local now = tonumber(ARGV[3])

-- The new session id is fresh and random: if its hash exists, this is a retried call
-- whose first attempt succeeded.
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'OK'}
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local key_of = {}
for i = 10, #ARGV do
  key_of[ARGV[i]] = KEYS[i - 6]
end
for _, sid in ipairs(live) do
  if not key_of[sid] then
    return {'RETRY', unpack(live)}
  end
end

local sessions = {}
for _, sid in ipairs(live) do
  local h = redis.call('HMGET', key_of[sid], 'created_at', 'seq', 'expires_at', 'revoked')
  if h[1] and not h[4] and tonumber(h[3]) > now then
    sessions[#sessions + 1] = {sid = sid, key = key_of[sid], created = tonumber(h[1]), seq = tonumber(h[2]) or 0}
  else
    redis.call('ZREM', KEYS[1], sid)  -- gone or revoked: not live
  end
end

local max_sessions = tonumber(ARGV[6])
local evicted = {}
if #sessions >= max_sessions then
  if ARGV[7] ~= 'evict_oldest' then
    return {'LIMIT', #sessions}
  end
  table.sort(sessions, function(a, b)
    if a.created ~= b.created then return a.created < b.created end
    return a.seq < b.seq
  end)
  for i = 1, #sessions - max_sessions + 1 do
    local s = sessions[i]
    redis.call('HSET', s.key, 'revoked', 'SESSION_REVOKED')
    redis.call('ZREM', KEYS[1], s.sid)
    redis.call('PUBLISH', ARGV[8], cjson.encode({kind = 'session', id = s.sid}))
    evicted[#evicted + 1] = s.sid
  end
end

local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], 'client_id', ARGV[1], 'audience', ARGV[2], 'created_at', now,
  'expires_at', ARGV[4], 'last_seen_at', now, 'last_ip', ARGV[5], 'seq', seq)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]) - now)
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[9])

-- The set and the counter live as long as the client's longest session.
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local keep = tonumber(top[2]) - now
redis.call('EXPIRE', KEYS[1], keep)
redis.call('EXPIRE', KEYS[2], keep)
return {'OK', unpack(evicted)}
