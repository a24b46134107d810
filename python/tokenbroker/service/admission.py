"""Admission control for the sync gRPC server: no caller, least of all one without a
credential, can hold the threads that other callers need.

Why it is needed: the sync server reads a unary call's request message on a pool thread,
before the handler runs. A caller that opens calls and never sends the message holds one
thread per call, so 32 such calls used to stop every validation, health check and
issuance.

How (`AdmissionInterceptor`):

- Each call is put in a class on the server's polling thread, before any pool thread is
  used, from its method and metadata only: `caller` (an `authorization: ApiKey <key>` the
  registry knows, an in-memory lookup; or, when the server requires client certificates,
  a call to a method that needs a caller credential, see below), `caller-stream`,
  `anonymous` (IssueToken, GetJwks, anything with no or an unknown key), `anonymous-stream`
  (reflection and health Watch without a key), and `health` (Check, its own small share so
  a load balancer keeps getting answers while the anonymous share is full).
- Health never says anything but the truth: when the `health` class is full (stalled
  Checks hold it), a Check is answered inline on the polling thread without reading its
  request, with the overall ("") status (`HealthStatus.overall`, read without a lock: the
  servicer's lock can be held by a Watch send that only the polling thread completes).
  The service name is in the unread request; "" is what load balancers ask.
- Each class has its own thread pool (grpc's `experimental_thread_pool`) and its own bound
  on admitted calls (running plus waiting for a thread). Over the bound the call is refused
  at once with RESOURCE_EXHAUSTED, a message naming the bound and its setting (over
  `max_concurrent_rpcs`, when set, grpc's own "Concurrent RPC limit exceeded!"). The refusal
  runs inline on the polling thread: it reads nothing and needs no worker.
- Every handler is served as a stream-request handler (the wire does not distinguish), so
  the request message is read here, with a deadline (`message_timeout_seconds`): a call
  whose message does not arrive in time is cancelled and its thread freed. An anonymous
  call gets `min(message_timeout_seconds, PRESSED_MESSAGE_TIMEOUT_SECONDS)` once its class
  has more than half its bound admitted. A stream with no request for
  `stream_idle_timeout_seconds` is ended too (an anonymous one after the message deadline),
  and an anonymous stream (health Watch, reflection) lives at most
  `stream_idle_timeout_seconds` however active: it cannot hold its slot forever.
- Per source address (the peer is known on the pool thread only, not at admission): on
  its thread, before anything is read, an anonymous unary call whose source already has
  its share of calls waiting for their message gets only `CROWDED_SOURCE_GRACE_SECONDS`
  for it, and, while the class has more than half its bound admitted, is refused at once
  (RESOURCE_EXHAUSTED, microseconds: the bound never fills with one source's calls). The
  share is a quarter of `anonymous_workers`, at most `max_anonymous_per_source`, at
  least 1: a stalling source holds at most its share of threads for the full deadline.
  An honest burst from one address (a gateway, agents behind one NAT) on a calm broker
  is not refused: its messages are already there when its calls reach a thread. A source may also hold at most
  `max_anonymous_per_source` anonymous streams.

Overload: a call over its class's bound is refused at once, but only once grpc's polling
thread reaches it. That one thread (grpcio's sync server) takes every call and delivers
every message, with the GIL, and most of its time is grpc core's own work, inside its
completion queue poll (65 % of its samples at twice the saturation rate, py-spy; this
interceptor's share was under 1 %). A class refusal is a handler run like any other (two
batches and their completions), so past what the process can both serve and refuse, calls
wait in grpc core before anything here sees them, and core cancels some of them itself
(the caller sees CANCELLED, not RESOURCE_EXHAUSTED; traced with GRPC_TRACE=http,call_error,
no Python code cancels them; a plain grpcio server without a bound does the same past its
rate). Measured with `benches/overload.py`, the broker pinned to one CPU and the
generators to the other (`make overload`), at twice the saturation rate:

- Redis store, the defaults: every excess call shed as RESOURCE_EXHAUSTED (shed p99 24 to
  63 ms), admitted p99 225 to 276 ms, no other error. `max_queued_rpcs` is that p99: it bounds the wait
  for a worker. 512 gave 733 ms (and 1.4 % CANCELLED), 256 225 ms, 128 117 ms, 64 110 ms;
  128 and below refused a closed loop of 256 calls in flight, which 256 admits.
- Memory store, the defaults: the process is faster (about 260 us a call), so twice its
  rate is about 7,500 calls/s, and a third of them were CANCELLED by core.
- Memory store with `max_concurrent_rpcs` (260, the callers' bound): grpc refuses every
  call over it before the interceptors' handlers, in one batch (`bind_server_bound`), and
  every excess call was shed as RESOURCE_EXHAUSTED, admitted p99 186 to 232 ms, no other
  error. Its price: the bound is the whole server's, so once that many calls are active,
  health checks and anonymous calls are refused too. The classes still keep anonymous
  calls and health checks to their own bounds of it, and the bound must be above their
  sum (90 with the defaults): anonymous stallers can hold that many of its slots. Off by default: health checks then
  answer whatever the load (or probe `GET /healthz` on the HTTP door, never shed).
- Unpinned, the generators take the server's CPU, and a refusal costs a Python client more
  than a success; the same run collapses (seconds of p99).

mTLS: the interceptor cannot see the TLS auth context. When the server requires client
certificates, every connection has already proved a certificate that the configured CA
signed, so a call without an API key to a method that needs a caller credential counts as
`caller`; on its pool thread, before anything is read, the certificate must be a registered
server's (else UNAUTHENTICATED at once). Without that check, any holder of a CA-signed
certificate (MCP clients too) could hold the callers' threads."""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc  # type: ignore[import-untyped,unused-ignore]
from grpc_health.v1 import health_pb2  # type: ignore[import-untyped,unused-ignore]

from tokenbroker.config import default_max_workers
from tokenbroker.errors import AuthenticationError
from tokenbroker.registry import Registry
from tokenbroker.service.auth import API_KEY_SCHEME, AUTHORIZATION, CallerAuthenticator, peer_ip
from tokenbroker.service.health import HealthStatus
from tokenbroker.service.servicer import SERVICE_NAME

_T = TypeVar("_T")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# Methods that refuse a call without a caller credential (an MCP server's API key or cert).
CALLER_METHODS = frozenset(
    f"/{SERVICE_NAME}/{name}"
    for name in (
        "ValidateToken",
        "ValidateTokenBatch",
        "ValidateTokenStream",
        "RevokeSession",
        "RevokeClient",
        "RevokeToken",
        "ListSessions",
        "WatchEvents",
    )
) | {"/envoy.service.auth.v3.Authorization/Check"}  # Envoy's ext_authz (tokenbroker.gateway.envoy)
# The message deadline of an anonymous call while its class is more than half full.
PRESSED_MESSAGE_TIMEOUT_SECONDS = 0.5
# What an anonymous call gets for its message when its source already has its share
# waiting: an honest caller's message is in the socket already, a staller's is not.
CROWDED_SOURCE_GRACE_SECONDS = 0.1
_API_KEY_SCHEME = API_KEY_SCHEME.lower()
_MAX_CACHED_HANDLERS = 256
_MAX_KNOWN_KEYS = 1024
_KNOWN_KEY_SECONDS = 1.0
# Health checks that may wait for a health thread, per thread: a load balancer's checks
# arrive one at a time, and a short queue absorbs a burst.
HEALTH_QUEUED_PER_WORKER = 4
DEFAULT_MAX_WORKERS = default_max_workers()


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The bounds, as the `Settings` of the same names. `max_workers` and
    `anonymous_workers` are threads; the `max_queued_*` calls wait for one of them."""

    max_workers: int = DEFAULT_MAX_WORKERS
    max_queued_rpcs: int = 256
    max_streams: int = 16
    anonymous_workers: int = 8
    max_queued_anonymous_rpcs: int = 64
    max_anonymous_streams: int = 8
    max_anonymous_per_source: int = 4
    health_workers: int = 2
    message_timeout_seconds: float = 2.0
    stream_idle_timeout_seconds: float = 300.0
    max_concurrent_rpcs: int = 0  # grpc's own bound on every call at once; 0: none

    def __post_init__(self) -> None:
        for name in ("max_workers", "max_streams", "anonymous_workers", "max_anonymous_streams", "health_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if min(self.max_queued_rpcs, self.max_queued_anonymous_rpcs) < 0 or self.max_anonymous_per_source < 1:
            raise ValueError("max_queued_* must be at least 0 and max_anonymous_per_source at least 1")
        if self.max_concurrent_rpcs < 0:
            raise ValueError("max_concurrent_rpcs must be at least 0 (0: no server-wide bound)")
        held = self.held_without_caller_credential
        if 0 < self.max_concurrent_rpcs <= held:
            raise ValueError(
                f"max_concurrent_rpcs ({self.max_concurrent_rpcs}) must be above the {held} calls that callers "
                "without a server credential and health checks may hold (anonymous_workers + "
                "max_queued_anonymous_rpcs + max_anonymous_streams + 5 x health_workers), or those alone "
                "could fill it and have every registered server refused"
            )
        if not (self.message_timeout_seconds > 0 and self.stream_idle_timeout_seconds > 0):
            raise ValueError("message_timeout_seconds and stream_idle_timeout_seconds must be positive")

    @property
    def held_without_caller_credential(self) -> int:
        """The most calls the anonymous, anonymous-stream and health classes admit at once."""
        return (
            self.anonymous_workers
            + self.max_queued_anonymous_rpcs
            + self.max_anonymous_streams
            + (1 + HEALTH_QUEUED_PER_WORKER) * self.health_workers
        )

    @classmethod
    def from_settings(cls, settings: Any) -> AdmissionLimits:
        """The limits from an object with attributes of the same names (`Settings`)."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


class RefusalRecorder(Protocol):
    """`tokenbroker.metrics.Metrics.admission_refused`: one refused or dropped call."""

    def __call__(self, call_class: str, reason: str) -> None: ...


class _InlineExecutor(ThreadPoolExecutor):
    """Runs each submitted call at once on the submitting thread (grpc's polling thread):
    for refusals, which read nothing and return immediately. Never starts a thread."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        future: Future[_T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the future, as a pool would
            future.set_exception(exc)
        return future


class _Watchdog:
    """Cancels calls whose awaited request message is late, and anonymous streams at the
    end of their lifetime. One thread; the table holds only the calls waiting right now
    (at most one entry per pool thread) and the open anonymous streams (bounded by
    `max_anonymous_streams`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._waits: dict[int, tuple[float, Any]] = {}
        self._ids = itertools.count()
        self._wakeup = math.inf
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tb-admission-watchdog", daemon=True)
        self._thread.start()

    def arm(self, context: Any, timeout: float) -> int:
        """Cancel `context`'s call unless `disarm` comes within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        key = next(self._ids)
        with self._cond:
            self._waits[key] = (deadline, context)
            if deadline < self._wakeup:
                self._wakeup = deadline
                self._cond.notify()
        return key

    def disarm(self, key: int) -> bool:
        """True when the wait had already expired (the call was cancelled)."""
        with self._cond:
            return self._waits.pop(key, None) is None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                late = [key for key, (deadline, _) in self._waits.items() if deadline <= now]
                contexts = [self._waits.pop(key)[1] for key in late]
                self._wakeup = min((deadline for deadline, _ in self._waits.values()), default=math.inf)
                if contexts:
                    self._cond.release()
                    try:
                        for context in contexts:
                            context.cancel()
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait(None if self._wakeup == math.inf else self._wakeup - now)


class _CallClass:
    """One class of calls: its threads and its bound on admitted calls."""

    def __init__(self, name: str, workers: int, queued: int, setting: str, *, anonymous: bool) -> None:
        self.name = name
        self.limit = workers + queued
        self.anonymous = anonymous
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"tb-{name}")
        self.refusal = (
            f"the broker is serving its bound of {self.limit} concurrent {name} calls ({setting}): retry shortly"
            + (", or call as a registered MCP server (`authorization: ApiKey <key>`)" if anonymous else "")
        )
        self._lock = threading.Lock()
        self._admitted = 0

    def try_admit(self) -> bool:
        with self._lock:
            if self._admitted >= self.limit:
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    @property
    def admitted(self) -> int:
        return self._admitted


class _Slot:
    """A call's admission, released exactly once (from the handler or when the RPC ends);
    with a `lifetime` (the watchdog and its key), the stream's lifetime cap is disarmed then."""

    __slots__ = ("_call_class", "_lifetime", "_lock", "_released", "_source", "_sources")

    def __init__(
        self,
        call_class: _CallClass,
        sources: _Sources | None = None,
        source: str = "",
        lifetime: tuple[_Watchdog, int] | None = None,
    ) -> None:
        self._call_class = call_class
        self._sources = sources
        self._source = source
        self._lifetime = lifetime
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        if self._lifetime is not None:
            watchdog, key = self._lifetime
            watchdog.disarm(key)
        self._call_class.release()
        if self._sources is not None:
            self._sources.leave(self._source)


class _Sources:
    """Per source address: a count of held things (waits or streams). Entries go at zero,
    so the table never holds more than the things held right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def enter(self, source: str) -> int:
        """Counts one more for `source`; returns how many it held before."""
        with self._lock:
            held = self._counts.get(source, 0)
            self._counts[source] = held + 1
            return held

    def leave(self, source: str) -> None:
        with self._lock:
            held = self._counts.get(source, 0) - 1
            if held > 0:
                self._counts[source] = held
            else:
                self._counts.pop(source, None)


class _Refuse:
    """A refusal handler: answers RESOURCE_EXHAUSTED without reading the request, inline
    on the polling thread."""

    def __init__(self, message: str, executor: _InlineExecutor) -> None:
        self._message = message
        self.experimental_thread_pool = executor

    def __call__(self, request_iterator: Iterator[Any], context: Any) -> Any:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._message)


class _AnswerHealth:
    """Answers a Check inline on the polling thread without reading its request: the
    overall status (for ""), never a refusal."""

    def __init__(self, status: HealthStatus, executor: _InlineExecutor) -> None:
        self._status = status
        self.experimental_thread_pool = executor

    def __call__(self, request_iterator: Iterator[Any], context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=self._status.overall)


class AdmissionInterceptor(grpc.ServerInterceptor):  # type: ignore[misc,unused-ignore]
    """Classifies, bounds and times every call (see the module docstring). `close()`
    after the server has stopped."""

    def __init__(
        self,
        registry: Registry,
        limits: AdmissionLimits | None = None,
        *,
        mutual_tls: bool = False,
        on_refusal: RefusalRecorder | None = None,
        health_status: HealthStatus | None = None,
    ) -> None:
        self.limits = limits = limits or AdmissionLimits()
        self._registry = registry
        self._callers = CallerAuthenticator(registry)
        self._mutual_tls = mutual_tls
        self._on_refusal = on_refusal
        self._watchdog = _Watchdog()
        self._waiting_by_source = _Sources()
        self.source_share = max(1, min(limits.max_anonymous_per_source, limits.anonymous_workers // 4))
        self._streams_by_source = _Sources()
        self.caller = _CallClass("caller", limits.max_workers, limits.max_queued_rpcs, "max_workers", anonymous=False)
        self.caller_stream = _CallClass("caller-stream", limits.max_streams, 0, "max_streams", anonymous=False)
        self.anonymous = _CallClass(
            "anonymous", limits.anonymous_workers, limits.max_queued_anonymous_rpcs, "anonymous_workers", anonymous=True
        )
        self.anonymous_stream = _CallClass(
            "anonymous-stream", limits.max_anonymous_streams, 0, "max_anonymous_streams", anonymous=True
        )
        self.health = _CallClass(
            "health",
            limits.health_workers,
            HEALTH_QUEUED_PER_WORKER * limits.health_workers,
            "health_workers",
            anonymous=True,
        )
        self._inline = _InlineExecutor()
        self._refusals = {
            c.name: grpc.stream_unary_rpc_method_handler(_Refuse(c.refusal, self._inline)) for c in self.classes()
        }
        self._health_answer = (
            None
            if health_status is None
            else grpc.stream_unary_rpc_method_handler(
                _AnswerHealth(health_status, self._inline),
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            )
        )
        # For a call grpc refuses itself (`bind_server_bound`); should grpc not, this does.
        self._server_refusal = grpc.stream_unary_rpc_method_handler(
            _Refuse(
                f"the broker is serving its bound of {limits.max_concurrent_rpcs} concurrent calls "
                "(max_concurrent_rpcs): retry shortly",
                self._inline,
            )
        )
        self._wrapped: dict[tuple[str, str, bool], tuple[Any, Any]] = {}
        # SHA-256 of recently confirmed API keys -> until when (monotonic). Only the pool
        # choice relies on it; the servicer authenticates every call itself.
        self._known_keys: dict[bytes, float] = {}
        # grpc's server state, when `max_concurrent_rpcs` is set (`bind_server_bound`).
        self._server_state: Any = None

    def bind_server_bound(self, server: Any) -> None:
        """With `max_concurrent_rpcs`, for `server` (a `grpc.server(...,
        maximum_concurrent_rpcs=max_concurrent_rpcs)`, this interceptor its first): grpc
        refuses a call over that bound itself, the cheap way (one batch on the polling
        thread, no handler run; see "Overload" for what it changes), but only after the
        interceptors ran. So this interceptor must not admit such a call,
        or its class would keep the admission (nothing would release it). It reads grpc's
        own count, which grpc holds its lock over from its check to the interceptors, so
        the two decisions are the same. That count is grpcio's private server state:
        raises `RuntimeError` when this grpcio has none that matches (or this interceptor
        is not the first). `tests/test_hardening_admission.py` fails on a grpcio whose
        count and check no longer go together this way."""
        bound = self.limits.max_concurrent_rpcs
        if bound == 0:
            return
        state = getattr(server, "_state", None)
        interceptors = getattr(getattr(state, "interceptor_pipeline", None), "interceptors", None) or (None,)
        if not (
            isinstance(getattr(state, "active_rpc_count", None), int)
            and getattr(state, "maximum_concurrent_rpcs", None) == bound
            and hasattr(state, "lock")
            and interceptors[0] is self
        ):
            raise RuntimeError(
                f"max_concurrent_rpcs needs grpcio's server state, which grpcio {grpc.__version__} does not "
                "expose as expected: set max_concurrent_rpcs to 0 (the call classes' bounds still apply)"
            )
        self._server_state = state

    def classes(self) -> tuple[_CallClass, ...]:
        return (self.caller, self.caller_stream, self.anonymous, self.anonymous_stream, self.health)

    def close(self) -> None:
        """Stops the watchdog and the class pools (after the server has stopped)."""
        self._watchdog.close()
        for call_class in self.classes():
            call_class.pool.shutdown(wait=False, cancel_futures=True)

    # -- on the polling thread: classify and admit (no I/O, no blocking) ------------------

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        state = self._server_state
        if state is not None and state.active_rpc_count >= state.maximum_concurrent_rpcs:
            # grpc refuses this call (RESOURCE_EXHAUSTED) once the interceptors return a
            # handler: no admission, nothing classified. Should it not, the handler refuses.
            self._refused("any", "server_bound")
            return self._server_refusal
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        call_class, check_cert = self._classify(method, handler_call_details.invocation_metadata, handler)
        if not call_class.try_admit():
            if call_class is self.health and self._health_answer is not None:
                return self._health_answer
            self._refused(call_class.name, "bound")
            return self._refusals[call_class.name]
        return self._wrap(method, handler, call_class, check_cert)

    def _classify(self, method: str, metadata: Any, handler: Any) -> tuple[_CallClass, bool]:
        """The call's class, and whether its mTLS certificate must be checked first."""
        if method == HEALTH_CHECK:
            return self.health, False
        streaming = handler.request_streaming or handler.response_streaming
        credential = self._credential(metadata)
        check_cert = credential is None and self._mutual_tls and method in CALLER_METHODS
        if credential or check_cert:
            return (self.caller_stream if streaming else self.caller), check_cert
        return (self.anonymous_stream if streaming else self.anonymous), False

    def _credential(self, metadata: Any) -> bool | None:
        """True for a registered API key, False for another `authorization`, None for none."""
        for key, value in metadata or ():
            if key != AUTHORIZATION:
                continue
            scheme, _, api_key = str(value).strip().partition(" ")
            api_key = api_key.strip()
            if scheme.lower() != _API_KEY_SCHEME or not api_key:
                return False
            return self._registered(api_key)
        return None

    def _registered(self, api_key: str) -> bool:
        # A digest, not the key, is compared with the table: nothing about the key leaks.
        digest = hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).digest()
        now = time.monotonic()
        if self._known_keys.get(digest, 0.0) > now:
            return True
        # From the records loaded last (a FileRegistry would otherwise stat and re-read
        # its file here, on the polling thread); the servicer's own lookup reloads.
        lookup = getattr(self._registry, "cached_server_by_api_key", self._registry.server_by_api_key)
        if lookup(api_key) is None:
            self._known_keys.pop(digest, None)
            return False
        if len(self._known_keys) >= _MAX_KNOWN_KEYS:
            self._known_keys.clear()
        self._known_keys[digest] = now + _KNOWN_KEY_SECONDS
        return True

    def _refused(self, call_class: str, reason: str) -> None:
        if self._on_refusal is not None:
            self._on_refusal(call_class, reason)

    def _wrap(self, method: str, handler: Any, call_class: _CallClass, check_cert: bool) -> Any:
        key = (method, call_class.name, check_cert)
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._build(method, handler, call_class, check_cert)
        if len(self._wrapped) < _MAX_CACHED_HANDLERS:
            self._wrapped[key] = (handler, wrapped)
        return wrapped

    def _build(self, method: str, handler: Any, call_class: _CallClass, check_cert: bool) -> Any:
        behavior: Any
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if not handler.request_streaming and not handler.response_streaming:
            behavior = _UnaryUnary(self, method, handler.unary_unary, call_class, check_cert)
            return grpc.stream_unary_rpc_method_handler(behavior, **serializers)
        if not handler.request_streaming:
            original = handler.unary_stream
            non_blocking = bool(getattr(original, "experimental_non_blocking", False))
            behavior = (_UnaryStreamNonBlocking if non_blocking else _UnaryStream)(
                self, method, original, call_class, check_cert
            )
            return grpc.stream_stream_rpc_method_handler(behavior, **serializers)
        if not handler.response_streaming:
            behavior = _StreamUnary(self, method, handler.stream_unary, call_class, check_cert)
            return grpc.stream_unary_rpc_method_handler(behavior, **serializers)
        behavior = _StreamStream(self, method, handler.stream_stream, call_class, check_cert)
        return grpc.stream_stream_rpc_method_handler(behavior, **serializers)

    # -- on the class's pool thread ---------------------------------------------------------

    def check_certificate(self, call_class: _CallClass, context: Any) -> None:
        """For a call admitted on its mTLS connection: its certificate must be a registered
        server's. Otherwise releases the call's admission and aborts it."""
        try:
            self._callers.identify(context)
        except AuthenticationError as exc:
            call_class.release()
            self._refused(call_class.name, "unauthenticated")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))

    def stream_slot(self, call_class: _CallClass, context: Any, check_cert: bool) -> _Slot:
        """A stream's admission, released once when it ends, after the checks that need no
        request (certificate, the source's share of anonymous streams). Aborts on failure.
        An anonymous stream is cancelled `stream_idle_timeout_seconds` after it started."""
        if check_cert:
            self.check_certificate(call_class, context)
        if call_class.anonymous:
            source = peer_ip(context)
            if self._streams_by_source.enter(source) >= self.limits.max_anonymous_per_source:
                self._streams_by_source.leave(source)
                call_class.release()
                self._refused(call_class.name, "per_source")
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this address already holds {self.limits.max_anonymous_per_source} anonymous streams "
                    "(max_anonymous_per_source): close one, or call as a registered MCP server",
                )
            lifetime = self._watchdog.arm(context, self.limits.stream_idle_timeout_seconds)
            return _Slot(call_class, self._streams_by_source, source, (self._watchdog, lifetime))
        return _Slot(call_class)

    def enter_source(self, call_class: _CallClass, context: Any) -> tuple[str, bool]:
        """For an anonymous unary call on its thread, before anything is read: counts it as
        waiting for its message from its source; returns the source and whether the source
        already had its share (`source_share`) waiting: such a call gets only
        `CROWDED_SOURCE_GRACE_SECONDS` for its message (an honest caller's is already
        there), or, while its class has more than half its bound admitted, is refused at
        once (RESOURCE_EXHAUSTED; its admission released). `leave_source` when read."""
        source = peer_ip(context)
        if self._waiting_by_source.enter(source) < self.source_share:
            return source, False
        if 2 * call_class.admitted <= call_class.limit:
            return source, True
        # Under pressure a grace is too dear (stallers refill faster than it frees threads):
        # the over-share call is refused at once, which costs microseconds, not a thread.
        self._waiting_by_source.leave(source)
        call_class.release()
        self._refused(call_class.name, "per_source")
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this address already has {self.source_share} anonymous calls waiting for their request message "
            "while the broker is busy (its share: a quarter of anonymous_workers, at most "
            "max_anonymous_per_source): retry shortly, send each request promptly, or call as a registered MCP server",
        )
        raise AssertionError("unreachable: abort raises")

    def leave_source(self, source: str) -> None:
        self._waiting_by_source.leave(source)

    def receive(self, requests: Iterator[Any], context: Any, call_class: _CallClass, timeout: float) -> Any:
        """The next request, or None when the caller sent no more. Cancels the call (and
        raises, via `context.abort`) when none arrives within `timeout` seconds (an
        anonymous call's, within `PRESSED_MESSAGE_TIMEOUT_SECONDS` while its class is more
        than half full)."""
        if call_class.anonymous and 2 * call_class.admitted > call_class.limit:
            timeout = min(timeout, PRESSED_MESSAGE_TIMEOUT_SECONDS)
        key = self._watchdog.arm(context, timeout)
        try:
            return next(requests)
        except StopIteration:
            return None
        except grpc.RpcError:  # cancelled: by the caller, or by the watchdog
            return None
        finally:
            late = self._watchdog.disarm(key)
            if late:
                self._refused(call_class.name, "message_timeout")
                context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no request message within {timeout:g} s (message_timeout_seconds): the call was dropped",
                )

    def idle_timeout(self, call_class: _CallClass) -> float:
        if call_class.anonymous:
            return self.limits.message_timeout_seconds
        return self.limits.stream_idle_timeout_seconds


class _Behavior:
    """A wrapped handler: reads the request(s) under the admission rules, then runs the
    original. `experimental_thread_pool` makes grpc run it on the class's threads."""

    def __init__(
        self, admission: AdmissionInterceptor, method: str, original: Any, call_class: _CallClass, check_cert: bool
    ) -> None:
        self.admission = admission
        self.method = method
        self.original = original
        self.call_class = call_class
        self.check_cert = check_cert
        self.experimental_thread_pool = call_class.pool

    def first(self, requests: Iterator[Any], context: Any, *, crowded: bool = False) -> Any:
        timeout = self.admission.limits.message_timeout_seconds
        if crowded:
            timeout = min(timeout, CROWDED_SOURCE_GRACE_SECONDS)
        request = self.admission.receive(requests, context, self.call_class, timeout)
        if request is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{self.method} takes exactly one request message; none was sent"
            )
        return request

    def first_in_slot(self, requests: Iterator[Any], context: Any) -> Any:
        """A unary-request stream's request, read once it holds its stream slot (released
        when the RPC ends, or at once when no request comes)."""
        slot = self.admission.stream_slot(self.call_class, context, self.check_cert)
        self.release_when_done(slot, context)
        try:
            return self.first(requests, context)
        except BaseException:
            slot.release()
            raise

    def release_when_done(self, slot: _Slot, context: Any) -> None:
        if not context.add_callback(slot.release):
            slot.release()


class _UnaryUnary(_Behavior):
    def __call__(self, requests: Iterator[Any], context: Any) -> Any:
        if self.check_cert:
            self.admission.check_certificate(self.call_class, context)
        # Health Check is not counted per source: when its class is full it is answered inline.
        per_source = self.call_class is self.admission.anonymous
        source, crowded = self.admission.enter_source(self.call_class, context) if per_source else ("", False)
        try:
            try:
                request = self.first(requests, context, crowded=crowded)
            finally:
                if per_source:
                    self.admission.leave_source(source)
            return self.original(request, context)
        finally:
            self.call_class.release()


class _UnaryStream(_Behavior):
    def __call__(self, requests: Iterator[Any], context: Any) -> Any:
        request = self.first_in_slot(requests, context)
        return self.original(request, context)


class _UnaryStreamNonBlocking(_Behavior):
    """For grpc's experimental non-blocking handlers (health Watch): the thread is free as
    soon as the request is read; the slot is held until the RPC ends."""

    experimental_non_blocking = True

    def __call__(self, requests: Iterator[Any], context: Any, send_response_callback: Any) -> Any:
        request = self.first_in_slot(requests, context)
        return self.original(request, context, send_response_callback)


class _Requests:
    """A request stream whose every message must come within its deadline."""

    __slots__ = ("_behavior", "_context", "_requests", "_timeout")

    def __init__(self, behavior: _Behavior, requests: Iterator[Any], context: Any) -> None:
        self._behavior = behavior
        self._requests = requests
        self._context = context
        self._timeout = behavior.admission.limits.message_timeout_seconds

    def __iter__(self) -> _Requests:
        return self

    def __next__(self) -> Any:
        behavior = self._behavior
        request = behavior.admission.receive(self._requests, self._context, behavior.call_class, self._timeout)
        if request is None:
            raise StopIteration
        self._timeout = behavior.admission.idle_timeout(behavior.call_class)
        return request


class _StreamUnary(_Behavior):
    def __call__(self, requests: Iterator[Any], context: Any) -> Any:
        slot = self.admission.stream_slot(self.call_class, context, self.check_cert)
        try:
            return self.original(_Requests(self, requests, context), context)
        finally:
            slot.release()


class _StreamStream(_Behavior):
    def __call__(self, requests: Iterator[Any], context: Any) -> Any:
        slot = self.admission.stream_slot(self.call_class, context, self.check_cert)
        self.release_when_done(slot, context)
        return self.original(_Requests(self, requests, context), context)


__all__ = [
    "CALLER_METHODS",
    "CROWDED_SOURCE_GRACE_SECONDS",
    "DEFAULT_MAX_WORKERS",
    "HEALTH_CHECK",
    "PRESSED_MESSAGE_TIMEOUT_SECONDS",
    "AdmissionInterceptor",
    "AdmissionLimits",
    "RefusalRecorder",
]
