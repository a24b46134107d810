-- open_session: opens a new session for one client under its session limit, in one script
-- that reads no session hash: the live set says which sessions are live, the opening-order
-- set which are oldest, so concurrent opens never have to retry (no optimistic round).
-- With a continuation, a live session it names (same audience) is continued instead: the
-- script answers CONTINUE and the caller runs continue_session on it; else the new session
-- is opened and the continuation names it. One script decides, so concurrent opens with one
-- continuation open one session.
-- KEYS[1] the client's live sessions (sorted set, member: session id, score: expires_at,
--         the current expiry: it slides with activity for sessions that end when idle)
-- KEYS[2] the client's opening-order set (same members, score: seq)
-- KEYS[3] the client's session sequence counter
-- KEYS[4] the new session's hash
-- KEYS[5] the epoch of the client's slot
-- KEYS[6] the client's ended (evicted) sessions (sorted set, member: session id, score: seq)
-- KEYS[7] the client's continuations (hash: continuation -> "<session id> <audience>")
-- ARGV[1] client_id  ARGV[2] audience  ARGV[3] now  ARGV[4] expires_at  ARGV[5] client_ip
-- ARGV[6] max_sessions  ARGV[7] policy ("reject" or "evict_oldest")  ARGV[8] the new session id
-- ARGV[9] epoch id  ARGV[10] ends_at (the hard end: now + ttl)  ARGV[11] idle seconds ("": none)
-- ARGV[12] continuation ("": none)  ARGV[13] a session id the continuation must not continue
-- ("": none; the caller found it dead)
-- Returns {"OK", ids to purge...}, {"LIMIT", live count} or {"CONTINUE", session id}. All
-- KEYS share the slot.
-- Ids to purge: ended sessions beyond the last max_sessions; the caller deletes their hash
-- and index and removes them from KEYS[6] (until it does, the next open returns them again).
local now = tonumber(ARGV[3])

-- The new session id is fresh and random: if its hash exists, this is a retried call
-- whose first attempt succeeded.
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {'OK'}
end
epoch_start(KEYS[5], ARGV[9], redis_time())

-- Live, as for the count below: in the live set with its expiry ahead (every revocation and
-- eviction takes a session out of the live set).
local continuation = ARGV[12]
if continuation ~= '' then
  local named = redis.call('HGET', KEYS[7], continuation)
  if named then
    local sid, audience = string.match(named, '^(%S+) (.*)$')
    local expires = sid and sid ~= ARGV[13] and audience == ARGV[2] and redis.call('ZSCORE', KEYS[1], sid)
    if expires and tonumber(expires) > now then
      return {'CONTINUE', sid}
    end
  end
end

-- Expired sessions leave both sets (bounded: the live set never exceeds the limit + 1).
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, sid in ipairs(expired) do
  redis.call('ZREM', KEYS[1], sid)
  redis.call('ZREM', KEYS[2], sid)
end

local count = redis.call('ZCARD', KEYS[1])
local max_sessions = tonumber(ARGV[6])
if count >= max_sessions then
  if ARGV[7] ~= 'evict_oldest' then
    return {'LIMIT', count}
  end
  -- Evicted sessions leave the live set: check_token then answers SESSION_REVOKED while
  -- their hash is kept (the last max_sessions of them), SESSION_UNKNOWN once it is purged.
  local oldest = redis.call('ZRANGE', KEYS[2], 0, count - max_sessions, 'WITHSCORES')
  for i = 1, #oldest, 2 do
    local sid = oldest[i]
    local expires = redis.call('ZSCORE', KEYS[1], sid)
    redis.call('ZREM', KEYS[1], sid)
    redis.call('ZREM', KEYS[2], sid)
    redis.call('ZADD', KEYS[6], oldest[i + 1], sid)
    -- The ended set outlives every hash it names, so none is left without a purger.
    extend_ttl(KEYS[6], (tonumber(expires) or now) - now)
  end
end

-- Only the last max_sessions evicted sessions are kept (the oldest by seq go first): a
-- client's ended sessions stay bounded. Expired ones already took hash and index along.
local purge = {}
local overflow = redis.call('ZCARD', KEYS[6]) - max_sessions
if overflow > 0 then
  purge = redis.call('ZRANGE', KEYS[6], 0, math.min(overflow, 256) - 1)
end

local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[4], 'client_id', ARGV[1], 'audience', ARGV[2], 'created_at', now,
  'expires_at', ARGV[4], 'last_seen_at', now, 'last_ip', ARGV[5], 'seq', seq, 'ends_at', ARGV[10])
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[4], 'idle', ARGV[11])
end
-- The hash lives until the session's current expiry (check_token and continue_session
-- extend it when they slide the expiry).
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[4]) - now)
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[8])
redis.call('ZADD', KEYS[2], seq, ARGV[8])

-- The sets (and the counter) live until the hard end of the client's longest session, which
-- no sliding expiry passes, so a slide never has to extend them; they never shorten (the
-- counter: a client revocation marker compares against it, and must not outlive it).
local keep = tonumber(ARGV[10]) - now
extend_ttl(KEYS[1], keep)
extend_ttl(KEYS[2], keep)
extend_ttl(KEYS[3], keep)

-- The continuation names the new session. Entries whose session left the live set are
-- pruned once they outnumber twice the limit (amortised: a constant per open), so a
-- client's continuations stay bounded by O(max_sessions).
if continuation ~= '' then
  redis.call('HSET', KEYS[7], continuation, ARGV[8] .. ' ' .. ARGV[2])
  if redis.call('HLEN', KEYS[7]) > 2 * max_sessions + 16 then
    local entries = redis.call('HGETALL', KEYS[7])
    for i = 1, #entries, 2 do
      local sid = string.match(entries[i + 1], '^(%S+)')
      if not sid or not redis.call('ZSCORE', KEYS[1], sid) then
        redis.call('HDEL', KEYS[7], entries[i])
      end
    end
  end
  extend_ttl(KEYS[7], keep)
end
return {'OK', unpack(purge)}
