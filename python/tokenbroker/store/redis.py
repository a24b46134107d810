"""`RedisStore`: sessions, revocations and replay records shared by several broker
replicas, in one Redis or a Redis Cluster. Same semantics as `MemoryStore`.

The store is in parts, one module each: key names and layout (`redis_keys`), the Lua
scripts (`redis_scripts`, files in `lua/`), the clients (`redis_connect`) and the checks
every new connection runs (`redis_eviction`, `redis_epochs`), calls and their round trips
(`redis_calls`: pipelines, NOSCRIPT, WAIT for replicas), coalescing of concurrent
validations (`redis_coalesce`) and failing closed (`redis_errors`). Here: the store's
operations, each written once for both clients as a generator of round trips. Every
script touches only keys of one slot and gets them all through KEYS.

State loss (a flushed, restarted or failed-over Redis): every slot's state has an epoch
(`redis_epochs`); what was issued before it is refused, so a record lost with the state
cannot be replayed. `prepare()` (the broker's start) creates the missing epochs.

Revoked jtis live in their own slot, not the client's (`redis_keys` says why and what it
costs on a cluster). Every validation reads Redis, so a revocation applies on every replica
at once.

Clock skew: replay records expire at `until + max_clock_skew_seconds` on Redis's clock
(`TIME` inside the script; Redis 7 replicates script effects), not at a TTL computed from
the calling broker's clock. A replica whose clock is up to `max_clock_skew_seconds` behind
accepts a proof at most until `until` on its own clock, while the record is still live.
`observed_clock_skew` is Redis time minus broker time from the last script reply.

Detection: a check with an `Observe` is watched inside `check_token.lua`, in the same
round trip (the script says what it keeps: per client a networks set and a watch hash,
per session a resource set and a few fields of its hash, all under the client's hash tag,
bounded and with TTLs); its findings come back with the reason.

Per-client bounds: a client's records count against `max_records_per_client`; over it,
`check_token` answers REPLAY_CACHE_FULL and `remember` FULL for that client only.

Batches: `check_tokens`/`acheck_tokens` send N validations as one pipeline (one round trip
for N); concurrent `check_token` and `acheck_token` calls coalesce (`redis_coalesce`).

Fail closed: any Redis error, timeout or connection failure raises `StoreUnavailableError`
naming the operation (never a token), never an OK answer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

import orjson
import redis.cluster

from tokenbroker._core import random_id
from tokenbroker.detection.signals import BREADTH_BUCKETS, BREADTH_HISTORY_MAX, Signal, Thresholds
from tokenbroker.errors import (
    InvalidArgumentError,
    SessionLimitExceededError,
    SessionNotFoundError,
    StoreUnavailableError,
)
from tokenbroker.models import Session
from tokenbroker.reason import Reason
from tokenbroker.store import redis_keys
from tokenbroker.store.base import Remembered, SessionOpen, TokenCheck, check_opening, opening_expiry, token_checks
from tokenbroker.store.redis_calls import Call, Command, Eval, Op, RoundTrips
from tokenbroker.store.redis_coalesce import CheckCoalescer, ThreadCheckCoalescer, raise_first_error
from tokenbroker.store.redis_connect import AsyncClient, SyncClient, connect
from tokenbroker.store.redis_epochs import EpochGuard, epoch_init_op
from tokenbroker.store.redis_errors import (
    REPLY_ERRORS,
    STORE_ERRORS,
    FailClosed,
    ReplyError,
    UnsafeRedisError,
    unavailable,
)
from tokenbroker.store.redis_eviction import EvictionGuard
from tokenbroker.store.redis_keys import slot_tags, tag
from tokenbroker.store.redis_replies import reply_text, reply_texts, reply_value
from tokenbroker.store.redis_scripts import script_text

__all__ = ["RedisStore", "UnsafeRedisError", "script_text", "slot_tags", "tag"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_SESSION_FIELDS = ("client_id", "audience", "created_at", "expires_at", "last_seen_at", "last_ip", "revoked", "seq")
# Opens with a continuation that may find its session gone between the script that named it
# and continue_session (revoked or evicted meanwhile): the next attempt opens a new one.
_CONTINUE_ATTEMPTS = 3
_STATE_REASONS = frozenset({Reason.SESSION_UNKNOWN, Reason.SESSION_REVOKED, Reason.CLIENT_REVOKED})
_FINDING_REASONS = frozenset({Reason.OK, Reason.ANOMALY})
_USAGE_FIELDS = tuple(f"h{h}" for h in range(24))


def threshold_args(thresholds: Thresholds) -> tuple[str, str, str]:
    """The thresholds as `check_token.lua`'s `watch` takes them (after the request's own
    six ARGV): the two every observation reads, then the others in one ARGV (the script
    parses it only when it needs one), with the histogram's constants so that Python
    stays their source."""
    t = thresholds
    others = (
        t.network_history_max,
        t.learning_seconds,
        t.concurrent_window_seconds,
        t.breadth_min_sessions,
        t.breadth_min_resources,
        t.session_resources_max,
        t.burst_requests,
        BREADTH_BUCKETS,
        BREADTH_HISTORY_MAX,
    )
    return str(t.network_history_days * 86400), str(t.burst_window_seconds), " ".join(map(str, others))


class RedisStore:
    """The `Store` for several broker replicas sharing one Redis or Redis Cluster.

    `client` is a `redis.Redis` or `redis.cluster.RedisCluster`; `async_client` its asyncio
    twin (without one, the `a*` methods run the sync ones in a worker thread).
    `RedisStore.from_url(url, cluster=...)` builds both with short timeouts. See the module
    docstring for state loss, batching and fail-closed, and `redis_keys` for the key
    layout and the revoked-jti trade-off."""

    def __init__(
        self,
        client: SyncClient,
        *,
        async_client: AsyncClient | None = None,
        prefix: str = "tb",
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
        self._max_batch = max_batch
        self._max_pending = max_pending_checks
        self.max_records_per_client = max_records_per_client
        self.max_clock_skew_seconds = max_clock_skew_seconds
        self.min_replicas = min_replicas
        self.replica_timeout_ms = replica_timeout_ms
        # Written into epochs this store creates: tells one epoch from the next in Redis.
        self._epoch_id = random_id()
        self._ready = False  # prepare() succeeded: epochs exist (retried by the first call otherwise)
        self._ready_lock = threading.Lock()
        self.observed_clock_skew: int | None = None  # Redis time - broker time, last script reply
        self.eviction_guard: EvictionGuard | None = None  # set by from_url
        self.epoch_guard: EpochGuard | None = None  # set by from_url
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self._trips = RoundTrips(client, async_client, min_replicas=min_replicas, replica_timeout_ms=replica_timeout_ms)
        self._coalescer: CheckCoalescer | None = None
        # The last thresholds seen and their ARGV: the broker hands the same object with
        # every Observe, so an identity test spares rebuilding it per validation.
        self._thresholds: tuple[Thresholds | None, tuple[str, ...]] = (None, ())
        self._thread_coalescer = ThreadCheckCoalescer(
            lambda checks: self._run("check_token", self._checks_op(checks)),
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
        new connection checks `maxmemory-policy` (see `EvictionGuard`): an evicting Redis
        is refused unless `allow_unsafe_eviction`; `declared_maxmemory_policy` states the
        policy where CONFIG is disabled (managed Redis). A WAIT for `min_replicas` can take
        `replica_timeout_ms`, so the read timeout grows by that much. With `prepare` (the
        default) it runs `prepare()` at once: a failure is logged, and retried by the
        first call, which fails closed until it succeeds."""
        guard = EvictionGuard(allow_unsafe=allow_unsafe_eviction, declared_policy=declared_maxmemory_policy)
        epochs = EpochGuard(prefix=prefix, cluster=cluster)
        read_timeout = timeout + (replica_timeout_ms / 1000 if min_replicas else 0)
        client, async_client = connect(
            url, cluster=cluster, timeout=timeout, read_timeout=read_timeout, checks=(guard, epochs)
        )
        store = cls(
            client,
            async_client=async_client,
            prefix=prefix,
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

    # -- keys (named in redis_keys) -----------------------------------------------------

    def client_key(self, client_id: str, kind: str, ident: str = "") -> str:
        """`<prefix>:{<client>}:<kind>[:<id>]`: every key of one client shares its slot."""
        return redis_keys.client_key(self.prefix, client_id, kind, ident)

    def session_key(self, client_id: str, session_id: str) -> str:
        return self.client_key(client_id, "session", session_id)

    def sessions_key(self, client_id: str) -> str:
        return self.client_key(client_id, "sessions")

    def session_index_key(self, session_id: str) -> str:
        return redis_keys.own_key(self.prefix, "sid", session_id)

    def revoked_token_key(self, jti: str) -> str:
        return redis_keys.own_key(self.prefix, "jti", jti)

    def records_key(self, client_id: str) -> str:
        """The client's single-use records (replay records and `remember()` values)."""
        return self.client_key(client_id, "records")

    def networks_key(self, client_id: str) -> str:
        """The client's networks (detection): sorted set, network -> last seen."""
        return self.client_key(client_id, "nets")

    def watch_key(self, client_id: str) -> str:
        """The client's detection watch: first observation, breadth histogram, usage hours."""
        return self.client_key(client_id, "watch")

    def resources_key(self, client_id: str, session_id: str) -> str:
        """The distinct resource digests one session touched (detection)."""
        return self.client_key(client_id, "res", session_id)

    def epoch_key(self, key: str) -> str:
        """The state epoch that `key`'s slot depends on: one per store on one Redis, one
        per slot on a cluster (tagged so that it hashes to `key`'s slot)."""
        return redis_keys.epoch_key(self.prefix, key, cluster=self._cluster)

    def _session_keys(self, client_id: str) -> tuple[str, str, str, str]:
        """The client's live set, opening-order set, sequence counter, revocation marker."""
        return (
            self.sessions_key(client_id),
            self.client_key(client_id, "order"),
            self.client_key(client_id, "seq"),
            self.client_key(client_id, "revoked"),
        )

    # -- operations, written once as generators of round trips --------------------------

    def _open_op(self, opening: SessionOpen) -> Op[Session]:
        """Continues `session_id` (one round trip); else opens a new session (one round
        trip), or continues the live session `continuation` names (two: the open script
        answers CONTINUE, then continue_session runs on that session)."""
        check_opening(opening)
        client_id, audience, session_id = opening.client_id, opening.audience, opening.session_id
        if session_id:
            reply = reply_texts(reply_value((yield [self._continue_call(opening, session_id)])[0]))
            if reply[0] == "NOT_FOUND":
                raise SessionNotFoundError(f"session {session_id!r} is unknown, expired or revoked")
            if reply[0] == "WRONG_AUDIENCE":
                raise InvalidArgumentError(f"session {session_id!r} belongs to another audience")
            return Session(session_id, client_id, audience, int(reply[1]), int(reply[2]), opening.now, reply[3])
        dead = ""  # a session the continuation named that continue_session then found gone
        for _ in range(_CONTINUE_ATTEMPTS):
            sid = random_id()
            index = self.session_index_key(sid)
            # The index is written beside the script: a session is only handed out once both
            # succeeded. The script reads no session hash, so it never has to be retried.
            replies = yield [
                Command(("SET", index, client_id, "EX", opening.ttl_seconds)),
                self._open_call(opening, sid, dead),
            ]
            for reply in replies:
                reply_value(reply)
            reply = reply_texts(replies[-1])
            if reply[0] == "OK":
                if len(reply) > 1:
                    ended = self.client_key(client_id, "ended")
                    for purged in (yield self._purge_calls(client_id, ended, reply[1:])):
                        reply_value(purged)
                now = opening.now
                return Session(sid, client_id, audience, now, opening_expiry(opening), now, opening.client_ip)
            if reply[0] == "LIMIT":
                yield [Command(("DEL", index))]
                raise SessionLimitExceededError(
                    f"client {client_id!r} has {reply[1]} live sessions (limit {opening.limit.max_sessions})"
                )
            if reply[0] != "CONTINUE":
                raise ReplyError(f"unexpected open_session reply {reply[0]!r}")
            named = reply[1]
            # The index of the session not opened goes in the same round trip.
            replies = yield [self._continue_call(opening, named), Command(("DEL", index))]
            cont = reply_texts(reply_value(replies[0]))
            if cont[0] == "OK":
                return Session(named, client_id, audience, int(cont[1]), int(cont[2]), opening.now, cont[3])
            dead = named  # revoked or evicted between the two round trips (or inconsistent): not again
        raise SessionNotFoundError(
            f"the session of client {client_id!r} that this continuation names kept ending while it was "
            "continued: retry the request"
        )

    def _continue_call(self, opening: SessionOpen, session_id: str) -> Eval:
        client_id = opening.client_id
        live, _, _, marker = self._session_keys(client_id)
        keys = (self.session_key(client_id, session_id), live, marker)
        args = (client_id, opening.audience, opening.now, opening.client_ip, session_id, opening.token_ttl_seconds)
        return Eval("continue_session", keys, args)

    def _open_call(self, opening: SessionOpen, sid: str, dead: str) -> Eval:
        """The open_session script for a new session `sid` (or the live session the
        continuation names, unless that is `dead`). The continuation is hashed: its key
        field has a fixed size whatever the broker passes."""
        client_id, now, idle, limit = opening.client_id, opening.now, opening.idle_seconds, opening.limit
        live, order, seq, _ = self._session_keys(client_id)
        keys = [live, order, seq, self.session_key(client_id, sid), self.epoch_key(live)]
        keys.append(self.client_key(client_id, "ended"))
        continuation = ""
        if opening.continuation is not None:
            keys.append(self.client_key(client_id, "continuations"))
            continuation = hashlib.sha256(opening.continuation.encode()).hexdigest()
        args = (
            client_id,
            opening.audience,
            now,
            opening_expiry(opening),
            opening.client_ip,
            limit.max_sessions,
            limit.policy.value,
            sid,
            self._epoch_id,
            now + opening.ttl_seconds,
            "" if idle is None else idle,
            continuation,
            dead,
        )
        return Eval("open_session", tuple(keys), args)

    def _purge_calls(self, client_id: str, ended: str, sids: Sequence[str]) -> list[Call]:
        """Deletes evicted sessions the client no longer keeps (hash and index), then takes
        them out of its ended set: a failure before that leaves them for the next open."""
        hashes = [self.session_key(client_id, s) for s in sids]
        # One DEL per index key: they live in other cluster slots than the client's keys.
        indexes: list[Call] = [Command(("DEL", self.session_index_key(s))) for s in sids]
        return [Command(("DEL", *hashes)), *indexes, Command(("ZREM", ended, *sids))]

    def _check_calls(self, check: TokenCheck) -> list[Call]:
        client_id, session_id, audience, jti, issued_at, client_ip, replay, now, observe = check
        live, order, _, marker = self._session_keys(client_id)
        session = self.session_key(client_id, session_id)
        keys = [session, live, marker, self.records_key(client_id), self.epoch_key(session)]
        jti_key = self.revoked_token_key(jti)
        if not self._cluster:  # one Redis: the revoked jti is refused before anything is recorded
            keys.append(jti_key)
        args: list[str | int] = [client_id, audience, now, client_ip, session_id, issued_at]
        args += (self._epoch_id, self.max_clock_skew_seconds, self.max_records_per_client)
        for key, until in replay:
            args.extend((f"p:{key}", until))
        if observe is not None:  # the last 4 KEYS and the last 9 ARGV (check_token.lua's watch)
            keys += (self.networks_key(client_id), self.watch_key(client_id))
            keys += (self.resources_key(client_id, session_id), order)
            args += (observe.network, observe.wide, observe.resource, observe.inline, observe.revoke)
            args.append(1 if observe.outside_window else 0)
            args += self._threshold_args(observe.thresholds)
        calls: list[Call] = [Eval("check_token", tuple(keys), tuple(args))]
        if self._cluster:
            calls.append(Eval("check_jti", (jti_key, self.epoch_key(jti_key)), (issued_at, self._epoch_id)))
        return calls

    def _threshold_args(self, thresholds: Thresholds) -> tuple[str, ...]:
        last, args = self._thresholds
        if last is not thresholds:
            args = threshold_args(thresholds)
            self._thresholds = (thresholds, args)
        return args

    def _observe(self, redis_now: str, broker_now: int) -> None:
        self.observed_clock_skew = int(redis_now) - broker_now

    def _check_reason(self, check: TokenCheck, state: object, jti: object) -> Reason:
        reply = reply_texts(reply_value(state))
        name, redis_now = reply[0], reply[1]
        self._observe(redis_now, check.now)
        reason = self._jti_reason(Reason.SESSION_UNKNOWN if name == "STALE" else Reason[name], jti)
        observe = check.observe
        # Findings only for what passed every check: on a cluster a revoked jti (checked
        # beside the script) refuses after the script observed; its findings are dropped.
        if len(reply) > 2 and observe is not None and reason in _FINDING_REASONS:
            for i in range(2, len(reply) - 1, 2):
                observe.found.append((Signal(reply[i]), orjson.loads(reply[i + 1])))
        return reason

    @staticmethod
    def _jti_reason(reason: Reason, jti: object) -> Reason:
        """The check's reason once the cluster's revoked-jti check (None: not separate) is in."""
        if jti is None or reason in _STATE_REASONS:
            return reason
        jti_name = reply_texts(reply_value(jti))[0]
        if jti_name == "TOKEN_REVOKED":
            return Reason.TOKEN_REVOKED
        if jti_name == "STALE":  # the jti slot lost its state: a revocation may be gone
            return Reason.SESSION_UNKNOWN
        return reason

    def _checks_op(self, checks: Sequence[TokenCheck]) -> Op[list[Reason | StoreUnavailableError]]:
        """N validations in one round trip; a failed one yields its own error."""
        per = 2 if self._cluster else 1
        batch = [call for check in checks for call in self._check_calls(check)]
        replies = yield batch
        results: list[Reason | StoreUnavailableError] = []
        for i, check in enumerate(checks):
            try:
                jti = replies[per * i + 1] if self._cluster else None
                results.append(self._check_reason(check, replies[per * i], jti))
            except REPLY_ERRORS as exc:
                results.append(unavailable("check_token", exc))
        return results

    def _remember_op(self, key: str, client_id: str, issued_at: int, until: int, now: int) -> Op[Remembered]:
        records = self.records_key(client_id)
        args = (f"a:{key}", issued_at, until, self.max_clock_skew_seconds, self.max_records_per_client)
        replies = yield [Eval("remember", (records, self.epoch_key(records)), (*args, self._epoch_id))]
        name, redis_now = reply_texts(reply_value(replies[0]))
        self._observe(redis_now, now)
        return Remembered(name.lower())

    def _usage_hours_op(self, client_id: str) -> Op[list[int]]:
        replies = yield [Command(("HMGET", self.watch_key(client_id), *_USAGE_FIELDS))]
        return [int(reply_text(x)) if x is not None else 0 for x in reply_value(replies[0])]

    def _revoke_session_op(self, session_id: str, now: int) -> Op[int]:
        replies = yield [Command(("GET", self.session_index_key(session_id)))]
        client_id = reply_value(replies[0])
        if client_id is None:
            return 0
        client_id = reply_text(client_id)
        live, order, _, marker = self._session_keys(client_id)
        keys = (self.session_key(client_id, session_id), live, order, marker)
        replies = yield [Eval("revoke_session", keys, (session_id, client_id, now))]
        return int(reply_value(replies[0]))

    def _revoke_client_op(self, client_id: str, now: int) -> Op[int]:
        replies = yield [Eval("revoke_client", self._session_keys(client_id), (now,))]
        reply = reply_texts(reply_value(replies[0]))
        return int(reply[1])

    def _revoke_token_op(self, jti: str, until: int, now: int) -> Op[int]:
        if until <= now:  # a token revoked until the past cannot be presented anyway
            return 0
        ttl = until - now + self.max_clock_skew_seconds  # outlives the token on every replica's clock
        replies = yield [Eval("revoke_token", (self.revoked_token_key(jti),), (ttl,))]
        return int(reply_value(replies[0]))

    def _sessions_op(self, client_id: str, now: int) -> Op[list[Session]]:
        replies = yield [Command(("ZRANGEBYSCORE", self.sessions_key(client_id), f"({now}", "+inf"))]
        sids = [reply_text(s) for s in reply_value(replies[0])]
        if not sids:
            return []
        marker_key = self._session_keys(client_id)[3]
        batch: list[Call] = [Command(("HMGET", self.session_key(client_id, s), *_SESSION_FIELDS)) for s in sids]
        replies = yield [*batch, Command(("GET", marker_key))]
        marker = reply_value(replies[-1])
        found: list[tuple[int, int, Session]] = []
        for sid, reply in zip(sids, replies[:-1], strict=True):
            h = [None if x is None else reply_text(x) for x in reply_value(reply)]
            cid, audience, created, expires, seen, ip, revoked, seq = h
            if cid != client_id or revoked is not None or expires is None or int(expires) <= now:
                continue
            if marker is not None and int(seq or 0) <= int(reply_text(marker)):
                continue
            session = Session(sid, client_id, audience or "", int(created or 0), int(expires), int(seen or 0), ip or "")
            found.append((session.created_at, int(seq or 0), session))
        return [s for _, _, s in sorted(found, key=lambda x: (x[0], x[1]))]

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
            if self._cluster:
                client: Any = self._client
                with FailClosed("prepare"):
                    client.ping(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
            op = epoch_init_op(self._client, self.prefix, cluster=self._cluster, epoch_id=self._epoch_id)
            created = self._drive("prepare", op)
            self._ready = True
            return created

    async def aprepare(self) -> int:
        """The asyncio twin of `prepare` (run in a worker thread: it runs once)."""
        return await asyncio.to_thread(self.prepare)

    def _run(self, operation: str, op: Op[T]) -> T:
        if not self._ready:
            self.prepare()
        return self._drive(operation, op)

    def _drive(self, operation: str, op: Op[T]) -> T:
        with FailClosed(operation):
            try:
                batch = next(op)
                while True:
                    batch = op.send(self._trips.send(batch))
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    async def _arun(self, operation: str, op: Op[T]) -> T:
        if self._aclient is None:
            return await asyncio.to_thread(self._run, operation, op)
        if not self._ready:
            await self.aprepare()
        with FailClosed(operation):
            try:
                batch = next(op)
                while True:
                    batch = op.send(await self._trips.asend(batch))
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    # -- the Store protocol -----------------------------------------------------------

    def open_session(self, opening: SessionOpen) -> Session:
        """Continues `opening.session_id` (live, the client's, same audience), else the live
        session `opening.continuation` names, else opens a new session: one script decides
        (so concurrent opens with one continuation open one session), trims the client's
        expired and idle-ended sessions, counts the live ones and rejects or evicts the
        oldest (SESSION_REVOKED) by `opening.limit.policy`. Raises `SessionNotFoundError`,
        `SessionLimitExceededError`, `InvalidArgumentError`, `StoreUnavailableError`."""
        return self._run("open_session", self._open_op(opening))

    def check_token(self, check: TokenCheck) -> Reason:
        """Validation step 7 in one round trip. Returns OK, SESSION_UNKNOWN (also: issued
        before the epoch), SESSION_REVOKED, CLIENT_REVOKED, TOKEN_REVOKED, REPLAYED,
        REPLAY_CACHE_FULL or ANOMALY (`check.observe`: a detection signal decided inline,
        in the same script); raises `StoreUnavailableError`, never answers OK without Redis."""
        return self._thread_coalescer.check(check)

    def check_tokens(self, checks: Sequence[TokenCheck]) -> list[Reason]:
        """`check_token` for each check, all in one pipeline: one round trip for N. Raises
        `InvalidArgumentError` if one is not a `TokenCheck` (before anything is sent) and
        `StoreUnavailableError` if any failed."""
        return raise_first_error(self._run("check_tokens", self._checks_op(token_checks(checks))))

    def remember(self, key: str, *, client_id: str, issued_at: int, until: int, now: int) -> Remembered:
        """Records `key` among the client's records until `until` (+ the skew allowance,
        on Redis's clock): NEW, SEEN, STALE (issued before the epoch) or FULL (quota)."""
        return self._run("remember", self._remember_op(key, client_id, issued_at, until, now))

    def usage_hours(self, client_id: str) -> list[int]:
        """The client's 24 usage-hour counters (index h: UTC hour h), zeros when never
        observed (or not observed for the network history: the watch then expired)."""
        return self._run("usage_hours", self._usage_hours_op(client_id))

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

    async def aopen_session(self, opening: SessionOpen) -> Session:
        return await self._arun("open_session", self._open_op(opening))

    async def acheck_token(self, check: TokenCheck) -> Reason:
        """The asyncio twin of `check_token`; concurrent calls share pipelines (coalescing)."""
        coalescer = self._coalescer
        if coalescer is None or coalescer.loop is not asyncio.get_running_loop():
            coalescer = self._coalescer = CheckCoalescer(
                self._acheck_many, max_batch=self._max_batch, max_pending=self._max_pending
            )
        return await coalescer.check(check)

    async def acheck_tokens(self, checks: Sequence[TokenCheck]) -> list[Reason]:
        """The asyncio twin of `check_tokens` (one pipeline, not coalesced)."""
        return raise_first_error(await self._acheck_many(token_checks(checks)))

    async def _acheck_many(self, checks: list[TokenCheck]) -> list[Reason | StoreUnavailableError]:
        return await self._arun("check_token", self._checks_op(checks))

    async def aremember(self, key: str, *, client_id: str, issued_at: int, until: int, now: int) -> Remembered:
        return await self._arun("remember", self._remember_op(key, client_id, issued_at, until, now))

    async def ausage_hours(self, client_id: str) -> list[int]:
        return await self._arun("usage_hours", self._usage_hours_op(client_id))

    async def arevoke_session(self, session_id: str, *, now: int) -> int:
        return await self._arun("revoke_session", self._revoke_session_op(session_id, now))

    async def arevoke_client(self, client_id: str, *, now: int) -> int:
        return await self._arun("revoke_client", self._revoke_client_op(client_id, now))

    async def arevoke_token(self, jti: str, *, until: int, now: int) -> int:
        return await self._arun("revoke_token", self._revoke_token_op(jti, until, now))

    async def asessions(self, client_id: str, *, now: int) -> list[Session]:
        return await self._arun("sessions", self._sessions_op(client_id, now))

    # -- health and lifecycle -----------------------------------------------------------

    def ping(self) -> bool:
        """True when Redis answers; raises `StoreUnavailableError` otherwise."""
        with FailClosed("ping"):
            return bool(self._client.ping())

    async def aping(self) -> bool:
        if self._aclient is None:
            return await asyncio.to_thread(self.ping)
        with FailClosed("ping"):
            return bool(await self._aclient.ping())

    def close(self) -> None:
        """Closes the sync client's connections."""
        with contextlib.suppress(*STORE_ERRORS):
            self._client.close()

    async def aclose(self) -> None:
        """Closes the asyncio client's connections (call from its event loop)."""
        if self._aclient is not None:
            with contextlib.suppress(*STORE_ERRORS):
                await self._aclient.aclose()

    def __repr__(self) -> str:
        kind = "cluster" if self._cluster else "single"
        return f"RedisStore({kind}, prefix={self.prefix!r})"
