"""State epochs: how the Redis store refuses what a lost state guarded.

Each slot's state has an epoch, "<start> <random id> <run_id>" (start in Redis seconds,
run_id the Redis process that wrote it), which the scripts read beside their other keys
(no extra round trip).

State loss, whole (FLUSHALL, a restart without persistence): the epoch key of a slot
vanishes with its state. When it is missing the scripts create it with start = Redis TIME,
and refuse what was issued (`issued_at`: a token's or an assertion's `iat`) before the
start: `check_token` answers SESSION_UNKNOWN, `remember` STALE. A record lost with the old
state therefore cannot be replayed: whatever it guarded predates the new epoch. The
broker's start creates missing epochs with SET NX (`epoch_init_op`), so a fresh
deployment refuses nothing issued after it started. Bound: this holds for issuers whose
clock is not ahead of Redis's; something issued d seconds "in the future" and used less
than d seconds before a loss could pass once more (d <= `max_clock_skew_seconds` for
brokers; for client assertions, their own leeway too).

State loss, partial (a crash after the last RDB snapshot, AOF with `appendfsync
everysec`, a failover to a replica that had not received the last writes): the epoch
survives, but it names the Redis process that wrote it (`run_id`, new at every start and
different on every replica). Every new connection (`EpochGuard`, before any other command
on it; a restarted or promoted Redis is only reached through new connections) compares
the epochs of the slots its node serves with the node's own run_id and starts them again
when they differ: everything issued before is refused once (tokens answer
SESSION_UNKNOWN, clients get new ones). The price: every Redis restart or failover, even
a lossless one, makes clients fetch new tokens."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from tokenbroker._core import random_id
from tokenbroker.store.redis_calls import Eval, Op
from tokenbroker.store.redis_connect import SyncClient, connection_address
from tokenbroker.store.redis_keys import epoch_key, slot_epoch_key, slot_tags
from tokenbroker.store.redis_replies import reply_text, reply_value
from tokenbroker.store.redis_scripts import script_text

log = logging.getLogger(__name__)


def epoch_init_op(client: SyncClient, prefix: str, *, cluster: bool, epoch_id: str) -> Op[int]:
    """Creates the missing epochs (SET NX): one on one Redis, one per slot on a cluster
    (one script call per node). Returns how many it created."""
    if not cluster:
        replies = yield [Eval("epoch_init", (epoch_key(prefix, "", cluster=False),), (epoch_id,))]
        return int(reply_value(replies[0]))
    cluster_client: Any = client  # a RedisCluster: it names the node of each key
    by_node: dict[str, list[str]] = {}
    for t in slot_tags():
        key = slot_epoch_key(prefix, t)
        by_node.setdefault(cluster_client.get_node_from_key(key).name, []).append(key)
    replies = yield [Eval("epoch_init", (keys[0],), (epoch_id, *keys[1:])) for keys in by_node.values()]
    return sum(int(reply_value(r)) for r in replies)


def _own_slots(cluster_nodes: str) -> list[int]:
    """The slots served by the node that answered CLUSTER NODES (its `myself` line)."""
    for line in cluster_nodes.splitlines():
        fields = line.split()
        if len(fields) > 8 and "myself" in fields[2].split(","):
            slots: list[int] = []
            for part in fields[8:]:
                if part.startswith("["):  # a slot being migrated or imported
                    continue
                low, _, high = part.partition("-")
                slots.extend(range(int(low), int(high or low) + 1))
            return slots
    return []


class EpochGuard:
    """Runs on every new connection, before any other command: when the epoch of a slot
    the node serves names another Redis process (`run_id`) than the one answering, the
    state was restored from a snapshot or AOF that may miss the last writes, or this is a
    replica promoted by a failover; either way revocations and replay records may be
    lost, so `epoch_restamp.lua` starts the epoch again and everything issued before now
    is refused (tokens answer SESSION_UNKNOWN once; clients get new ones). Every new
    connection to a restarted or promoted Redis is a new connection, so no command runs
    against its state before this."""

    def __init__(self, *, prefix: str, cluster: bool) -> None:
        self._prefix = prefix
        self._cluster = cluster
        self._script = script_text("epoch_restamp")
        self.epoch_id = random_id()
        self.restamped = 0  # epochs started again, for tests and the log

    def _keys(self, cluster_nodes: str | None) -> list[str]:
        if not self._cluster:
            return [epoch_key(self._prefix, "", cluster=False)]
        tags = slot_tags()
        return [slot_epoch_key(self._prefix, tags[slot]) for slot in _own_slots(cluster_nodes or "")]

    def _command(self, keys: list[str]) -> tuple[Any, ...]:
        return ("EVAL", self._script, 1, keys[0], self.epoch_id, *keys[1:])

    def _done(self, where: str, reply: object) -> None:
        count = int(reply_value(reply))
        if count:
            self.restamped += count
            log.warning(
                "Redis at %s is not the process that wrote its state epoch (a restart from a snapshot or AOF, or "
                "a failover): started the epoch again for %d slot(s); tokens and assertions issued before now are "
                "refused once",
                where,
                count,
            )

    def _slotless(self, connection: Any) -> RedisConnectionError:
        """A cluster node that serves no slot (a replica) holds no epoch to check, and a
        connection to it is not kept: kept, it would serve the node's slots unchecked once
        a failover promoted it (found by the chaos suite: a token from before a failover
        validated on the promoted replica). redis-py discards it and connects anew."""
        return RedisConnectionError(
            f"Redis Cluster node {connection_address(connection)} serves no slot (a replica): not used until it does"
        )

    def check(self, connection: Any) -> None:
        nodes = None
        if self._cluster:
            connection.send_command("CLUSTER", "NODES")
            nodes = reply_text(connection.read_response())
        keys = self._keys(nodes)
        if not keys:
            if self._cluster:
                raise self._slotless(connection)
            return
        connection.send_command(*self._command(keys))
        self._done(connection_address(connection), connection.read_response())

    async def acheck(self, connection: Any) -> None:
        nodes = None
        if self._cluster:
            await connection.send_command("CLUSTER", "NODES")
            nodes = reply_text(await connection.read_response())
        keys = self._keys(nodes)
        if not keys:
            if self._cluster:
                raise self._slotless(connection)
            return
        await connection.send_command(*self._command(keys))
        self._done(connection_address(connection), await connection.read_response())
