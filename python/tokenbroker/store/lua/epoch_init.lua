-- epoch_init: the broker's start creates the missing epochs (SET NX), so a fresh deployment
-- refuses nothing issued after the broker started. On a cluster one call covers the
-- epochs of every slot of one node: Redis wants a command's declared keys in one slot,
-- so only the first is in KEYS and the others (same node: allow-cross-slot-keys) in ARGV.
-- KEYS[1] an epoch  ARGV[1] epoch id  ARGV[2..] more epochs, on the node of KEYS[1]
-- Returns how many were created now.
local redis_now = redis_time()
local value = redis_now .. ' ' .. ARGV[1] .. ' ' .. redis_run_id()
local created = 0
local function init(key)
  if redis.call('SET', key, value, 'NX') then
    created = created + 1
  end
end
init(KEYS[1])
for i = 2, #ARGV do
  init(ARGV[i])
end
return created
