-- revoke_token: revokes one token by its jti until the token cannot be valid any more.
-- KEYS[1] the revoked-jti key (tagged by the jti itself, outside any client's slot)
-- ARGV[1] jti  ARGV[2] seconds to remember it  ARGV[3] revocation channel
-- Returns 1 when revoked now, 0 when it already was.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  return 0
end
redis.call('PUBLISH', ARGV[3], cjson.encode({kind = 'token', id = ARGV[1]}))
return 1
