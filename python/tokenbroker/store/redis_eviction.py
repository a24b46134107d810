"""The eviction-policy guard: a Redis that may evict keys may evict revocations and replay
records, so the store refuses it.

Every new connection (start and every reconnect, each master of a cluster) reads
`maxmemory-policy`; unless it is `noeviction` (or the operator accepted the risk with
`allow_unsafe_eviction`), the connection is refused and every call fails closed with an
error that names the setting and the fix."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ResponseError

from tokenbroker.store.redis_connect import connection_address
from tokenbroker.store.redis_errors import UnsafeRedisError
from tokenbroker.store.redis_replies import reply_texts

log = logging.getLogger(__name__)

_SAFE_POLICY = "noeviction"


class EvictionGuard:
    """Runs on every new connection, after the handshake: reads `maxmemory-policy` and
    refuses the connection (`UnsafeRedisError`) unless it is `noeviction`, or the operator
    accepted eviction (`allow_unsafe`), or CONFIG is unavailable (managed Redis) and the
    operator stated the policy (`declared_policy`)."""

    def __init__(self, *, allow_unsafe: bool, declared_policy: str | None) -> None:
        self.allow_unsafe = allow_unsafe
        self.declared_policy = declared_policy
        self.checked = 0  # connections checked, for tests
        self._warned = False

    def verdict(self, where: str, reply: object) -> None:
        """Raises `UnsafeRedisError` unless the CONFIG GET `reply` (or its error) is safe."""
        self.checked += 1
        if isinstance(reply, ResponseError):  # CONFIG disabled or renamed
            if self.declared_policy == _SAFE_POLICY or self.allow_unsafe:
                return
            raise UnsafeRedisError(
                f"cannot read maxmemory-policy on Redis at {where} (CONFIG is disabled or renamed: {reply}); "
                f"if it is {_SAFE_POLICY}, state it with the setting redis_maxmemory_policy = "
                f'"{_SAFE_POLICY}", otherwise set it with `CONFIG SET maxmemory-policy {_SAFE_POLICY}` (or your '
                "provider's console); redis_allow_unsafe_eviction = true accepts lost revocations and replays"
            )
        # RESP2 answers [name, value]; RESP3 (and redis-py's parser on some versions) a map.
        if isinstance(reply, dict):
            reply = [x for pair in reply.items() for x in pair]
        policy = reply_texts(reply)[1] if isinstance(reply, list) and len(reply) == 2 else None
        if policy == _SAFE_POLICY:
            return
        if self.allow_unsafe:
            if not self._warned:
                self._warned = True
                log.warning(
                    "Redis at %s has maxmemory-policy %s: it may evict revocations and replay records "
                    "(accepted by redis_allow_unsafe_eviction)",
                    where,
                    policy,
                )
            return
        raise UnsafeRedisError(
            f"Redis at {where} has maxmemory-policy {policy!r}: it may evict revocations and replay records, "
            f"so the broker refuses to use it. Fix: `CONFIG SET maxmemory-policy {_SAFE_POLICY}` on every "
            "Redis master (and in redis.conf), or set redis_allow_unsafe_eviction = true to accept the risk"
        )

    def check(self, connection: Any) -> None:
        connection.send_command("CONFIG", "GET", "maxmemory-policy")
        try:
            reply: object = connection.read_response()
        except ResponseError as exc:
            reply = exc
        self.verdict(connection_address(connection), reply)

    async def acheck(self, connection: Any) -> None:
        await connection.send_command("CONFIG", "GET", "maxmemory-policy")
        try:
            reply: object = await connection.read_response()
        except ResponseError as exc:
            reply = exc
        self.verdict(connection_address(connection), reply)
