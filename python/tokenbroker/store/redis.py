"""`RedisStore`: sessions, revocations and replay records shared by several broker
replicas, in one Redis or a Redis Cluster. Same semantics as `MemoryStore`.

Key layout (`tb` is the prefix):

- `tb:{<client>}:session:<sid>`  hash: client_id, audience, created_at, expires_at,
  last_seen_at, last_ip, seq, revoked (reason name); TTL = the session's lifetime
- `tb:{<client>}:sessions`       sorted set of the client's live session ids, scored by
  expires_at: a session is live only while it is a member (eviction removes it)
- `tb:{<client>}:order`          the same ids scored by `seq` (opening order, for eviction);
  `tb:{<client>}:seq` numbers the client's sessions
- `tb:{<client>}:ended`          sorted set of the client's evicted sessions, scored by seq:
  the last max_sessions of them keep their hash (SESSION_REVOKED); older ones are
  purged (hash and index deleted: SESSION_UNKNOWN), so a client holds O(max_sessions)
- `tb:{<client>}:revoked`        client revocation marker: every session with seq <= it is
  CLIENT_REVOKED (so `revoke_client` and `open_session` never read session hashes)
- `tb:{<client>}:records`        sorted set of the client's single-use records (replay
  records `p:<key>` and `remember()` values `a:<key>`), scored by expiry on Redis's clock
- `tb:sid:{<sid>}`               session id -> client id, for `revoke_session` only
- `tb:jti:{<jti>}`               revoked token id; TTL = until the token cannot be valid
- `tb:epoch` (one Redis) or `tb:epoch:{<t>}` (cluster: one per slot, `<t>` a short tag of
  that slot): the state epoch, "<start> <random id> <run_id>", start in Redis seconds,
  run_id the Redis process that wrote it

`<client>` is the client id with `%`, `{` and `}` percent-encoded (an empty id is `%`),
so a client id such as `a}b{c` can neither move its keys out of its own cluster slot nor
collide with another client's keys. Every script touches only keys of one slot and gets
them all through KEYS; scripts are registered once with `register_script` and reloaded
after NOSCRIPT (a restarted Redis) in pipelines too. Scripts carry a `#!lua` shebang, so
an out-of-memory Redis refuses them before they write anything (fail closed).

State loss, whole (FLUSHALL, a restart without persistence): the epoch key of a slot
vanishes with its state. Scripts read it beside their other keys (no
extra round trip); when it is missing they create it with start = Redis TIME, and refuse
what was issued (`issued_at`: a token's or an assertion's `iat`) before the start:
`check_token` answers SESSION_UNKNOWN, `remember` STALE. A record lost with the old state
therefore cannot be replayed: whatever it guarded predates the new epoch. `prepare()`
(the broker's start) creates missing epochs with SET NX, so a fresh deployment refuses
nothing issued after it started. Bound: this holds for issuers whose clock is not ahead of
Redis's; something issued d seconds "in the future" and used less than d seconds before a
loss could pass once more (d <= `max_clock_skew_seconds` for brokers; for client
assertions, their own leeway too). On a cluster a loss may hit one master only, so each
slot has its own epoch; the epoch tag of a slot hashes to that slot, so a script's epoch
key lives beside the client's keys.

State loss, partial (a crash after the last RDB snapshot, AOF with `appendfsync
everysec`, a failover to a replica that had not received the last writes): the epoch
survives, but it names the Redis process that wrote it (`run_id`, new at every start and
different on every replica). Every new connection (`_EpochGuard`, before any other
command on it; a restarted or promoted Redis is only reached through new connections)
compares the epochs of the slots its node serves with the node's own run_id and starts
them again when they differ: everything issued before is refused once (tokens answer
SESSION_UNKNOWN, clients get new ones). The price: every Redis restart or failover,
even a lossless one, makes clients fetch new tokens.

Revoked jtis: `revoke_token` gets only a jti, which does not name the client, so revoked
jtis cannot live under the client's hash tag. On one Redis the jti key goes into the
`check_token` script's KEYS: a revoked token is refused before anything is recorded. On a
cluster it lives in its own slot (spread over the cluster instead of loading one slot) and
`check_jti` runs beside `check_token` in the same pipeline (the nodes are written to
concurrently: one round-trip time); it also refuses tokens older than the jti slot's epoch
(a revocation there may have been lost). The cluster's price: a revoked token's proof is
still recorded as used and its session's last_seen_at still moves (within the client's
quota), which refuses nothing that should pass.

Clock skew: replay records expire at `until + max_clock_skew_seconds` on Redis's clock
(`TIME` inside the script; Redis 7 replicates script effects), not at a TTL computed from
the calling broker's clock. A replica whose clock is up to `max_clock_skew_seconds` behind
accepts a proof at most until `until` on its own clock, while the record is still live.
`observed_clock_skew` is Redis time minus broker time from the last script reply.

Per-client bounds: a client's records count against `max_records_per_client`; over it,
`check_token` answers REPLAY_CACHE_FULL and `remember` FULL for that client only.

Eviction and failover: every new connection (start and every reconnect, each master of a
cluster) reads `maxmemory-policy`; unless it is `noeviction` (or the operator accepted the
risk with `allow_unsafe_eviction`), the connection is refused and every call fails closed
with an error that names the setting and the fix. With `min_replicas` > 0, batches that
write security state end with `WAIT min_replicas timeout` (in the same pipeline: one round
trip) and fail closed when fewer replicas acknowledged. With 0, a failover to a lagging
replica loses the writes it had not received (revocations, replay and assertion records,
session evictions); the epoch guard then refuses everything issued before the failover,
so what is lost cannot be replayed, at the price of every client fetching a new token.
`min_replicas` makes acknowledged writes survive a failover; the guard is still what
catches a restore from an older snapshot.

Batches: `check_tokens`/`acheck_tokens` send N validations as one pipeline (one round trip
for N). Concurrent `check_token` calls from threads (the sync gRPC server's workers) and
concurrent `acheck_token` calls coalesce: while one pipeline is in flight, new calls
wait in a bounded queue and go together in the next one; each caller gets its own answer
or exception. On a cluster, redis-py's cluster pipeline groups the commands by node and
writes to every node before reading; it refuses `pipe.evalsha()` by name, so scripts are
queued as raw `EVALSHA` commands, which it routes by the slot of their keys.

Revocations are published on `revocation_channel` as JSON `{"kind": "session" | "client" |
"token", "id": ...}` so other replicas can drop cached decisions (`subscribe_revocations`).
Validation never relies on that message: every check reads Redis, so a revocation applies
on every replica at once.

Fail closed: any Redis error, timeout or connection failure raises `StoreUnavailableError`
naming the operation (never a token), never an OK answer."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import inspect
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
from redis.backoff import NoBackoff
from redis.client import PubSubWorkerThread
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from tokenbroker import _core
from tokenbroker.errors import (
    InvalidArgumentError,
    SessionLimitExceededError,
    SessionNotFoundError,
    StoreUnavailableError,
    TokenBrokerError,
)
from tokenbroker.models import Session, SessionLimit
from tokenbroker.reason import Reason
from tokenbroker.store.base import Remembered, ReplayRecord

__all__ = ["RedisStore", "Revocation", "RevocationSubscription"]

log = logging.getLogger(__name__)

T = TypeVar("T")
SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

# What a Redis call can raise when Redis is down, slow or answers nonsense.
_STORE_ERRORS: tuple[type[Exception], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    UnicodeError,
    ValueError,
    IndexError,
)
_SCRIPTS = (
    "open_session",
    "continue_session",
    "check_token",
    "check_jti",
    "remember",
    "epoch_init",
    "epoch_restamp",
    "revoke_session",
    "revoke_client",
    "revoke_token",
)
# Redis 7 script flags, after `#!lua`: these two take every epoch of one node at once.
_FLAGS = {"epoch_init": " flags=allow-cross-slot-keys", "epoch_restamp": " flags=allow-cross-slot-keys"}
_SLOTS = 16384
_SAFE_POLICY = "noeviction"
_WRITES = frozenset({"SET", "DEL"})  # commands that write security state (scripts always do)
_SESSION_FIELDS = ("client_id", "audience", "created_at", "expires_at", "last_seen_at", "last_ip", "revoked", "seq")
_STATE_REASONS = frozenset({Reason.SESSION_UNKNOWN, Reason.SESSION_REVOKED, Reason.CLIENT_REVOKED})
_slot_tags: list[str] = []
_slot_tags_lock = threading.Lock()


def slot_tags() -> list[str]:
    """For each cluster slot, a short string whose CRC16 (the cluster's key hash, as in
    redis-py's `redis.crc.key_slot`) falls in that slot. Computed once, on first use."""
    if not _slot_tags:
        with _slot_tags_lock:
            if not _slot_tags:
                found: list[str | None] = [None] * _SLOTS
                missing, n = _SLOTS, 0
                while missing:
                    text = format(n, "x")
                    slot = binascii.crc_hqx(text.encode(), 0) % _SLOTS
                    if found[slot] is None:
                        found[slot] = text
                        missing -= 1
                    n += 1
                _slot_tags.extend(t for t in found if t is not None)
    return _slot_tags


class UnsafeRedisError(RedisError):
    """The Redis server may lose security state (eviction on): the store refuses it.
    Raised while connecting, so no command runs on such a connection."""


def tag(value: str) -> str:
    """The hash-tag body for `value`: `%`, `{`, `}` percent-encoded, never empty. Injective,
    and the result holds no brace, so the tag always ends where the value ends."""
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") or "%"


@dataclass(frozen=True, slots=True)
class Revocation:
    """A published revocation: `kind` is "session", "client" or "token"; `id` what was revoked."""

    kind: str
    id: str


class _Eval(NamedTuple):
    script: str
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


class _Command(NamedTuple):
    args: tuple[str | int, ...]
    route: str = ""  # a key of the node to send a keyless command (WAIT) to


_Call = _Eval | _Command
# An operation written once for both clients: it yields batches of calls (one round trip
# each), receives their replies (a value or the exception of that call) and returns.
_Op = Generator[list[_Call], list[Any], T]


class _CheckRequest(NamedTuple):
    client_id: str
    session_id: str
    audience: str
    jti: str
    issued_at: int
    client_ip: str
    replay: tuple[ReplayRecord, ...]
    now: int


class _ReplyError(Exception):
    """A call in a batch failed; the driver turns it into `StoreUnavailableError`."""


# What reading one validation's replies can raise: Redis down, or a reply we cannot read.
_REPLY_ERRORS: tuple[type[Exception], ...] = (*_STORE_ERRORS, KeyError, _ReplyError)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise _ReplyError(f"unexpected reply type {type(value).__name__}")


def _texts(reply: object) -> list[str]:
    """A script's array reply as text (numbers included)."""
    if not isinstance(reply, list):
        raise _ReplyError(f"unexpected reply type {type(reply).__name__}")
    return [str(x) if isinstance(x, int) else _text(x) for x in reply]


def _first_key(call: _Eval | _Command) -> str:
    if isinstance(call, _Eval):
        return call.keys[0]
    return call.route or str(call.args[1])


def _is_write(call: _Call) -> bool:
    return isinstance(call, _Eval) or str(call.args[0]).upper() in _WRITES


def _value(reply: object) -> Any:
    if isinstance(reply, BaseException):
        raise _ReplyError(type(reply).__name__) from reply
    return reply


def _is_subscribed(message: Mapping[str, Any] | None) -> bool:
    return message is not None and message.get("type") in ("subscribe", b"subscribe")


def _cause(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`exc` or the first exception of that kind in its chain (pipelines wrap errors)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, kind):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _unavailable(operation: str, exc: BaseException | None = None) -> StoreUnavailableError:
    unsafe = _cause(exc, UnsafeRedisError)
    if unsafe is not None:  # its message names the setting and the fix, never a token
        return StoreUnavailableError(f"Redis store refused during {operation}: {unsafe}")
    if _cause(exc, OutOfMemoryError) is not None:
        return StoreUnavailableError(
            f"Redis store unavailable during {operation}: Redis is out of memory (maxmemory reached under "
            "noeviction), so nothing is recorded and nothing is accepted: raise maxmemory or add memory"
        )
    why = f" ({type(exc).__name__})" if exc is not None else ""
    return StoreUnavailableError(f"Redis store unavailable during {operation}{why}: check that Redis is reachable")


class _EvictionGuard:
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
        policy = _texts(reply)[1] if isinstance(reply, list) and len(reply) == 2 else None
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

    @staticmethod
    def _where(connection: Any) -> str:
        return f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')}"

    def check(self, connection: Any) -> None:
        connection.send_command("CONFIG", "GET", "maxmemory-policy")
        try:
            reply: object = connection.read_response()
        except ResponseError as exc:
            reply = exc
        self.verdict(self._where(connection), reply)

    async def acheck(self, connection: Any) -> None:
        await connection.send_command("CONFIG", "GET", "maxmemory-policy")
        try:
            reply: object = await connection.read_response()
        except ResponseError as exc:
            reply = exc
        self.verdict(self._where(connection), reply)


def _hook_async_cluster(client: Any, hook: Callable[[Any], Awaitable[None]]) -> None:
    """redis-py's asyncio cluster takes no `redis_connect_func`: set it where its nodes
    copy their connection settings from (the way redis-py itself adds per-connection
    handlers), so every node connection, startup nodes included, runs `hook`."""
    client.nodes_manager.connection_kwargs["redis_connect_func"] = hook
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_kwargs["redis_connect_func"] = hook


def script_text(name: str) -> str:
    """A script as the store sends it: the `#!lua` line (with its flags), the shared
    prelude, then the script's own file."""
    package = resources.files("tokenbroker.store")
    prelude = package.joinpath("lua", "_prelude.lua").read_text()
    return f"#!lua{_FLAGS.get(name, '')}\n{prelude}\n{package.joinpath('lua', f'{name}.lua').read_text()}"


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


class _EpochGuard:
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
        self._text = script_text("epoch_restamp")
        self.epoch_id = _core.random_id()
        self.restamped = 0  # epochs started again, for tests and the log

    def _keys(self, cluster_nodes: str | None) -> list[str]:
        if not self._cluster:
            return [f"{self._prefix}:epoch"]
        tags = slot_tags()
        return [f"{self._prefix}:epoch:{{{tags[slot]}}}" for slot in _own_slots(cluster_nodes or "")]

    def _command(self, keys: list[str]) -> tuple[Any, ...]:
        return ("EVAL", self._text, 1, keys[0], self.epoch_id, *keys[1:])

    def _done(self, where: str, reply: object) -> None:
        count = int(_value(reply))
        if count:
            self.restamped += count
            log.warning(
                "Redis at %s is not the process that wrote its state epoch (a restart from a snapshot or AOF, or "
                "a failover): started the epoch again for %d slot(s); tokens and assertions issued before now are "
                "refused once",
                where,
                count,
            )

    def check(self, connection: Any) -> None:
        nodes = None
        if self._cluster:
            connection.send_command("CLUSTER", "NODES")
            nodes = _text(connection.read_response())
        keys = self._keys(nodes)
        if not keys:  # a cluster node that serves no slot holds no epoch
            return
        connection.send_command(*self._command(keys))
        self._done(_EvictionGuard._where(connection), connection.read_response())

    async def acheck(self, connection: Any) -> None:
        nodes = None
        if self._cluster:
            await connection.send_command("CLUSTER", "NODES")
            nodes = _text(await connection.read_response())
        keys = self._keys(nodes)
        if not keys:
            return
        await connection.send_command(*self._command(keys))
        self._done(_EvictionGuard._where(connection), await connection.read_response())


class RevocationSubscription:
    """A running revocation listener; `stop()` (or `await astop()`) ends it."""

    def __init__(self, thread: PubSubWorkerThread | None = None, task: asyncio.Task[None] | None = None) -> None:
        self._thread = thread
        self._task = task

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread.join(timeout)
        if self._task is not None:
            self._task.cancel()

    async def astop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._thread is not None:
            await asyncio.to_thread(self.stop)


class _CheckCoalescer:
    """Sends concurrent `acheck_token` calls together: one pipeline is in flight at a time;
    calls that arrive meanwhile queue (at most `max_pending`) and go in the next pipeline
    (at most `max_batch` each). Every caller gets its own answer or exception."""

    def __init__(
        self,
        send: Callable[[list[_CheckRequest]], Awaitable[list[Reason | StoreUnavailableError]]],
        *,
        max_batch: int,
        max_pending: int,
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._pending: deque[tuple[_CheckRequest, asyncio.Future[Reason]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()
        self.pipelines = 0  # pipelines sent, for tests and metrics

    async def check(self, request: _CheckRequest) -> Reason:
        if len(self._pending) >= self._max_pending:
            raise StoreUnavailableError(
                f"Redis store overloaded during check_token: {self._max_pending} validations already wait for Redis"
            )
        future: asyncio.Future[Reason] = self.loop.create_future()
        self._pending.append((request, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = self.loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        batch: list[tuple[_CheckRequest, asyncio.Future[Reason]]] = []
        try:
            while self._pending:
                count = min(len(self._pending), self._max_batch)
                batch = [self._pending.popleft() for _ in range(count)]
                batch = [(r, f) for r, f in batch if not f.done()]  # callers that gave up
                if not batch:
                    continue
                self.pipelines += 1
                try:
                    results: list[Reason | StoreUnavailableError] = await self._send([r for r, _ in batch])
                except StoreUnavailableError as exc:
                    results = [StoreUnavailableError(*exc.args) for _ in batch]  # one error per caller
                except Exception as exc:  # a bug: still refuse rather than hang
                    results = [_unavailable("check_token", exc) for _ in batch]
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, StoreUnavailableError):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        except BaseException:
            # Cancelled (the loop is shutting down): nobody may wait forever.
            for _, future in [*batch, *self._pending]:
                if not future.done():
                    future.set_exception(_unavailable("check_token"))
            self._pending.clear()
            raise


class _Waiter:
    __slots__ = ("done", "event", "lead", "request", "result")

    def __init__(self, request: _CheckRequest) -> None:
        self.request = request
        self.event = threading.Event()
        self.lead = False  # told to send the next pipeline
        self.done = False
        self.result: Reason | StoreUnavailableError = Reason.UNSPECIFIED


class _ThreadCheckCoalescer:
    """The thread twin of `_CheckCoalescer`, for the sync gRPC server's worker threads.
    A caller that finds no pipeline in flight leads: it sends the queued checks (at most
    `max_batch`) as one pipeline, answers each, then hands the lead to the oldest waiter
    still queued, so no thread keeps flushing for the others. Every caller gets its own
    answer or exception; past `max_pending` queued checks callers are refused at once."""

    def __init__(
        self,
        send: Callable[[list[_CheckRequest]], list[Reason | StoreUnavailableError]],
        *,
        max_batch: int,
        max_pending: int,
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: deque[_Waiter] = deque()
        self._leading = False
        self.pipelines = 0  # pipelines sent, for tests and metrics

    def check(self, request: _CheckRequest) -> Reason:
        waiter = _Waiter(request)
        with self._lock:
            if len(self._pending) >= self._max_pending:
                raise StoreUnavailableError(
                    f"Redis store overloaded during check_token: {self._max_pending} validations already wait for Redis"
                )
            self._pending.append(waiter)
            if not self._leading:
                self._leading = waiter.lead = True
        while True:
            if waiter.lead:
                waiter.lead = False
                self._lead_once()
            if not waiter.done:
                waiter.event.wait()
                waiter.event.clear()
            if waiter.done:
                if isinstance(waiter.result, StoreUnavailableError):
                    raise waiter.result
                return waiter.result

    def _lead_once(self) -> None:
        with self._lock:
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), self._max_batch))]
        try:
            self.pipelines += 1
            try:
                results = self._send([w.request for w in batch])
            except StoreUnavailableError as exc:
                results = [StoreUnavailableError(*exc.args) for _ in batch]  # one error per caller
            except Exception as exc:  # a bug: still refuse rather than hang
                results = [_unavailable("check_token", exc) for _ in batch]
            for waiter, result in zip(batch, results, strict=True):
                waiter.result, waiter.done = result, True
                waiter.event.set()
        finally:
            with self._lock:
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                    successor.event.set()
                else:
                    self._leading = False


class RedisStore:
    """The `Store` for several broker replicas sharing one Redis or Redis Cluster.

    `client` is a `redis.Redis` or `redis.cluster.RedisCluster`; `async_client` its asyncio
    twin (without one, the `a*` methods run the sync ones in a worker thread).
    `RedisStore.from_url(url, cluster=...)` builds both with short timeouts. See the module
    docstring for the key layout, the revoked-jti trade-off, batching and fail-closed."""

    def __init__(
        self,
        client: SyncClient,
        *,
        async_client: AsyncClient | None = None,
        prefix: str = "tb",
        revocation_channel: str = "tb:revocations",
        max_batch: int = 512,
        max_pending_checks: int = 10_000,
        max_records_per_client: int = 500_000,
        max_clock_skew_seconds: int = 30,
        min_replicas: int = 0,
        replica_timeout_ms: int = 100,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise InvalidArgumentError("prefix must be non-empty and hold no '{' or '}' (they would move hash tags)")
        if max_batch < 1 or max_pending_checks < 1 or max_records_per_client < 1:
            raise InvalidArgumentError("max_batch, max_pending_checks and max_records_per_client must be positive")
        if max_clock_skew_seconds < 0 or min_replicas < 0 or replica_timeout_ms < 1:
            raise InvalidArgumentError(
                "max_clock_skew_seconds and min_replicas must be >= 0 and replica_timeout_ms >= 1"
            )
        self._client = client
        self._aclient = async_client
        self.prefix = prefix
        self.revocation_channel = revocation_channel
        self._max_batch = max_batch
        self._max_pending = max_pending_checks
        self.max_records_per_client = max_records_per_client
        self.max_clock_skew_seconds = max_clock_skew_seconds
        self.min_replicas = min_replicas
        self.replica_timeout_ms = replica_timeout_ms
        # Written into epochs this store creates: tells one epoch from the next in Redis.
        self._epoch_id = _core.random_id()
        self._ready = False  # prepare() succeeded: epochs exist (retried by the first call otherwise)
        self._ready_lock = threading.Lock()
        self.observed_clock_skew: int | None = None  # Redis time - broker time, last script reply
        self.eviction_guard: _EvictionGuard | None = None  # set by from_url
        self.epoch_guard: _EpochGuard | None = None  # set by from_url
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self._texts = {name: script_text(name) for name in _SCRIPTS}
        self._scripts = {name: client.register_script(text) for name, text in self._texts.items()}
        self._ascripts = (
            {name: async_client.register_script(text) for name, text in self._texts.items()}
            if async_client is not None
            else {}
        )
        self._coalescer: _CheckCoalescer | None = None
        self._thread_coalescer = _ThreadCheckCoalescer(
            lambda requests: self._run("check_token", self._checks_op(requests)),
            max_batch=max_batch,
            max_pending=max_pending_checks,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        timeout: float = 0.5,
        prefix: str = "tb",
        revocation_channel: str = "tb:revocations",
        max_batch: int = 512,
        max_pending_checks: int = 10_000,
        max_records_per_client: int = 500_000,
        max_clock_skew_seconds: int = 30,
        min_replicas: int = 0,
        replica_timeout_ms: int = 100,
        allow_unsafe_eviction: bool = False,
        declared_maxmemory_policy: str | None = None,
        prepare: bool = True,
    ) -> RedisStore:
        """Builds the sync and asyncio clients for `url` (`redis://`, `rediss://`, `unix://`;
        with `cluster=True` any node of a Redis Cluster). Connect and read time out after
        `timeout` seconds and a broken connection is retried once at once, so a dead Redis
        fails a call within about a second; redis-py reconnects when Redis is back. Every
        new connection checks `maxmemory-policy` (see `_EvictionGuard`): an evicting Redis
        is refused unless `allow_unsafe_eviction`; `declared_maxmemory_policy` states the
        policy where CONFIG is disabled (managed Redis). A WAIT for `min_replicas` can take
        `replica_timeout_ms`, so the read timeout grows by that much. With `prepare` (the
        default) it runs `prepare()` at once: a failure is logged, and retried by the
        first call, which fails closed until it succeeds."""
        guard = _EvictionGuard(allow_unsafe=allow_unsafe_eviction, declared_policy=declared_maxmemory_policy)
        epochs = _EpochGuard(prefix=prefix, cluster=cluster)

        def checks(connection: Any) -> None:
            guard.check(connection)
            epochs.check(connection)

        def sync_connect(connection: Any) -> None:
            connection.on_connect()
            checks(connection)

        async def async_connect(connection: Any) -> None:
            await connection.on_connect()
            await guard.acheck(connection)
            await epochs.acheck(connection)

        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout + (replica_timeout_ms / 1000 if min_replicas else 0),
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
                    url, retry=sync_retry, redis_connect_func=checks, **options
                )
                async_client = redis.asyncio.cluster.RedisCluster.from_url(url, retry=async_retry, **options)
                _hook_async_cluster(async_client, async_connect)
            else:
                client = redis.Redis.from_url(url, retry=sync_retry, redis_connect_func=sync_connect, **options)
                async_client = redis.asyncio.Redis.from_url(
                    url, retry=async_retry, redis_connect_func=async_connect, **options
                )
        except _STORE_ERRORS as exc:
            raise _unavailable("connect", exc) from exc
        store = cls(
            client,
            async_client=async_client,
            prefix=prefix,
            revocation_channel=revocation_channel,
            max_batch=max_batch,
            max_pending_checks=max_pending_checks,
            max_records_per_client=max_records_per_client,
            max_clock_skew_seconds=max_clock_skew_seconds,
            min_replicas=min_replicas,
            replica_timeout_ms=replica_timeout_ms,
        )
        store.eviction_guard = guard
        store.epoch_guard = epochs
        if prepare:
            try:
                store.prepare()
            except StoreUnavailableError as exc:  # the first call retries; until then every call fails
                log.error("%s", exc)
        return store

    @property
    def client(self) -> SyncClient:
        """The sync redis-py client (for health checks and tooling)."""
        return self._client

    @property
    def async_client(self) -> AsyncClient | None:
        return self._aclient

    # -- keys -------------------------------------------------------------------------

    def client_key(self, client_id: str, kind: str, ident: str = "") -> str:
        """`<prefix>:{<client>}:<kind>[:<id>]`: every key of one client shares its slot."""
        return f"{self.prefix}:{{{tag(client_id)}}}:{kind}" + (f":{ident}" if ident else "")

    def session_key(self, client_id: str, session_id: str) -> str:
        return self.client_key(client_id, "session", session_id)

    def sessions_key(self, client_id: str) -> str:
        return self.client_key(client_id, "sessions")

    def _own_key(self, kind: str, ident: str) -> str:
        """A key tagged by its own id (spread over the cluster): `<prefix>:<kind>:{<id>}`."""
        return f"{self.prefix}:{kind}:{{{tag(ident)}}}"

    def session_index_key(self, session_id: str) -> str:
        return self._own_key("sid", session_id)

    def revoked_token_key(self, jti: str) -> str:
        return self._own_key("jti", jti)

    def records_key(self, client_id: str) -> str:
        """The client's single-use records (replay records and `remember()` values)."""
        return self.client_key(client_id, "records")

    def epoch_key(self, key: str) -> str:
        """The state epoch that `key`'s slot depends on: one per store on one Redis, one
        per slot on a cluster (tagged so that it hashes to `key`'s slot)."""
        if not self._cluster:
            return f"{self.prefix}:epoch"
        return f"{self.prefix}:epoch:{{{slot_tags()[key_slot(key.encode())]}}}"

    def _session_keys(self, client_id: str) -> tuple[str, str, str, str]:
        """The client's live set, opening-order set, sequence counter, revocation marker."""
        return (
            self.sessions_key(client_id),
            self.client_key(client_id, "order"),
            self.client_key(client_id, "seq"),
            self.client_key(client_id, "revoked"),
        )

    # -- operations, written once as generators of round trips --------------------------

    def _open_op(
        self,
        client_id: str,
        audience: str,
        session_id: str | None,
        ttl_seconds: int,
        limit: SessionLimit,
        client_ip: str,
        now: int,
    ) -> _Op[Session]:
        live, order, seq, marker = self._session_keys(client_id)
        if session_id:
            key = self.session_key(client_id, session_id)
            call = _Eval("continue_session", (key, live, marker), (client_id, audience, now, client_ip, session_id))
            replies = yield [call]
            reply = _texts(_value(replies[0]))
            if reply[0] == "NOT_FOUND":
                raise SessionNotFoundError(f"session {session_id!r} is unknown, expired or revoked")
            if reply[0] == "WRONG_AUDIENCE":
                raise InvalidArgumentError(f"session {session_id!r} belongs to another audience")
            return Session(session_id, client_id, audience, int(reply[1]), int(reply[2]), now, reply[3])
        if ttl_seconds < 1:
            raise InvalidArgumentError("ttl_seconds must be positive")
        sid = _core.random_id()
        expires_at = now + ttl_seconds
        index = self.session_index_key(sid)
        ended = self.client_key(client_id, "ended")
        keys = (live, order, seq, self.session_key(client_id, sid), self.epoch_key(live), ended)
        args = (client_id, audience, now, expires_at, client_ip, limit.max_sessions, limit.policy.value)
        call = _Eval("open_session", keys, (*args, self.revocation_channel, sid, self._epoch_id))
        # The index is written beside the script: a session is only handed out once both
        # succeeded. The script reads no session hash, so it never has to be retried.
        replies = yield [_Command(("SET", index, client_id, "EX", ttl_seconds)), call]
        for reply in replies:
            _value(reply)
        reply = _texts(replies[-1])
        if reply[0] == "OK":
            if len(reply) > 1:
                for purged in (yield self._purge_calls(client_id, ended, reply[1:])):
                    _value(purged)
            return Session(sid, client_id, audience, now, expires_at, now, client_ip)
        if reply[0] == "LIMIT":
            yield [_Command(("DEL", index))]
            raise SessionLimitExceededError(
                f"client {client_id!r} has {reply[1]} live sessions (limit {limit.max_sessions})"
            )
        raise _ReplyError(f"unexpected open_session reply {reply[0]!r}")

    def _purge_calls(self, client_id: str, ended: str, sids: Sequence[str]) -> list[_Call]:
        """Deletes evicted sessions the client no longer keeps (hash and index), then takes
        them out of its ended set: a failure before that leaves them for the next open."""
        hashes = [self.session_key(client_id, s) for s in sids]
        # One DEL per index key: they live in other cluster slots than the client's keys.
        indexes: list[_Call] = [_Command(("DEL", self.session_index_key(s))) for s in sids]
        return [_Command(("DEL", *hashes)), *indexes, _Command(("ZREM", ended, *sids))]

    def _check_calls(self, r: _CheckRequest) -> list[_Call]:
        live, _, _, marker = self._session_keys(r.client_id)
        session = self.session_key(r.client_id, r.session_id)
        keys = [session, live, marker, self.records_key(r.client_id), self.epoch_key(session)]
        jti_key = self.revoked_token_key(r.jti)
        if not self._cluster:  # one Redis: the revoked jti is refused before anything is recorded
            keys.append(jti_key)
        args: list[str | int] = [
            r.client_id,
            r.audience,
            r.now,
            r.client_ip,
            r.session_id,
            r.issued_at,
            self._epoch_id,
            self.max_clock_skew_seconds,
            self.max_records_per_client,
        ]
        for key, until in r.replay:
            args.extend((f"p:{key}", until))
        calls: list[_Call] = [_Eval("check_token", tuple(keys), tuple(args))]
        if self._cluster:
            calls.append(_Eval("check_jti", (jti_key, self.epoch_key(jti_key)), (r.issued_at, self._epoch_id)))
        return calls

    def _observe(self, redis_now: str, broker_now: int) -> None:
        self.observed_clock_skew = int(redis_now) - broker_now

    def _check_reason(self, r: _CheckRequest, state: object, jti: object) -> Reason:
        name, redis_now = _texts(_value(state))
        self._observe(redis_now, r.now)
        reason = Reason.SESSION_UNKNOWN if name == "STALE" else Reason[name]
        if jti is None or reason in _STATE_REASONS:
            return reason
        jti_name = _texts(_value(jti))[0]
        if jti_name == "TOKEN_REVOKED":
            return Reason.TOKEN_REVOKED
        if jti_name == "STALE":  # the jti slot lost its state: a revocation may be gone
            return Reason.SESSION_UNKNOWN
        return reason

    def _checks_op(self, requests: Sequence[_CheckRequest]) -> _Op[list[Reason | StoreUnavailableError]]:
        """N validations in one round trip; a failed one yields its own error."""
        per = 2 if self._cluster else 1
        batch = [call for r in requests for call in self._check_calls(r)]
        replies = yield batch
        results: list[Reason | StoreUnavailableError] = []
        for i, r in enumerate(requests):
            try:
                jti = replies[per * i + 1] if self._cluster else None
                results.append(self._check_reason(r, replies[per * i], jti))
            except _REPLY_ERRORS as exc:
                results.append(_unavailable("check_token", exc))
        return results

    def _remember_op(self, key: str, client_id: str, issued_at: int, until: int, now: int) -> _Op[Remembered]:
        records = self.records_key(client_id)
        args = (f"a:{key}", issued_at, until, self.max_clock_skew_seconds, self.max_records_per_client)
        replies = yield [_Eval("remember", (records, self.epoch_key(records)), (*args, self._epoch_id))]
        name, redis_now = _texts(_value(replies[0]))
        self._observe(redis_now, now)
        return Remembered(name.lower())

    def _revoke_session_op(self, session_id: str, now: int) -> _Op[int]:
        replies = yield [_Command(("GET", self.session_index_key(session_id)))]
        client_id = _value(replies[0])
        if client_id is None:
            return 0
        client_id = _text(client_id)
        live, order, _, marker = self._session_keys(client_id)
        keys = (self.session_key(client_id, session_id), live, order, marker)
        replies = yield [_Eval("revoke_session", keys, (session_id, client_id, now, self.revocation_channel))]
        return int(_value(replies[0]))

    def _revoke_client_op(self, client_id: str, now: int) -> _Op[int]:
        keys = self._session_keys(client_id)
        replies = yield [_Eval("revoke_client", keys, (client_id, now, self.revocation_channel))]
        reply = _texts(_value(replies[0]))
        return int(reply[1])

    def _revoke_token_op(self, jti: str, until: int, now: int) -> _Op[int]:
        ttl = until - now + self.max_clock_skew_seconds  # outlives the token on every replica's clock
        if until <= now:  # a token revoked until the past cannot be presented anyway
            return 0
        replies = yield [_Eval("revoke_token", (self.revoked_token_key(jti),), (jti, ttl, self.revocation_channel))]
        return int(_value(replies[0]))

    def _sessions_op(self, client_id: str, now: int) -> _Op[list[Session]]:
        replies = yield [_Command(("ZRANGEBYSCORE", self.sessions_key(client_id), f"({now}", "+inf"))]
        sids = [_text(s) for s in _value(replies[0])]
        if not sids:
            return []
        marker_key = self._session_keys(client_id)[3]
        batch: list[_Call] = [_Command(("HMGET", self.session_key(client_id, s), *_SESSION_FIELDS)) for s in sids]
        replies = yield [*batch, _Command(("GET", marker_key))]
        marker = _value(replies[-1])
        found: list[tuple[int, int, Session]] = []
        for sid, reply in zip(sids, replies[:-1], strict=True):
            h = [None if x is None else _text(x) for x in _value(reply)]
            cid, audience, created, expires, seen, ip, revoked, seq = h
            if cid != client_id or revoked is not None or expires is None or int(expires) <= now:
                continue
            if marker is not None and int(seq or 0) <= int(_text(marker)):
                continue
            session = Session(sid, client_id, audience or "", int(created or 0), int(expires), int(seen or 0), ip or "")
            found.append((session.created_at, int(seq or 0), session))
        return [s for _, _, s in sorted(found, key=lambda x: (x[0], x[1]))]

    def _prepare_op(self) -> _Op[int]:
        """Creates the missing epochs (SET NX): one on one Redis, one per slot on a cluster."""
        if not self._cluster:
            replies = yield [_Eval("epoch_init", (self.epoch_key(""),), (self._epoch_id,))]
            return int(_value(replies[0]))
        client: Any = self._client
        by_node: dict[str, list[str]] = {}
        for t in slot_tags():
            key = f"{self.prefix}:epoch:{{{t}}}"
            by_node.setdefault(client.get_node_from_key(key).name, []).append(key)
        replies = yield [_Eval("epoch_init", (keys[0],), (self._epoch_id, *keys[1:])) for keys in by_node.values()]
        return sum(int(_value(r)) for r in replies)

    # -- drivers ------------------------------------------------------------------------

    def prepare(self) -> int:
        """The broker's start: connects (every master of a cluster, so each one's
        `maxmemory-policy` is checked) and creates the missing epochs (SET NX, start =
        Redis TIME). Returns how many epochs it created. Raises `StoreUnavailableError`
        (naming the unsafe setting, if that is why); the first call of any operation
        retries it until it succeeds."""
        with self._ready_lock:
            if self._ready:
                return 0
            try:
                if self._cluster:
                    client: Any = self._client
                    client.ping(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
                created = self._drive("prepare", self._prepare_op(), ready=False)
            except StoreUnavailableError:
                raise
            except _STORE_ERRORS as exc:
                raise _unavailable("prepare", exc) from exc
            self._ready = True
            return created

    async def aprepare(self) -> int:
        """The asyncio twin of `prepare` (run in a worker thread: it runs once)."""
        return await asyncio.to_thread(self.prepare)

    def _run(self, operation: str, op: _Op[T]) -> T:
        if not self._ready:
            self.prepare()
        return self._drive(operation, op)

    def _drive(self, operation: str, op: _Op[T], *, ready: bool = True) -> T:
        try:
            batch = next(op)
            while True:
                batch = op.send(self._execute(batch))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        except TokenBrokerError:
            raise
        except _ReplyError as exc:
            raise _unavailable(operation, exc.__cause__ or exc) from exc
        except _STORE_ERRORS as exc:
            raise _unavailable(operation, exc) from exc

    async def _arun(self, operation: str, op: _Op[T]) -> T:
        if self._aclient is None:
            return await asyncio.to_thread(self._run, operation, op)
        if not self._ready:
            await self.aprepare()
        try:
            batch = next(op)
            while True:
                batch = op.send(await self._aexecute(batch))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        except TokenBrokerError:
            raise
        except _ReplyError as exc:
            raise _unavailable(operation, exc.__cause__ or exc) from exc
        except _STORE_ERRORS as exc:
            raise _unavailable(operation, exc) from exc

    def _waits(self, batch: list[_Call]) -> list[_Call]:
        """`WAIT min_replicas timeout` after the writes of `batch`: one per node written."""
        if not self.min_replicas or not any(_is_write(c) for c in batch):
            return []
        wait = ("WAIT", self.min_replicas, self.replica_timeout_ms)
        if not self._cluster:
            return [_Command(wait)]
        client: Any = self._client
        nodes: dict[str, str] = {}
        for call in batch:
            if _is_write(call):
                key = _first_key(call)
                nodes.setdefault(client.get_node_from_key(key).name, key)
        return [_Command(wait, route=key) for key in nodes.values()]

    def _acknowledged(self, replies: list[Any]) -> None:
        """Fails closed when a WAIT saw fewer replicas than `min_replicas`."""
        for reply in replies:
            count = int(_value(reply))
            if count < self.min_replicas:
                raise StoreUnavailableError(
                    f"Redis store refused a write: only {count} of {self.min_replicas} replicas acknowledged it "
                    f"within {self.replica_timeout_ms} ms (setting redis_min_replicas): check the replicas' "
                    "health and replication lag, or raise redis_replica_timeout_ms"
                )

    def _execute(self, batch: list[_Call]) -> list[Any]:
        """One round trip. A single script goes through its `Script` (NOSCRIPT handled by
        redis-py); a batch goes as one pipeline, reloading scripts after NOSCRIPT. Writes
        are followed by WAIT in the same pipeline when `min_replicas` is set."""
        waits = self._waits(batch)
        if len(batch) == 1 and not waits:
            call = batch[0]
            if isinstance(call, _Eval):
                return [self._scripts[call.script](keys=call.keys, args=call.args)]
            client: Any = self._client
            return [client.execute_command(*call.args)]
        replies = self._pipeline(batch + waits)
        missing = [i for i, reply in enumerate(replies[: len(batch)]) if isinstance(reply, NoScriptError)]
        if missing:
            for name in {c.script for i in missing if isinstance(c := batch[i], _Eval)}:
                self._scripts[name].sha = self._client.script_load(self._texts[name])
            again = [batch[i] for i in missing]
            retried = self._pipeline(again + self._waits(again))
            for i, reply in zip(missing, retried, strict=False):
                replies[i] = reply
            self._acknowledged(retried[len(again) :])
        self._acknowledged(replies[len(batch) :])
        return replies[: len(batch)]

    def _pipeline(self, batch: list[_Call]) -> list[Any]:
        client: Any = self._client
        pipe: Any = client.pipeline(transaction=False)
        for call in batch:
            # redis-py's sync cluster pipeline asks the server (COMMAND GETKEYS) where each
            # EVALSHA goes unless told: name the node of its slot (MOVED still redirects).
            route = {"target_nodes": client.get_node_from_key(_first_key(call))} if self._cluster else {}
            if isinstance(call, _Eval):
                sha = self._scripts[call.script].sha
                pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args, **route)
            else:
                pipe.execute_command(*call.args, **route)
        return list(pipe.execute(raise_on_error=False))

    async def _aexecute(self, batch: list[_Call]) -> list[Any]:
        assert self._aclient is not None
        waits = self._waits(batch)
        if len(batch) == 1 and not waits:
            call = batch[0]
            if isinstance(call, _Eval):
                return [await self._ascripts[call.script](keys=call.keys, args=call.args)]
            return [await self._aclient.execute_command(*call.args)]
        replies = await self._apipeline(batch + waits)
        missing = [i for i, reply in enumerate(replies[: len(batch)]) if isinstance(reply, NoScriptError)]
        if missing:
            for name in {c.script for i in missing if isinstance(c := batch[i], _Eval)}:
                self._ascripts[name].sha = await self._aclient.script_load(self._texts[name])
            again = [batch[i] for i in missing]
            retried = await self._apipeline(again + self._waits(again))
            for i, reply in zip(missing, retried, strict=False):
                replies[i] = reply
            self._acknowledged(retried[len(again) :])
        self._acknowledged(replies[len(batch) :])
        return replies[: len(batch)]

    async def _apipeline(self, batch: list[_Call]) -> list[Any]:
        assert self._aclient is not None
        aclient: Any = self._aclient
        cluster = isinstance(aclient, redis.asyncio.cluster.RedisCluster)
        pipe: Any = aclient.pipeline(transaction=False)
        for call in batch:
            if isinstance(call, _Eval):
                sha = self._ascripts[call.script].sha
                pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
            elif cluster and call.route:  # a keyless command (WAIT) goes to its key's node
                pipe.execute_command(*call.args, target_nodes=aclient.get_node_from_key(call.route))
            else:
                pipe.execute_command(*call.args)
        return list(await pipe.execute(raise_on_error=False))

    # -- the Store protocol -----------------------------------------------------------

    def open_session(
        self,
        *,
        client_id: str,
        audience: str,
        session_id: str | None,
        ttl_seconds: int,
        limit: SessionLimit,
        client_ip: str,
        now: int,
    ) -> Session:
        """Continues `session_id` (live, the client's, same audience) or opens a new session:
        one script trims the client's expired sessions, counts the live ones and rejects or
        evicts the oldest (SESSION_REVOKED) by `limit.policy`. Raises
        `SessionNotFoundError`, `SessionLimitExceededError`, `InvalidArgumentError`,
        `StoreUnavailableError`."""
        op = self._open_op(client_id, audience, session_id, ttl_seconds, limit, client_ip, now)
        return self._run("open_session", op)

    def check_token(
        self,
        *,
        client_id: str,
        session_id: str,
        audience: str,
        jti: str,
        issued_at: int,
        client_ip: str,
        replay: tuple[ReplayRecord, ...],
        now: int,
    ) -> Reason:
        """Validation step 7 in one round trip. Returns OK, SESSION_UNKNOWN (also: issued
        before the epoch), SESSION_REVOKED, CLIENT_REVOKED, TOKEN_REVOKED, REPLAYED or
        REPLAY_CACHE_FULL; raises `StoreUnavailableError`, never answers OK without Redis."""
        request = _CheckRequest(client_id, session_id, audience, jti, issued_at, client_ip, tuple(replay), now)
        return self._thread_coalescer.check(request)

    def check_tokens(self, requests: Sequence[Mapping[str, Any]]) -> list[Reason]:
        """`check_token` for each request (a mapping of its keyword arguments), all in one
        pipeline: one round trip for N. Raises `StoreUnavailableError` if any failed."""
        return self._raise_first(self._run("check_tokens", self._checks_op(self._requests(requests))))

    def remember(self, key: str, *, client_id: str, issued_at: int, until: int, now: int) -> Remembered:
        """Records `key` among the client's records until `until` (+ the skew allowance,
        on Redis's clock): NEW, SEEN, STALE (issued before the epoch) or FULL (quota)."""
        return self._run("remember", self._remember_op(key, client_id, issued_at, until, now))

    def revoke_session(self, session_id: str, *, now: int) -> int:
        """Revokes one live session (looked up through the session index); 1 or 0."""
        return self._run("revoke_session", self._revoke_session_op(session_id, now))

    def revoke_client(self, client_id: str, *, now: int) -> int:
        """Revokes every live session of the client (CLIENT_REVOKED); returns how many."""
        return self._run("revoke_client", self._revoke_client_op(client_id, now))

    def revoke_token(self, jti: str, *, until: int, now: int) -> int:
        """Revokes the token `jti` until `until`; 1 if newly revoked, 0 if it already was."""
        return self._run("revoke_token", self._revoke_token_op(jti, until, now))

    def sessions(self, client_id: str, *, now: int) -> list[Session]:
        """The client's live sessions, in the order they were opened."""
        return self._run("sessions", self._sessions_op(client_id, now))

    async def aopen_session(
        self,
        *,
        client_id: str,
        audience: str,
        session_id: str | None,
        ttl_seconds: int,
        limit: SessionLimit,
        client_ip: str,
        now: int,
    ) -> Session:
        op = self._open_op(client_id, audience, session_id, ttl_seconds, limit, client_ip, now)
        return await self._arun("open_session", op)

    async def acheck_token(
        self,
        *,
        client_id: str,
        session_id: str,
        audience: str,
        jti: str,
        issued_at: int,
        client_ip: str,
        replay: tuple[ReplayRecord, ...],
        now: int,
    ) -> Reason:
        """The asyncio twin of `check_token`; concurrent calls share pipelines (coalescing)."""
        request = _CheckRequest(client_id, session_id, audience, jti, issued_at, client_ip, tuple(replay), now)
        coalescer = self._coalescer
        if coalescer is None or coalescer.loop is not asyncio.get_running_loop():
            coalescer = self._coalescer = _CheckCoalescer(
                self._acheck_many, max_batch=self._max_batch, max_pending=self._max_pending
            )
        return await coalescer.check(request)

    async def acheck_tokens(self, requests: Sequence[Mapping[str, Any]]) -> list[Reason]:
        """The asyncio twin of `check_tokens` (one pipeline, not coalesced)."""
        return self._raise_first(await self._acheck_many(self._requests(requests)))

    async def _acheck_many(self, requests: list[_CheckRequest]) -> list[Reason | StoreUnavailableError]:
        return await self._arun("check_token", self._checks_op(requests))

    async def aremember(self, key: str, *, client_id: str, issued_at: int, until: int, now: int) -> Remembered:
        return await self._arun("remember", self._remember_op(key, client_id, issued_at, until, now))

    async def arevoke_session(self, session_id: str, *, now: int) -> int:
        return await self._arun("revoke_session", self._revoke_session_op(session_id, now))

    async def arevoke_client(self, client_id: str, *, now: int) -> int:
        return await self._arun("revoke_client", self._revoke_client_op(client_id, now))

    async def arevoke_token(self, jti: str, *, until: int, now: int) -> int:
        return await self._arun("revoke_token", self._revoke_token_op(jti, until, now))

    async def asessions(self, client_id: str, *, now: int) -> list[Session]:
        return await self._arun("sessions", self._sessions_op(client_id, now))

    @staticmethod
    def _requests(requests: Sequence[Mapping[str, Any]]) -> list[_CheckRequest]:
        try:
            return [_CheckRequest(**{**r, "replay": tuple(tuple(x) for x in r.get("replay", ()))}) for r in requests]
        except TypeError as exc:
            raise InvalidArgumentError(f"a check request must hold exactly the fields {_CheckRequest._fields}") from exc

    @staticmethod
    def _raise_first(results: list[Reason | StoreUnavailableError]) -> list[Reason]:
        reasons: list[Reason] = []
        for result in results:
            if isinstance(result, StoreUnavailableError):
                raise result
            reasons.append(result)
        return reasons

    # -- revocation messages ------------------------------------------------------------

    def _parse_revocation(self, message: Mapping[str, Any]) -> Revocation | None:
        try:
            body = json.loads(message["data"])
            return Revocation(str(body["kind"]), str(body["id"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on %s", self.revocation_channel)
            return None

    def subscribe_revocations(
        self, callback: Callable[[Revocation], object], *, timeout: float = 2.0
    ) -> RevocationSubscription:
        """Calls `callback(Revocation)` in a background thread for every revocation any
        replica publishes, until `.stop()`. Returns once Redis confirmed the subscription.
        Reconnects by itself after Redis outages (messages published meanwhile are lost:
        pub/sub only refreshes caches, it never decides a validation)."""

        def handle(message: Mapping[str, Any]) -> None:
            revocation = self._parse_revocation(message)
            if revocation is not None:
                try:
                    callback(revocation)
                except Exception:
                    log.exception("revocation callback failed")

        def on_error(exc: BaseException, pubsub: Any, thread: Any) -> None:
            log.warning("revocation subscription interrupted (%s); retrying", type(exc).__name__)
            time.sleep(0.5)  # keep running: redis-py reconnects and resubscribes

        client: Any = self._client
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(**{self.revocation_channel: handle})
            deadline = time.monotonic() + timeout
            while not _is_subscribed(pubsub.get_message(timeout=0.1)):
                if time.monotonic() > deadline:
                    raise TimeoutError("no subscribe confirmation")
            thread = pubsub.run_in_thread(sleep_time=0.2, daemon=True, exception_handler=on_error)
        except _STORE_ERRORS as exc:
            with contextlib.suppress(*_STORE_ERRORS):
                pubsub.close()
            raise _unavailable("subscribe_revocations", exc) from exc
        return RevocationSubscription(thread=thread)

    async def asubscribe_revocations(
        self, callback: Callable[[Revocation], object], *, timeout: float = 2.0
    ) -> RevocationSubscription:
        """The asyncio twin: an asyncio task calls `callback` (a function or coroutine
        function) for every revocation, until `await subscription.astop()`."""
        if self._aclient is None:
            return await asyncio.to_thread(self.subscribe_revocations, callback, timeout=timeout)
        aclient: Any = self._aclient
        try:
            if isinstance(aclient, redis.asyncio.cluster.RedisCluster):
                await aclient.initialize()  # its pubsub needs the slot map
        except _STORE_ERRORS as exc:
            raise _unavailable("subscribe_revocations", exc) from exc
        pubsub = aclient.pubsub()
        try:
            await pubsub.subscribe(self.revocation_channel)
            deadline = time.monotonic() + timeout
            while not _is_subscribed(await pubsub.get_message(timeout=0.1)):
                if time.monotonic() > deadline:
                    raise TimeoutError("no subscribe confirmation")
        except _STORE_ERRORS as exc:
            with contextlib.suppress(*_STORE_ERRORS):
                await pubsub.aclose()
            raise _unavailable("subscribe_revocations", exc) from exc

        async def listen() -> None:
            try:
                while True:
                    try:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    except _STORE_ERRORS as exc:
                        log.warning("revocation subscription interrupted (%s); retrying", type(exc).__name__)
                        await asyncio.sleep(0.5)
                        continue
                    revocation = self._parse_revocation(message) if message else None
                    if revocation is None:
                        continue
                    try:
                        result = callback(revocation)
                        if inspect.isawaitable(result):
                            await result
                    except Exception:
                        log.exception("revocation callback failed")
            finally:
                with contextlib.suppress(*_STORE_ERRORS):
                    await pubsub.aclose()

        return RevocationSubscription(task=asyncio.get_running_loop().create_task(listen()))

    # -- health and lifecycle -----------------------------------------------------------

    def ping(self) -> bool:
        """True when Redis answers; raises `StoreUnavailableError` otherwise."""
        try:
            return bool(self._client.ping())
        except _STORE_ERRORS as exc:
            raise _unavailable("ping", exc) from exc

    async def aping(self) -> bool:
        if self._aclient is None:
            return await asyncio.to_thread(self.ping)
        try:
            return bool(await self._aclient.ping())
        except _STORE_ERRORS as exc:
            raise _unavailable("ping", exc) from exc

    def close(self) -> None:
        """Closes the sync client's connections."""
        with contextlib.suppress(*_STORE_ERRORS):
            self._client.close()

    async def aclose(self) -> None:
        """Closes the asyncio client's connections (call from its event loop)."""
        if self._aclient is not None:
            with contextlib.suppress(*_STORE_ERRORS):
                await self._aclient.aclose()

    def __repr__(self) -> str:
        kind = "cluster" if self._cluster else "single"
        return f"RedisStore({kind}, prefix={self.prefix!r})"
