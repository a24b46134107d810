"""The redis-py clients of the Redis store: short timeouts, one immediate retry, and
checks (`redis_eviction`, `redis_epochs`) run on every new connection before the store
uses it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from tokenbroker.store.redis_errors import STORE_ERRORS, unavailable

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


class ConnectionCheck(Protocol):
    """Runs on a new connection after its handshake, before any command of the store;
    raising refuses the connection."""

    def check(self, connection: Any) -> None: ...

    async def acheck(self, connection: Any) -> None: ...


def connection_address(connection: Any) -> str:
    """The connection's address, for messages an operator reads."""
    return f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')}"


def _hook_async_cluster(client: Any, hook: Callable[[Any], Awaitable[None]]) -> None:
    """redis-py's asyncio cluster takes no `redis_connect_func`: set it where its nodes
    copy their connection settings from (the way redis-py itself adds per-connection
    handlers), so every node connection, startup nodes included, runs `hook`."""
    client.nodes_manager.connection_kwargs["redis_connect_func"] = hook
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_kwargs["redis_connect_func"] = hook


def connect(
    url: str,
    *,
    cluster: bool,
    timeout: float,
    read_timeout: float,
    checks: Sequence[ConnectionCheck],
) -> tuple[SyncClient, AsyncClient]:
    """The sync and asyncio clients for `url` (with `cluster`, any node of a Redis
    Cluster). Connecting times out after `timeout` seconds, reading after `read_timeout`;
    a broken connection is retried once at once, so a dead Redis fails a call within about
    a second, and redis-py reconnects when Redis is back. Every new connection runs
    `checks`, in order. Raises `StoreUnavailableError`."""

    def run_checks(connection: Any) -> None:
        for check in checks:
            check.check(connection)

    def sync_connect(connection: Any) -> None:
        connection.on_connect()
        run_checks(connection)

    async def async_connect(connection: Any) -> None:
        await connection.on_connect()
        for check in checks:
            await check.acheck(connection)

    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": read_timeout,
        "socket_connect_timeout": timeout,
    }
    sync_retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    async_retry = redis.asyncio.retry.Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    client: SyncClient
    async_client: AsyncClient
    try:
        if cluster:
            # The cluster client calls its own handshake first, then this (its user hook).
            client = redis.cluster.RedisCluster.from_url(
                url, retry=sync_retry, redis_connect_func=run_checks, **options
            )
            async_client = redis.asyncio.cluster.RedisCluster.from_url(url, retry=async_retry, **options)
            _hook_async_cluster(async_client, async_connect)
        else:
            client = redis.Redis.from_url(url, retry=sync_retry, redis_connect_func=sync_connect, **options)
            async_client = redis.asyncio.Redis.from_url(
                url, retry=async_retry, redis_connect_func=async_connect, **options
            )
    except STORE_ERRORS as exc:
        raise unavailable("connect", exc) from exc
    return client, async_client
