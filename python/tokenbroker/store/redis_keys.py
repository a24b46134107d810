"""Key names of the Redis store, so that every script touches keys of one cluster slot.

Key layout (`tb` is the prefix):

- `tb:{<client>}:session:<sid>`  hash: client_id, audience, created_at, expires_at (the
  current expiry), ends_at (the hard end), idle (seconds; absent: no idle end),
  last_seen_at, last_ip, seq, revoked (reason name); TTL = until expires_at (extended
  whenever an idle-ending session's expiry slides)
- `tb:{<client>}:sessions`       sorted set of the client's live session ids, scored by
  expires_at: a session is live only while it is a member (eviction removes it); it and
  the two keys below live until the hard end of the client's longest session
- `tb:{<client>}:continuations`  hash: SHA-256 of a continuation -> "<sid> <audience>",
  the session it continues while that one is live; entries of sessions that left the
  live set are pruned by `open_session` (at most about twice the limit are kept)
- `tb:{<client>}:order`          the same ids scored by `seq` (opening order, for eviction);
  `tb:{<client>}:seq` numbers the client's sessions
- `tb:{<client>}:ended`          sorted set of the client's evicted sessions, scored by seq:
  the last max_sessions of them keep their hash (SESSION_REVOKED); older ones are
  purged (hash and index deleted: SESSION_UNKNOWN), so a client holds O(max_sessions)
- `tb:{<client>}:revoked`        client revocation marker: every session with seq <= it is
  CLIENT_REVOKED (so `revoke_client` and `open_session` never read session hashes)
- `tb:{<client>}:records`        sorted set of the client's single-use records (replay
  records `p:<key>` and `remember()` values `a:<key>`), scored by expiry on Redis's clock
- `tb:{<client>}:nets`           detection: sorted set of the client's networks (/24, IPv6
  /48), scored by last seen (refreshed at most once an hour), at most
  network_history_max, those older than network_history_days dropped when one is added;
  TTL network_history_days, renewed when written
- `tb:{<client>}:watch`          detection hash: first (first observation with a network),
  n and b1..b64 (the breadth histogram), h0..h23 (usage hours); TTL as for nets
- `tb:{<client>}:res:<sid>`      detection: set of the resource digests the session
  touched, at most session_resources_max; TTL = until the session's hard end (so a
  revoked, evicted or purged session's set goes with its last possible use). The
  session's hash also holds detection fields: o, ow (origin network, its /16), oa (origin
  seen at), bc (requests in the burst window), lh (hour of its last observation), lr
  (resource of its last allowed request)
- `tb:sid:{<sid>}`               session id -> client id, for `revoke_session` only
- `tb:jti:{<jti>}`               revoked token id; TTL = until the token cannot be valid
- `tb:epoch` (one Redis) or `tb:epoch:{<t>}` (cluster: one per slot, `<t>` a short tag of
  that slot): the state epoch, "<start> <random id> <run_id>", start in Redis seconds,
  run_id the Redis process that wrote it

`<client>` is the client id with `%`, `{` and `}` percent-encoded (an empty id is `%`),
so a client id such as `a}b{c` can neither move its keys out of its own cluster slot nor
collide with another client's keys. On a cluster a state loss may hit one master only, so
each slot has its own epoch; the epoch tag of a slot hashes to that slot, so a script's
epoch key lives beside the client's keys.

Revoked jtis: `revoke_token` gets only a jti, which does not name the client, so revoked
jtis cannot live under the client's hash tag. On one Redis the jti key goes into the
`check_token` script's KEYS: a revoked token is refused before anything is recorded. On a
cluster it lives in its own slot (spread over the cluster instead of loading one slot) and
`check_jti` runs beside `check_token` in the same pipeline (the nodes are written to
concurrently: one round-trip time); it also refuses tokens older than the jti slot's epoch
(a revocation there may have been lost). The cluster's price: a revoked token's proof is
still recorded as used and its session's last_seen_at still moves (within the client's
quota) and an idle-ending session's expiry slides, and an observed validation's detection
state is updated (and a revoke_session finding revokes the session; its findings are not
reported), which refuses nothing that should pass."""

from __future__ import annotations

import binascii
import threading

from redis.crc import key_slot

SLOTS = 16384  # slots of a Redis Cluster

_slot_tags: list[str] = []
_slot_tags_lock = threading.Lock()


def tag(value: str) -> str:
    """The hash-tag body for `value`: `%`, `{`, `}` percent-encoded, never empty. Injective,
    and the result holds no brace, so the tag always ends where the value ends."""
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") or "%"


def slot_tags() -> list[str]:
    """For each cluster slot, a short string whose CRC16 (the cluster's key hash, as in
    redis-py's `redis.crc.key_slot`) falls in that slot. Computed once, on first use."""
    if not _slot_tags:
        with _slot_tags_lock:
            if not _slot_tags:
                found: list[str | None] = [None] * SLOTS
                missing, n = SLOTS, 0
                while missing:
                    text = format(n, "x")
                    slot = binascii.crc_hqx(text.encode(), 0) % SLOTS
                    if found[slot] is None:
                        found[slot] = text
                        missing -= 1
                    n += 1
                _slot_tags.extend(t for t in found if t is not None)
    return _slot_tags


def client_key(prefix: str, client_id: str, kind: str, ident: str = "") -> str:
    """`<prefix>:{<client>}:<kind>[:<id>]`: every key of one client shares its slot."""
    return f"{prefix}:{{{tag(client_id)}}}:{kind}" + (f":{ident}" if ident else "")


def own_key(prefix: str, kind: str, ident: str) -> str:
    """A key tagged by its own id (spread over the cluster): `<prefix>:<kind>:{<id>}`."""
    return f"{prefix}:{kind}:{{{tag(ident)}}}"


def slot_epoch_key(prefix: str, slot_tag: str) -> str:
    """The epoch of the cluster slot that `slot_tag` (one of `slot_tags()`) hashes to."""
    return f"{prefix}:epoch:{{{slot_tag}}}"


def epoch_key(prefix: str, key: str, *, cluster: bool) -> str:
    """The state epoch that `key`'s slot depends on: one per store on one Redis, one per
    slot on a cluster (tagged so that it hashes to `key`'s slot)."""
    if not cluster:
        return f"{prefix}:epoch"
    return slot_epoch_key(prefix, slot_tags()[key_slot(key.encode())])
