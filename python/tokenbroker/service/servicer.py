"""`TokenBrokerServicer`: the gRPC face of a `Broker`. It only translates: protobuf to
keyword arguments, domain objects to protobuf, `tokenbroker.errors` to status codes.
Metrics and audit lines are the interceptors' (`tokenbroker.service.metrics_interceptor`,
`tokenbroker.service.audit_interceptor`): the servicer says what it decided in a
`Decision` (`tokenbroker.service.decisions`) and records nothing itself.

An invalid token is an answer (status OK, `valid=false`, a reason); RPC errors are for the
caller (see `STATUS_BY_ERROR` and proto/tokenbroker/v1/broker.proto). Error messages are
the domain exceptions' own, which never carry a token, secret or key.

Every request field is bounded here, before anything is looked up or logged: an oversized
field is INVALID_ARGUMENT naming the field and its limit (never its value). Limits: ids
(`client_id`, `session_id`, `jti`, `request_id`) 256 bytes; URIs (`audience`,
`http_uri`) 2048; `client_assertion`, `token`, `dpop_proof` 8 KiB; `client_secret` 1 KiB;
`client_ip` 128; `resource` 2048; `dpop_jkt`, `cert_thumbprint` 128; `http_method` 16; at most 64 scopes
(`scopes`, `required_scopes`) of 256 bytes each."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import grpc  # type: ignore[import-untyped,unused-ignore]

from tokenbroker import status
from tokenbroker._core import ValidateRequest
from tokenbroker.broker import Broker
from tokenbroker.client_auth import ClientAuthenticator
from tokenbroker.errors import InvalidArgumentError, TokenBrokerError
from tokenbroker.events import Event
from tokenbroker.models import IssuedToken, Session, Validation
from tokenbroker.registry import ClientRecord, Registry, ServerRecord
from tokenbroker.requests import IssueFields, issue_request, validate_request
from tokenbroker.service.auth import CallerAuthenticator, peer_ip
from tokenbroker.service.decisions import ISSUE, Decision, decide
from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker.v1 import broker_pb2_grpc

log = logging.getLogger("tokenbroker.service")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TokenBroker"].full_name
MAX_BATCH = 1000
GRANT_RULE = "client.approved"

MAX_ID_BYTES = 256
MAX_URI_BYTES = 2048
MAX_RESOURCE_BYTES = 2048
MAX_CREDENTIAL_BYTES = 8 * 1024
MAX_SECRET_BYTES = 1024
MAX_ADDRESS_BYTES = 128
MAX_THUMBPRINT_BYTES = 128
MAX_METHOD_BYTES = 16
MAX_SCOPES = 64
MAX_SCOPE_BYTES = 256

# tokenbroker.status's table, with grpc's codes for its names.
STATUS_BY_ERROR: tuple[tuple[type[TokenBrokerError], Any], ...] = tuple(
    (error_type, grpc.StatusCode[name]) for error_type, name in status.STATUS_BY_ERROR
)


def status_for(exc: TokenBrokerError) -> Any:
    """The gRPC status code for a domain error (INTERNAL for one that has none)."""
    return grpc.StatusCode[status.status_name_for(exc)]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


class ClientAuthenticatorLike(Protocol):
    """`tokenbroker.issuance.ClientAuthenticator`, as the servicer uses it."""

    def authenticate(
        self,
        *,
        client_id: str,
        client_assertion: str | None,
        client_secret: str | None,
        audience: str,
        scopes: Iterable[str],
        client_ip: str,
        dpop_jkt: str | None,
        cert_thumbprint: str | None,
    ) -> ClientRecord: ...


class EventsLike(Protocol):
    """`tokenbroker.events.Events`, as WatchEvents reads it."""

    def watch(
        self, client_id: str | None, *, follow: bool, active: Callable[[], bool]
    ) -> Generator[Event, None, None]: ...


# -- bounds ----------------------------------------------------------------------------------


def _check_size(name: str, value: str, limit: int) -> None:
    """Raises `InvalidArgumentError` when `value` is longer than `limit` UTF-8 bytes."""
    if len(value) <= limit // 4:  # a UTF-8 character is at most 4 bytes: no need to encode
        return
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidArgumentError(f"{name} is {size} bytes: at most {limit} are accepted")


def _check_scopes(name: str, scopes: Any) -> None:
    if len(scopes) > MAX_SCOPES:
        raise InvalidArgumentError(f"{name} holds {len(scopes)} scopes: at most {MAX_SCOPES} are accepted")
    for scope in scopes:
        _check_size(f"a scope in {name}", scope, MAX_SCOPE_BYTES)


def check_issue_bounds(request: pb.IssueTokenRequest) -> None:
    """Raises `InvalidArgumentError` when a field of an IssueToken request is too large."""
    _check_size("client_id", request.client_id, MAX_ID_BYTES)
    _check_size("client_assertion", request.client_assertion, MAX_CREDENTIAL_BYTES)
    _check_size("client_secret", request.client_secret, MAX_SECRET_BYTES)
    _check_size("audience", request.audience, MAX_URI_BYTES)
    _check_scopes("scopes", request.scopes)
    _check_size("session_id", request.session_id, MAX_ID_BYTES)
    _check_size("dpop_jkt", request.dpop_jkt, MAX_THUMBPRINT_BYTES)
    _check_size("cert_thumbprint", request.cert_thumbprint, MAX_THUMBPRINT_BYTES)
    _check_size("client_ip", request.client_ip, MAX_ADDRESS_BYTES)


def check_validate_bounds(request: pb.ValidateTokenRequest) -> None:
    """Raises `InvalidArgumentError` when a field of a ValidateToken request is too large."""
    _check_size("token", request.token, MAX_CREDENTIAL_BYTES)
    _check_size("audience", request.audience, MAX_URI_BYTES)
    _check_size("dpop_proof", request.dpop_proof, MAX_CREDENTIAL_BYTES)
    _check_size("http_method", request.http_method, MAX_METHOD_BYTES)
    _check_size("http_uri", request.http_uri, MAX_URI_BYTES)
    _check_size("cert_thumbprint", request.cert_thumbprint, MAX_THUMBPRINT_BYTES)
    _check_size("client_ip", request.client_ip, MAX_ADDRESS_BYTES)
    _check_scopes("required_scopes", request.required_scopes)
    _check_size("request_id", request.request_id, MAX_ID_BYTES)
    _check_size("resource", request.resource, MAX_RESOURCE_BYTES)


# -- domain objects <-> protobuf ------------------------------------------------------------


def issued_response(issued: IssuedToken) -> pb.IssueTokenResponse:
    return pb.IssueTokenResponse(
        access_token=issued.access_token,
        token_type=issued.token_type,
        expires_at=issued.expires_at,
        session_id=issued.session_id,
        scopes=issued.scopes,
        jti=issued.jti,
    )


def validation_response(answer: Validation) -> pb.ValidateTokenResponse:
    return pb.ValidateTokenResponse(
        valid=answer.valid,
        reason=int(answer.reason),  # type: ignore[arg-type]  # tokenbroker.Reason numbers are the wire numbers
        detail=answer.detail,
        client_id=answer.client_id,
        subject=answer.subject,
        session_id=answer.session_id,
        scopes=answer.scopes,
        expires_at=answer.expires_at,
        jti=answer.jti,
        issuer=answer.issuer,
        request_id=answer.request_id,
    )


def session_message(session: Session) -> pb.Session:
    return pb.Session(
        session_id=session.session_id,
        audience=session.audience,
        created_at=session.created_at,
        expires_at=session.expires_at,
        last_seen_at=session.last_seen_at,
        last_ip=session.last_ip,
    )


def event_message(event: Event) -> pb.Event:
    return pb.Event(
        event=event.event,
        signal=event.signal,
        severity=event.severity,
        client_id=event.client_id,
        session_id=event.session_id,
        source_ip=event.source_ip,
        action=event.action,
        evidence_json=json.dumps(event.evidence, separators=(",", ":"), default=str),
        time=event.time,
    )


def engine_request(request: pb.ValidateTokenRequest) -> ValidateRequest | Validation:
    """The `ValidateRequest` a `ValidateTokenRequest` carries (its constructor maps the
    wire's empty fields to None), or the answer for a token that cannot be one. Raises
    `InvalidArgumentError` for an empty audience."""
    return validate_request(
        request.token,
        audience=request.audience,
        dpop_proof=request.dpop_proof,
        http_method=request.http_method,
        http_uri=request.http_uri,
        cert_thumbprint=request.cert_thumbprint,
        client_ip=request.client_ip,
        required_scopes=request.required_scopes,
        request_id=request.request_id,
        resource=request.resource,
    )


_T = TypeVar("_T")
_S = TypeVar("_S")
_R = TypeVar("_R")
_END = object()


def _translated(handler: Callable[[_S, _R, Any], _T]) -> Callable[[_S, _R, Any], _T]:
    """`handler`, a unary RPC method, with its domain errors sent as their status codes
    and any other error as INTERNAL (logged; the caller learns nothing of it). Applied
    once, where the method is defined: nothing is built per call."""
    method = handler.__name__

    @functools.wraps(handler)
    def translated(self: _S, request: _R, context: Any) -> _T:
        try:
            return handler(self, request, context)
        except TokenBrokerError as exc:
            context.abort(status_for(exc), _one_line(exc))
            raise  # unreachable: abort raises
        except Exception:
            log.exception("%s failed", method)
            context.abort(grpc.StatusCode.INTERNAL, "internal error: see the broker's log")
            raise

    return translated


class TokenBrokerServicer(broker_pb2_grpc.TokenBrokerServicer):  # type: ignore[misc,unused-ignore]
    """Serves one `Broker` (sync gRPC server: handlers run on its thread pool)."""

    def __init__(
        self,
        broker: Broker,
        *,
        registry: Registry,
        authenticator: ClientAuthenticatorLike,
        stream_workers: int = 8,
        stream_window: int = 64,
        events: EventsLike | None = None,
    ) -> None:
        self._broker = broker
        self._events = events
        self._callers = CallerAuthenticator(registry)
        self._authenticator = authenticator
        self._stream_window = stream_window
        # Stream requests are validated here, so one stream can have several in flight.
        self._stream_pool = ThreadPoolExecutor(max_workers=stream_workers, thread_name_prefix="tb-stream")

    def close(self) -> None:
        """Stops the stream worker threads (after the server has stopped)."""
        self._stream_pool.shutdown(wait=False, cancel_futures=True)

    # -- plumbing ---------------------------------------------------------------------

    def _validate_for(self, context: Any, request: pb.ValidateTokenRequest) -> pb.ValidateTokenResponse:
        check_validate_bounds(request)  # before the caller's key is looked up
        return self._validate(self._callers.identify(context), request)

    def _validate(self, caller: ServerRecord, request: pb.ValidateTokenRequest) -> pb.ValidateTokenResponse:
        built = engine_request(request)
        self._callers.check_audience(caller, request.audience)
        answer = built if isinstance(built, Validation) else self._broker.validate_request(built)
        return validation_response(answer)

    def _admin(self, context: Any, action: str, **fields: str) -> ServerRecord:
        """The caller, when it is an admin; every admin decision is audited, before it is
        carried out. The fields (ids) are bounded first."""
        for name, value in fields.items():
            _check_size("session_id" if name == "session" else name, value, MAX_ID_BYTES)
        caller = self._callers.identify(context)
        decision, rule = ("grant", "caller.admin") if caller.admin else ("refuse", "caller.not_admin")
        client_id = fields.pop("client_id", "")
        decide(
            context,
            Decision(action, client_id, "", decision, rule, peer_ip(context), {"caller": caller.server_id, **fields}),
        )
        self._callers.check_admin(caller, action.replace("_", " "))
        return caller

    # -- issuance ---------------------------------------------------------------------

    def _client_ip(self, request: pb.IssueTokenRequest, context: Any) -> tuple[str, dict[str, Any]]:
        """The client's address, and what the audit line says about a relayed one. The
        request's `client_ip` is believed only from a registered server flagged
        `relay_client_ip` that owns the requested audience (the gateway in front of that
        MCP server); anyone else is judged by the address it connects from, so neither a
        client nor an unrelated server can name an address inside the `allowed_cidrs`."""
        peer = peer_ip(context)
        if not request.client_ip:
            return peer, {}
        try:
            caller = self._callers.identify(context)
        except TokenBrokerError:
            return peer, {"relayed_ip": "ignored"}
        if caller.relay_client_ip and request.audience in caller.audiences:
            return request.client_ip, {"relayed_by": caller.server_id, "peer_ip": peer}
        return peer, {"relayed_ip": "ignored", "caller": caller.server_id}

    @_translated
    def IssueToken(self, request: pb.IssueTokenRequest, context: Any) -> pb.IssueTokenResponse:
        """Every grant and refusal is a `Decision` (audited), made before the answer leaves."""
        check_issue_bounds(request)  # before anything is looked up or logged
        client_ip, relay = self._client_ip(request, context)
        scopes = list(request.scopes)
        record: ClientRecord | None = None
        try:
            # The stateless rules (ids, lifetime, scopes, binding) before the client is
            # looked up; the constructor maps the wire's empty fields to None.
            fields: IssueFields = {
                "client_id": request.client_id,
                "audience": request.audience,
                "scopes": scopes,
                "ttl_seconds": request.ttl_seconds,
                "session_id": request.session_id,
                "dpop_jkt": request.dpop_jkt,
                "cert_thumbprint": request.cert_thumbprint,
                "once": request.once,
                "client_ip": client_ip,
            }
            wanted = issue_request(**fields)
            record = self._authenticator.authenticate(
                client_id=wanted.client_id,
                client_assertion=request.client_assertion or None,
                client_secret=request.client_secret or None,
                audience=wanted.audience,
                scopes=wanted.scopes,
                client_ip=client_ip,
                dpop_jkt=wanted.dpop_jkt,
                cert_thumbprint=wanted.cert_thumbprint,
            )
            # Whatever authenticator is plugged in, the client's binding decides.
            ClientAuthenticator.check_binding(record, wanted.dpop_jkt, wanted.cert_thumbprint)
            window = record.usage_window_mask()
            if window is not None:  # the record's own window, known only now (else the broker may learn one)
                fields["usage_window"] = window
                wanted = issue_request(**fields)
            issued = self._broker.issue_request(wanted, session_limit=record.session_limit)
        except TokenBrokerError as exc:
            rule = str(getattr(exc, "rule", type(exc).__name__))
            # A caller that never proved itself gets rate-limited audit lines (see tokenbroker.audit).
            authenticated = record is not None or bool(getattr(exc, "authenticated", False))
            refusal = {**relay, "reason": _one_line(exc), "authenticated": authenticated}
            decide(context, Decision(ISSUE, request.client_id, request.audience, "refuse", rule, client_ip, refusal))
            raise
        grant = {
            **relay,
            "door": "grpc",
            "auth_method": "private_key_jwt" if request.client_assertion else "client_secret",
            "session": issued.session_id,
            "jti": issued.jti,
            "binding": str(record.binding),
            **record.accountability(),
            "scope": " ".join(issued.scopes),
            "expires_at": issued.expires_at,
        }
        decide(context, Decision(ISSUE, request.client_id, request.audience, "grant", GRANT_RULE, client_ip, grant))
        return issued_response(issued)

    # -- validation -------------------------------------------------------------------

    @_translated
    def ValidateToken(self, request: pb.ValidateTokenRequest, context: Any) -> pb.ValidateTokenResponse:
        return self._validate_for(context, request)

    @_translated
    def ValidateTokenBatch(self, request: pb.ValidateTokenBatchRequest, context: Any) -> pb.ValidateTokenBatchResponse:
        if len(request.requests) > MAX_BATCH:
            raise InvalidArgumentError(f"a batch holds at most {MAX_BATCH} requests, not {len(request.requests)}")
        for item in request.requests:
            check_validate_bounds(item)
        caller = self._callers.identify(context)
        # Every request is built and checked before any is validated: no replay record
        # is spent on a batch that is then refused.
        built = [engine_request(item) for item in request.requests]
        for item in request.requests:
            self._callers.check_audience(caller, item.audience)
        answers = self._broker.validate_batch(built)
        return pb.ValidateTokenBatchResponse(responses=[validation_response(a) for a in answers])

    def ValidateTokenStream(
        self, request_iterator: Iterator[pb.ValidateTokenRequest], context: Any
    ) -> Iterator[pb.ValidateTokenResponse]:
        """Answers each request as soon as it is validated (up to `stream_window` at once
        per stream), so answers may come out of order: match them by `request_id`. A
        request the caller may not make, or a store outage, ends the stream with that
        status. (A cancelled stream is closed: GeneratorExit passes through.)"""
        try:
            self._callers.identify(context)  # refuse an unknown caller before reading anything
            yield from self._stream(request_iterator, context)
        except TokenBrokerError as exc:
            context.abort(status_for(exc), _one_line(exc))
        except Exception:
            log.exception("ValidateTokenStream failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error: see the broker's log")

    def _stream(self, requests: Iterator[pb.ValidateTokenRequest], context: Any) -> Iterator[pb.ValidateTokenResponse]:
        done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        window = threading.BoundedSemaphore(self._stream_window)
        stop = threading.Event()

        def read() -> None:
            submitted = 0
            try:
                for request in requests:
                    while not window.acquire(timeout=0.25):
                        if stop.is_set() or not context.is_active():
                            return
                    if stop.is_set():
                        return
                    # The caller is looked up again for every request: a server removed from the
                    # registry, or one of its audiences, stops validating on open streams too.
                    future = self._stream_pool.submit(self._validate_for, context, request)
                    future.add_done_callback(done.put)
                    submitted += 1
            except Exception as exc:  # the request stream broke (cancelled, deadline)
                done.put(exc)
            finally:
                done.put((_END, submitted))

        reader = threading.Thread(target=read, name="tb-stream-reader", daemon=True)
        reader.start()
        answered, expected = 0, None
        try:
            while expected is None or answered < expected:
                item = done.get()
                if isinstance(item, tuple) and item[0] is _END:
                    expected = item[1]
                elif isinstance(item, Future):
                    answered += 1
                    window.release()
                    yield item.result()
                elif isinstance(item, BaseException):
                    return  # the caller went away: nobody to answer
        finally:
            stop.set()

    # -- revocation and sessions --------------------------------------------------------

    @_translated
    def RevokeSession(self, request: pb.RevokeSessionRequest, context: Any) -> pb.RevokeResponse:
        if not request.session_id:
            raise InvalidArgumentError("session_id is required")
        self._admin(context, "revoke_session", session=request.session_id)
        return pb.RevokeResponse(revoked=self._broker.revoke_session(request.session_id))

    @_translated
    def RevokeClient(self, request: pb.RevokeClientRequest, context: Any) -> pb.RevokeResponse:
        if not request.client_id:
            raise InvalidArgumentError("client_id is required")
        self._admin(context, "revoke_client", client_id=request.client_id)
        return pb.RevokeResponse(revoked=self._broker.revoke_client(request.client_id))

    @_translated
    def RevokeToken(self, request: pb.RevokeTokenRequest, context: Any) -> pb.RevokeResponse:
        if not request.jti:
            raise InvalidArgumentError("jti is required")
        self._admin(context, "revoke_token", jti=request.jti)
        return pb.RevokeResponse(revoked=self._broker.revoke_token(request.jti))

    @_translated
    def ListSessions(self, request: pb.ListSessionsRequest, context: Any) -> pb.ListSessionsResponse:
        if not request.client_id:
            raise InvalidArgumentError("client_id is required")
        self._admin(context, "list_sessions", client_id=request.client_id)
        found = self._broker.sessions(request.client_id)
        return pb.ListSessionsResponse(sessions=[session_message(s) for s in found])

    # -- events -----------------------------------------------------------------------

    def WatchEvents(self, request: pb.WatchEventsRequest, context: Any) -> Iterator[pb.Event]:
        """The broker's events, for admin callers (audited as `watch_events`, like the
        other admin calls): those kept, oldest first (of `client_id` only, when given),
        then with `follow` each new one until the caller goes away. With a Redis store,
        every replica's (the stream); else this broker's. A cancelled stream is closed:
        GeneratorExit passes through."""
        if self._events is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this broker's service was built without its events")
            return
        try:
            self._admin(context, "watch_events", client_id=request.client_id)
            watched = self._events.watch(request.client_id or None, follow=request.follow, active=context.is_active)
            with contextlib.closing(watched):  # a cancelled stream lets its follower go at once
                for event in watched:
                    yield event_message(event)
        except TokenBrokerError as exc:
            context.abort(status_for(exc), _one_line(exc))
        except Exception:
            log.exception("WatchEvents failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error: see the broker's log")

    # -- public -----------------------------------------------------------------------

    @_translated
    def GetJwks(self, request: pb.GetJwksRequest, context: Any) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(jwks_json=json.dumps(self._broker.jwks(), separators=(",", ":")))


__all__ = [
    "MAX_BATCH",
    "MAX_CREDENTIAL_BYTES",
    "MAX_ID_BYTES",
    "MAX_SCOPES",
    "MAX_URI_BYTES",
    "SERVICE_NAME",
    "STATUS_BY_ERROR",
    "ClientAuthenticatorLike",
    "EventsLike",
    "TokenBrokerServicer",
    "check_issue_bounds",
    "check_validate_bounds",
    "event_message",
    "issued_response",
    "session_message",
    "status_for",
    "validation_response",
]
