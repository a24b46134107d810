"""`RedisStore`: sessions, revocations and replay records shared by several broker
replicas, in one Redis or a Redis Cluster. Same semantics as `MemoryStore`.

Key layout (`tb` is the prefix):

- `tb:{<client>}:session:<sid>`  hash: client_id, audience, created_at, expires_at,
  last_seen_at, last_ip, seq, revoked (reason name); TTL = the session's lifetime
- `tb:{<client>}:sessions`       sorted set of the client's live session ids, scored by
  expires_at; `tb:{<client>}:seq` orders sessions opened in the same second
- `tb:{<client>}:replay:<key>`   replay record (SET NX EX semantics inside the script)
- `tb:sid:{<sid>}`               session id -> client id, for `revoke_session` only
- `tb:jti:{<jti>}`               revoked token id; TTL = until the token cannot be valid
- `tb:remember:{<key>}`          `remember()` records

`<client>` is the client id with `%`, `{` and `}` percent-encoded (an empty id is `%`),
so a client id such as `a}b{c` can neither move its keys out of its own cluster slot nor
collide with another client's keys. Every script touches only keys of one hash tag and
gets them all through KEYS; scripts are registered once with `register_script` and
reloaded after NOSCRIPT (a restarted Redis) in pipelines too.

Revoked jtis: `revoke_token` gets only a jti, which does not name the client, so revoked
jtis cannot live under the client's hash tag. They live under a tag of their own (the jti,
so they spread over the whole cluster instead of loading one slot), and validation sends
`EXISTS tb:jti:{<jti>}` in the same pipeline as the `check_token` script: one round trip
on one Redis; on a cluster, two commands that are sent to their nodes concurrently (still
one round-trip time). The price: a revoked token's proof is still recorded as used and its
session's last_seen_at still moves, which refuses nothing that should pass.

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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
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
from tokenbroker.store.base import ReplayRecord

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
_SCRIPTS = ("open_session", "continue_session", "check_token", "revoke_session", "revoke_client", "revoke_token")
_ATTEMPTS = 5  # optimistic rounds of open_session/revoke_client while sessions change under them
_SESSION_FIELDS = ("client_id", "audience", "created_at", "expires_at", "last_seen_at", "last_ip", "revoked", "seq")
_STATE_REASONS = frozenset({Reason.SESSION_UNKNOWN, Reason.SESSION_REVOKED, Reason.CLIENT_REVOKED})


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


_Call = _Eval | _Command
# An operation written once for both clients: it yields batches of calls (one round trip
# each), receives their replies (a value or the exception of that call) and returns.
_Op = Generator[list[_Call], list[Any], T]


class _CheckRequest(NamedTuple):
    client_id: str
    session_id: str
    audience: str
    jti: str
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
    return call.keys[0] if isinstance(call, _Eval) else str(call.args[1])


def _value(reply: object) -> Any:
    if isinstance(reply, BaseException):
        raise _ReplyError(type(reply).__name__) from reply
    return reply


def _is_subscribed(message: Mapping[str, Any] | None) -> bool:
    return message is not None and message.get("type") in ("subscribe", b"subscribe")


def _unavailable(operation: str, exc: BaseException | None = None) -> StoreUnavailableError:
    why = f" ({type(exc).__name__})" if exc is not None else ""
    return StoreUnavailableError(f"Redis store unavailable during {operation}{why}: check that Redis is reachable")


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
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise InvalidArgumentError("prefix must be non-empty and hold no '{' or '}' (they would move hash tags)")
        if max_batch < 1 or max_pending_checks < 1:
            raise InvalidArgumentError("max_batch and max_pending_checks must be positive")
        self._client = client
        self._aclient = async_client
        self.prefix = prefix
        self.revocation_channel = revocation_channel
        self._max_batch = max_batch
        self._max_pending = max_pending_checks
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        package = resources.files("tokenbroker.store")
        self._texts = {name: package.joinpath("lua", f"{name}.lua").read_text() for name in _SCRIPTS}
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
    ) -> RedisStore:
        """Builds the sync and asyncio clients for `url` (`redis://`, `rediss://`, `unix://`;
        with `cluster=True` any node of a Redis Cluster). Connect and read time out after
        `timeout` seconds and a broken connection is retried once at once, so a dead Redis
        fails a call within about a second; redis-py reconnects when Redis is back."""
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        sync_retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        async_retry = redis.asyncio.retry.Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        client: SyncClient
        async_client: AsyncClient
        try:
            if cluster:
                client = redis.cluster.RedisCluster.from_url(url, retry=sync_retry, **options)
                async_client = redis.asyncio.cluster.RedisCluster.from_url(url, retry=async_retry, **options)
            else:
                client = redis.Redis.from_url(url, retry=sync_retry, **options)
                async_client = redis.asyncio.Redis.from_url(url, retry=async_retry, **options)
        except _STORE_ERRORS as exc:
            raise _unavailable("connect", exc) from exc
        return cls(
            client,
            async_client=async_client,
            prefix=prefix,
            revocation_channel=revocation_channel,
            max_batch=max_batch,
            max_pending_checks=max_pending_checks,
        )

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

    def remember_key(self, key: str) -> str:
        return self._own_key("remember", key)

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
        if session_id:
            key = self.session_key(client_id, session_id)
            replies = yield [_Eval("continue_session", (key,), (client_id, audience, now, client_ip))]
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
        fixed = (self.sessions_key(client_id), self.client_key(client_id, "seq"), self.session_key(client_id, sid))
        known: list[str] = []
        for attempt in range(_ATTEMPTS):
            args = (client_id, audience, now, expires_at, client_ip, limit.max_sessions, limit.policy.value)
            call = _Eval(
                "open_session",
                fixed + tuple(self.session_key(client_id, s) for s in known),
                (*args, self.revocation_channel, sid, *known),
            )
            # The index is written in the first round trip, beside the script: a session
            # is only handed out once both succeeded.
            batch: list[_Call] = [call] if attempt else [_Command(("SET", index, client_id, "EX", ttl_seconds)), call]
            replies = yield batch
            for reply in replies:
                _value(reply)
            reply = _texts(replies[-1])
            if reply[0] == "OK":
                return Session(sid, client_id, audience, now, expires_at, now, client_ip)
            if reply[0] == "LIMIT":
                yield [_Command(("DEL", index))]
                raise SessionLimitExceededError(
                    f"client {client_id!r} has {reply[1]} live sessions (limit {limit.max_sessions})"
                )
            known = reply[1:]
        raise StoreUnavailableError("Redis store busy during open_session: the client's sessions kept changing")

    def _check_calls(self, r: _CheckRequest) -> list[_Call]:
        keys = [self.session_key(r.client_id, r.session_id)]
        args: list[str | int] = [r.client_id, r.audience, r.now, r.client_ip]
        for key, until in r.replay:
            keys.append(self.client_key(r.client_id, "replay", key))
            args.append(until)
        return [_Eval("check_token", tuple(keys), tuple(args)), _Command(("EXISTS", self.revoked_token_key(r.jti)))]

    @staticmethod
    def _check_reason(state: object, revoked: object) -> Reason:
        reason = Reason[_text(_value(state))]
        if reason not in _STATE_REASONS and _value(revoked):
            return Reason.TOKEN_REVOKED
        return reason

    def _checks_op(self, requests: Sequence[_CheckRequest]) -> _Op[list[Reason | StoreUnavailableError]]:
        """N validations in one round trip; a failed one yields its own error."""
        batch = [call for r in requests for call in self._check_calls(r)]
        replies = yield batch
        results: list[Reason | StoreUnavailableError] = []
        for i in range(len(requests)):
            try:
                results.append(self._check_reason(replies[2 * i], replies[2 * i + 1]))
            except _REPLY_ERRORS as exc:
                results.append(_unavailable("check_token", exc))
        return results

    def _remember_op(self, key: str, until: int, now: int) -> _Op[bool]:
        ttl = until - now
        if ttl <= 0:  # nothing to remember: only an existing record can refuse
            replies = yield [_Command(("EXISTS", self.remember_key(key)))]
            return not _value(replies[0])
        replies = yield [_Command(("SET", self.remember_key(key), "1", "NX", "EX", ttl))]
        return bool(_value(replies[0]))

    def _revoke_session_op(self, session_id: str, now: int) -> _Op[int]:
        replies = yield [_Command(("GET", self.session_index_key(session_id)))]
        client_id = _value(replies[0])
        if client_id is None:
            return 0
        client_id = _text(client_id)
        keys = (self.session_key(client_id, session_id), self.sessions_key(client_id))
        replies = yield [_Eval("revoke_session", keys, (session_id, client_id, now, self.revocation_channel))]
        return int(_value(replies[0]))

    def _revoke_client_op(self, client_id: str, now: int) -> _Op[int]:
        known: list[str] = []
        for _ in range(_ATTEMPTS):
            keys = (self.sessions_key(client_id), *(self.session_key(client_id, s) for s in known))
            replies = yield [_Eval("revoke_client", keys, (client_id, now, self.revocation_channel, *known))]
            reply = _texts(_value(replies[0]))
            if reply[0] == "OK":
                return int(reply[1])
            known = reply[1:]
        raise StoreUnavailableError("Redis store busy during revoke_client: the client's sessions kept changing")

    def _revoke_token_op(self, jti: str, until: int, now: int) -> _Op[int]:
        ttl = until - now
        if ttl <= 0:  # a token revoked until the past cannot be presented anyway
            return 0
        replies = yield [_Eval("revoke_token", (self.revoked_token_key(jti),), (jti, ttl, self.revocation_channel))]
        return int(_value(replies[0]))

    def _sessions_op(self, client_id: str, now: int) -> _Op[list[Session]]:
        replies = yield [_Command(("ZRANGEBYSCORE", self.sessions_key(client_id), f"({now}", "+inf"))]
        sids = [_text(s) for s in _value(replies[0])]
        if not sids:
            return []
        replies = yield [_Command(("HMGET", self.session_key(client_id, s), *_SESSION_FIELDS)) for s in sids]
        found: list[tuple[int, int, Session]] = []
        for sid, reply in zip(sids, replies, strict=True):
            h = [None if x is None else _text(x) for x in _value(reply)]
            cid, audience, created, expires, seen, ip, revoked, seq = h
            if cid != client_id or revoked is not None or expires is None or int(expires) <= now:
                continue
            session = Session(sid, client_id, audience or "", int(created or 0), int(expires), int(seen or 0), ip or "")
            found.append((session.created_at, int(seq or 0), session))
        return [s for _, _, s in sorted(found, key=lambda x: (x[0], x[1]))]

    # -- drivers ------------------------------------------------------------------------

    def _run(self, operation: str, op: _Op[T]) -> T:
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

    def _execute(self, batch: list[_Call]) -> list[Any]:
        """One round trip. A single script goes through its `Script` (NOSCRIPT handled by
        redis-py); a batch goes as one pipeline, reloading scripts after NOSCRIPT."""
        if len(batch) == 1:
            call = batch[0]
            if isinstance(call, _Eval):
                return [self._scripts[call.script](keys=call.keys, args=call.args)]
            client: Any = self._client
            return [client.execute_command(*call.args)]
        replies = self._pipeline(batch)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for name in {c.script for i in missing if isinstance(c := batch[i], _Eval)}:
                self._scripts[name].sha = self._client.script_load(self._texts[name])
            for i, reply in zip(missing, self._pipeline([batch[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

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
        if len(batch) == 1:
            call = batch[0]
            if isinstance(call, _Eval):
                return [await self._ascripts[call.script](keys=call.keys, args=call.args)]
            return [await self._aclient.execute_command(*call.args)]
        replies = await self._apipeline(batch)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for name in {c.script for i in missing if isinstance(c := batch[i], _Eval)}:
                self._ascripts[name].sha = await self._aclient.script_load(self._texts[name])
            for i, reply in zip(missing, await self._apipeline([batch[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

    async def _apipeline(self, batch: list[_Call]) -> list[Any]:
        assert self._aclient is not None
        pipe: Any = self._aclient.pipeline(transaction=False)
        for call in batch:
            if isinstance(call, _Eval):
                sha = self._ascripts[call.script].sha
                pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
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
        client_ip: str,
        replay: tuple[ReplayRecord, ...],
        now: int,
    ) -> Reason:
        """Validation step 7 in one round trip. Returns OK, SESSION_UNKNOWN,
        SESSION_REVOKED, CLIENT_REVOKED, TOKEN_REVOKED or REPLAYED; raises
        `StoreUnavailableError`, never answers OK without Redis."""
        request = _CheckRequest(client_id, session_id, audience, jti, client_ip, tuple(replay), now)
        return self._thread_coalescer.check(request)

    def check_tokens(self, requests: Sequence[Mapping[str, Any]]) -> list[Reason]:
        """`check_token` for each request (a mapping of its keyword arguments), all in one
        pipeline: one round trip for N. Raises `StoreUnavailableError` if any failed."""
        return self._raise_first(self._run("check_tokens", self._checks_op(self._requests(requests))))

    def remember(self, key: str, *, until: int, now: int) -> bool:
        """SET NX EX: True the first time, False while `key` is remembered."""
        return self._run("remember", self._remember_op(key, until, now))

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
        client_ip: str,
        replay: tuple[ReplayRecord, ...],
        now: int,
    ) -> Reason:
        """The asyncio twin of `check_token`; concurrent calls share pipelines (coalescing)."""
        request = _CheckRequest(client_id, session_id, audience, jti, client_ip, tuple(replay), now)
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

    async def aremember(self, key: str, *, until: int, now: int) -> bool:
        return await self._arun("remember", self._remember_op(key, until, now))

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
