"""The calls a Redis store operation makes, and the round trip that carries a batch of them.

An operation is written once for both clients, as a generator (`Op`): it yields batches of
calls (one round trip each), receives their replies (a value or the exception of that
call) and returns. `RoundTrips` sends a batch: a single script through its `Script`
(NOSCRIPT handled by redis-py), anything more as one pipeline, reloading the scripts after
NOSCRIPT (a restarted Redis). On a cluster, redis-py's cluster pipeline groups the
commands by node and writes to every node before reading; it refuses `pipe.evalsha()` by
name, so scripts are queued as raw `EVALSHA` commands, routed by the slot of their keys.

Replicas: with `min_replicas` > 0, batches that write security state end with `WAIT
min_replicas timeout` (in the same pipeline: one round trip) and fail closed when fewer
replicas acknowledged. With 0, a failover to a lagging replica loses the writes it had
not received (revocations, replay and assertion records, session evictions); the epoch
guard then refuses everything issued before the failover, so what is lost cannot be
replayed, at the price of every client fetching a new token. `min_replicas` makes
acknowledged writes survive a failover; the guard is still what catches a restore from an
older snapshot."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator
from typing import Any, NamedTuple, TypeVar

import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import NoScriptError, SlotNotCoveredError

from tokenbroker.errors import StoreUnavailableError
from tokenbroker.store.redis_connect import AsyncClient, SyncClient
from tokenbroker.store.redis_replies import reply_value
from tokenbroker.store.redis_scripts import SCRIPT_NAMES, script_text

T = TypeVar("T")

_WRITES = frozenset({"SET", "DEL"})  # commands that write security state (scripts always do)


class Eval(NamedTuple):
    """One run of the store's script `script` (a name of `SCRIPT_NAMES`)."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


class Command(NamedTuple):
    """One plain Redis command."""

    args: tuple[str | int, ...]
    route: str = ""  # a key of the node to send a keyless command (WAIT) to


Call = Eval | Command
Op = Generator[list[Call], list[Any], T]


def _first_key(call: Call) -> str:
    if isinstance(call, Eval):
        return call.keys[0]
    return call.route or str(call.args[1])


def _is_write(call: Call) -> bool:
    return isinstance(call, Eval) or str(call.args[0]).upper() in _WRITES


def _noscript(batch: list[Call], replies: list[Any]) -> tuple[list[int], set[str]]:
    """Which calls of `batch` met NOSCRIPT (Redis lost its scripts), and their scripts."""
    missing = [i for i, reply in enumerate(replies[: len(batch)]) if isinstance(reply, NoScriptError)]
    return missing, {c.script for i in missing if isinstance(c := batch[i], Eval)}


class RoundTrips:
    """Sends batches of calls on the store's clients, one round trip each, and waits for
    `min_replicas` replicas after writes (within `replica_timeout_ms`)."""

    def __init__(
        self,
        client: SyncClient,
        async_client: AsyncClient | None,
        *,
        min_replicas: int,
        replica_timeout_ms: int,
    ) -> None:
        self._client = client
        self._aclient = async_client
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self._min_replicas = min_replicas
        self._replica_timeout_ms = replica_timeout_ms
        self._texts = {name: script_text(name) for name in SCRIPT_NAMES}
        self._scripts = {name: client.register_script(text) for name, text in self._texts.items()}
        self._ascripts = (
            {name: async_client.register_script(text) for name, text in self._texts.items()}
            if async_client is not None
            else {}
        )
        self._refresh_lock = threading.Lock()
        self._refreshes = 0  # sync topology refreshes done: waiters reuse the last one's outcome
        self._arefresh: asyncio.Future[Any] | None = None

    # Routing by hand (scripts to their slot's node, WAIT to the node written) asks the
    # cluster client's slot table directly. When a master fails, redis-py drops its slots
    # from that table and reads the topology again only inside its own command retries,
    # which a pipeline routed by hand never reaches: the slots stayed uncovered for good
    # (found by the chaos suite: after a failover the HTTP door, on the asyncio client,
    # answered 503 until restarted). So an uncovered slot reads the topology once more,
    # one refresh at a time however many calls meet it; still uncovered, it fails closed.

    def _node(self, key: str) -> Any:
        client: Any = self._client
        try:
            return client.get_node_from_key(key)
        except SlotNotCoveredError:
            seen = self._refreshes
            with self._refresh_lock:
                if self._refreshes == seen:  # nobody refreshed while this thread waited
                    try:
                        client.nodes_manager.initialize()
                    finally:
                        self._refreshes += 1
            # Refreshed (by this thread or another, failed or not): still uncovered, fail.
            return client.get_node_from_key(key)

    async def _anode(self, key: str) -> Any:
        aclient: Any = self._aclient
        try:
            return aclient.get_node_from_key(key)
        except SlotNotCoveredError:
            if self._arefresh is None or self._arefresh.done():
                self._arefresh = asyncio.ensure_future(aclient.nodes_manager.initialize())
            await asyncio.shield(self._arefresh)
            return aclient.get_node_from_key(key)

    def _written_keys(self, batch: list[Call]) -> list[str]:
        """A key of each write of `batch` that must be waited for ([] when none must)."""
        if not self._min_replicas:
            return []
        return [_first_key(c) for c in batch if _is_write(c)]

    def _wait_calls(self, keys_by_node: dict[str, str]) -> list[Call]:
        wait = ("WAIT", self._min_replicas, self._replica_timeout_ms)
        return [Command(wait, route=key) for key in keys_by_node.values()]

    def _waits(self, batch: list[Call]) -> list[Call]:
        """`WAIT min_replicas timeout` after the writes of `batch`: one per node written,
        by the sync client's slot table (the one that routes them)."""
        keys = self._written_keys(batch)
        if not keys:
            return []
        if not self._cluster:
            return [Command(("WAIT", self._min_replicas, self._replica_timeout_ms))]
        nodes: dict[str, str] = {}
        for key in keys:
            nodes.setdefault(self._node(key).name, key)
        return self._wait_calls(nodes)

    async def _awaits(self, batch: list[Call]) -> list[Call]:
        """`_waits` for the asyncio client: grouped by its own slot table, the one that
        routes the writes (grouped by the sync client's, a node whose slots the two
        tables disagree on could get no WAIT), and never refreshing on the event loop
        with the sync client."""
        keys = self._written_keys(batch)
        if not keys:
            return []
        if not self._cluster:
            return [Command(("WAIT", self._min_replicas, self._replica_timeout_ms))]
        nodes: dict[str, str] = {}
        for key in keys:
            nodes.setdefault((await self._anode(key)).name, key)
        return self._wait_calls(nodes)

    def _acknowledged(self, replies: list[Any]) -> None:
        """Fails closed when a WAIT saw fewer replicas than `min_replicas`."""
        for reply in replies:
            count = int(reply_value(reply))
            if count < self._min_replicas:
                raise StoreUnavailableError(
                    f"Redis store refused a write: only {count} of {self._min_replicas} replicas acknowledged it "
                    f"within {self._replica_timeout_ms} ms (setting redis_min_replicas): check the replicas' "
                    "health and replication lag, or raise redis_replica_timeout_ms"
                )

    def _merged(self, batch: list[Call], replies: list[Any], missing: list[int], retried: list[Any]) -> list[Any]:
        """The replies of `batch`: those of the `missing` calls from their retry, after
        every WAIT of both round trips saw enough replicas."""
        for i, reply in zip(missing, retried, strict=False):
            replies[i] = reply
        self._acknowledged(retried[len(missing) :])
        self._acknowledged(replies[len(batch) :])
        return replies[: len(batch)]

    def send(self, batch: list[Call]) -> list[Any]:
        """One round trip on the sync client: the replies of `batch`, in order."""
        waits = self._waits(batch)
        if len(batch) == 1 and not waits:
            call = batch[0]
            if isinstance(call, Eval):
                return [self._scripts[call.script](keys=call.keys, args=call.args)]
            client: Any = self._client
            return [client.execute_command(*call.args)]
        replies = self._pipeline(batch + waits)
        missing, names = _noscript(batch, replies)
        retried: list[Any] = []
        if missing:
            for name in names:
                self._scripts[name].sha = self._client.script_load(self._texts[name])
            again = [batch[i] for i in missing]
            retried = self._pipeline(again + self._waits(again))
        return self._merged(batch, replies, missing, retried)

    def _pipeline(self, batch: list[Call]) -> list[Any]:
        client: Any = self._client
        pipe: Any = client.pipeline(transaction=False)
        for call in batch:
            # redis-py's sync cluster pipeline asks the server (COMMAND GETKEYS) where each
            # EVALSHA goes unless told: name the node of its slot (MOVED still redirects).
            route = {"target_nodes": self._node(_first_key(call))} if self._cluster else {}
            if isinstance(call, Eval):
                sha = self._scripts[call.script].sha
                pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args, **route)
            else:
                pipe.execute_command(*call.args, **route)
        return list(pipe.execute(raise_on_error=False))

    async def asend(self, batch: list[Call]) -> list[Any]:
        """`send` on the asyncio client (the store has one whenever it calls this)."""
        assert self._aclient is not None
        waits = await self._awaits(batch)
        if len(batch) == 1 and not waits:
            call = batch[0]
            if isinstance(call, Eval):
                return [await self._ascripts[call.script](keys=call.keys, args=call.args)]
            return [await self._aclient.execute_command(*call.args)]
        replies = await self._apipeline(batch + waits)
        missing, names = _noscript(batch, replies)
        retried: list[Any] = []
        if missing:
            for name in names:
                self._ascripts[name].sha = await self._aclient.script_load(self._texts[name])
            again = [batch[i] for i in missing]
            retried = await self._apipeline(again + await self._awaits(again))
        return self._merged(batch, replies, missing, retried)

    async def _apipeline(self, batch: list[Call]) -> list[Any]:
        assert self._aclient is not None
        aclient: Any = self._aclient
        cluster = isinstance(aclient, redis.asyncio.cluster.RedisCluster)
        pipe: Any = aclient.pipeline(transaction=False)
        for call in batch:
            if isinstance(call, Eval):
                sha = self._ascripts[call.script].sha
                pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
            elif cluster and call.route:  # a keyless command (WAIT) goes to its key's node
                pipe.execute_command(*call.args, target_nodes=await self._anode(call.route))
            else:
                pipe.execute_command(*call.args)
        return list(await pipe.execute(raise_on_error=False))
