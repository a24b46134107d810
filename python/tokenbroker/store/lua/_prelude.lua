-- Shared by every script (redis_scripts.py puts it after the shebang line of each one).
-- The Redis process's run_id: new at every start and on every replica, so an epoch that
-- names another process was restored or replicated (see epoch_restamp.lua).
local function redis_run_id()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
end

-- The state epoch: "<start> <id> <run_id>", start in Redis seconds. A missing epoch means
-- this slot's state was lost (or never existed): it is created now, with start = Redis
-- TIME, so everything issued before the loss predates it and is refused.
local function epoch_start(key, id, redis_now)
  local value = redis.call('GET', key)
  if value then
    return tonumber(string.match(value, '^(%d+)'))
  end
  redis.call('SET', key, redis_now .. ' ' .. id .. ' ' .. redis_run_id())
  return redis_now
end

local function redis_time()
  return tonumber(redis.call('TIME')[1])
end

-- Keeps `key` alive at least `seconds` more; never shortens its TTL.
local function extend_ttl(key, seconds)
  if seconds > 0 and redis.call('TTL', key) < seconds then
    redis.call('EXPIRE', key, seconds)
  end
end

-- A session (hash `h` of client_id, audience, expires_at, revoked, seq) is live when it is
-- the client's, for this audience, not revoked (itself or by a client revocation marker:
-- every session with seq <= marker), unexpired and still in the client's live set
-- (eviction removes it from there). Returns nil when live, else the reason name.
local function session_refusal(h, client_id, audience, marker, in_live_set, now)
  if not h[1] or h[1] ~= client_id or h[2] ~= audience then
    return 'SESSION_UNKNOWN'
  end
  if h[4] then
    return h[4]
  end
  if marker and (tonumber(h[5]) or 0) <= tonumber(marker) then
    return 'CLIENT_REVOKED'
  end
  if tonumber(h[3]) <= now then
    return 'SESSION_UNKNOWN'
  end
  if not in_live_set then
    return 'SESSION_REVOKED'
  end
  return nil
end

-- Revokes a live session (its hash `key`, id `sid`): marked SESSION_REVOKED and taken out
-- of the client's live set and opening-order set. revoke_session does this, and
-- check_token when a detection signal's action is revoke_session.
local function revoke_live_session(key, live_key, order_key, sid)
  redis.call('HSET', key, 'revoked', 'SESSION_REVOKED')
  redis.call('ZREM', live_key, sid)
  redis.call('ZREM', order_key, sid)
end
