-- epoch_restamp: run by every new connection (redis_guards.py `EpochGuard`) before anything
-- else. An epoch that names another Redis process than this one was restored from a
-- snapshot or an AOF that may lack the last writes (a crash with `save` points or
-- `appendfsync everysec`), or replicated to a replica now promoted by a failover: writes
-- since then (revocations, replay and assertion records) may be lost, so the epoch starts
-- again now and everything issued before is refused. Also stamps epochs that lack it.
-- KEYS[1] an epoch of this node  ARGV[1] epoch id  ARGV[2..] the node's other epochs
-- (a cluster node: one per slot it serves; same node, so allow-cross-slot-keys)
-- Returns how many existing epochs started again (missing ones are created too).
local run_id = redis_run_id()
local redis_now = redis_time()
local restamped = 0
local function stamp(key)
  local value = redis.call('GET', key)
  if value and string.match(value, '^%d+ %S+ (%x+)$') == run_id then
    return
  end
  redis.call('SET', key, redis_now .. ' ' .. ARGV[1] .. ' ' .. run_id)
  if value then
    restamped = restamped + 1
  end
end
stamp(KEYS[1])
for i = 2, #ARGV do
  stamp(ARGV[i])
end
return restamped
