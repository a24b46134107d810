-- revoke_token: revokes one token by its jti until the token cannot be valid any more.
-- KEYS[1] the revoked-jti key (tagged by the jti itself, outside any client's slot)
-- ARGV[1] seconds to remember it
-- Returns 1 when revoked now, 0 when it already was.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
return 1
