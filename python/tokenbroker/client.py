"""`BrokerClient`: a remote broker over gRPC, with the method names of `Broker` (`issue`,
`issue_request`, `validate`, `validate_request`, `validate_batch`, `revoke_session`,
`revoke_client`, `revoke_token`, `sessions`, `jwks`) and their asyncio twins (`aissue`,
`avalidate`, ...). It builds the same request types (`IssueRequest`, `ValidateRequest`),
returns the same domain objects (`IssuedToken`, `Validation`, `Session`) and raises the
same `tokenbroker.errors` exceptions, mapped back from the gRPC status by
`tokenbroker.status` (the table the servicer sends them by).

Because the request is built here, a request the broker would refuse for its own sake (a
lifetime over the limit, two bindings, an empty audience) raises the same
`InvalidArgumentError` before any call, and a token that is not text is answered here, as
`Broker.validate` answers it. A broker that cannot be reached, or does not answer in time,
is `StoreUnavailableError`: callers fail closed either way."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Unpack

import grpc  # type: ignore[import-untyped,unused-ignore]

from tokenbroker._core import IssueRequest, ValidateRequest
from tokenbroker.broker import BatchRequest
from tokenbroker.errors import InvalidArgumentError, TokenBrokerError
from tokenbroker.models import IssuedToken, Session, Validation
from tokenbroker.reason import Reason
from tokenbroker.requests import IssueFields, ValidateFields, issue_request, validate_request
from tokenbroker.status import error_for_status, status_name_of
from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker.v1 import broker_pb2_grpc

# Statuses that say the broker failed, not the request: the message names the broker.
_BROKER_FAILURES = frozenset(("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"))

PathLike = str | os.PathLike[str]


def _read(path: PathLike | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def _reason(number: int) -> Reason:
    try:
        return Reason(number)
    except ValueError:  # a newer broker's reason: not OK, whatever it is
        return Reason.UNSPECIFIED


def validation_from(message: pb.ValidateTokenResponse, audience: str = "") -> Validation:
    """The `Validation` a `ValidateTokenResponse` carries (valid only with reason OK)."""
    reason = _reason(message.reason)
    valid = bool(message.valid) and reason is Reason.OK
    return Validation(
        valid,
        reason,
        message.detail,
        message.client_id,
        message.subject,
        message.session_id,
        audience if valid else "",
        tuple(message.scopes),
        message.expires_at,
        message.jti,
        message.issuer,
        message.request_id,
    )


def _issued(message: pb.IssueTokenResponse) -> IssuedToken:
    return IssuedToken(
        access_token=message.access_token,
        token_type=message.token_type,
        expires_at=message.expires_at,
        session_id=message.session_id,
        scopes=tuple(message.scopes),
        jti=message.jti,
    )


def _sessions(message: pb.ListSessionsResponse, client_id: str) -> list[Session]:
    return [
        Session(s.session_id, client_id, s.audience, s.created_at, s.expires_at, s.last_seen_at, s.last_ip)
        for s in message.sessions
    ]


def _validate_message(request: ValidateRequest) -> pb.ValidateTokenRequest:
    """The wire form of a `ValidateRequest` (protobuf has no None: an absent field is "")."""
    return pb.ValidateTokenRequest(
        token=request.token,
        audience=request.audience,
        dpop_proof=request.dpop_proof or "",
        http_method=request.http_method or "",
        http_uri=request.http_uri or "",
        cert_thumbprint=request.cert_thumbprint or "",
        client_ip=request.client_ip or "",
        required_scopes=request.required_scopes,
        request_id=request.request_id,
        resource=request.resource or "",
    )


def _issue_message(
    request: IssueRequest, client_assertion: str | None, client_secret: str | None
) -> pb.IssueTokenRequest:
    """The wire form of an `IssueRequest` with the client's credential (an absent field is
    empty: "", 0 for the broker's default lifetime)."""
    return pb.IssueTokenRequest(
        client_id=request.client_id,
        client_assertion=client_assertion or "",
        client_secret=client_secret or "",
        audience=request.audience,
        scopes=request.scopes,
        ttl_seconds=request.ttl_seconds or 0,
        session_id=request.session_id or "",
        dpop_jkt=request.dpop_jkt or "",
        cert_thumbprint=request.cert_thumbprint or "",
        client_ip=request.client_ip or "",
        once=request.once,
    )


def _batch_item(n: int, item: BatchRequest) -> ValidateRequest | Validation:
    """One batch entry built: a `ValidateRequest` (or a `Validation`, already answered) is
    taken as it is, a mapping is `token` plus the keyword arguments of `validate`."""
    if isinstance(item, ValidateRequest | Validation):
        return item
    try:
        return validate_request(**item)
    except TypeError as exc:  # a missing or unknown keyword: said before any call
        raise InvalidArgumentError(
            f"batch request {n} needs `token` and `audience` and only the keyword arguments of validate ({exc})"
        ) from None


def _batch(requests: Iterable[BatchRequest]) -> tuple[list[ValidateRequest | Validation], pb.ValidateTokenBatchRequest]:
    """Every entry built, and the batch message of those the broker has to answer. The call
    is made even when none is left (an empty batch), so a caller the broker would refuse
    is refused, as it always was."""
    items = [_batch_item(n, item) for n, item in enumerate(requests)]
    sent = [_validate_message(item) for item in items if isinstance(item, ValidateRequest)]
    return items, pb.ValidateTokenBatchRequest(requests=sent)


def _batch_answers(
    items: list[ValidateRequest | Validation], response: pb.ValidateTokenBatchResponse
) -> list[Validation]:
    """The answers in the order of the requests: the broker's, and those answered here."""
    sent = [item for item in items if isinstance(item, ValidateRequest)]
    answers = iter([validation_from(r, q.audience) for r, q in zip(response.responses, sent, strict=True)])
    return [item if isinstance(item, Validation) else next(answers) for item in items]


class BrokerClient:
    """Calls the broker at `target` ("host:port"). `api_key` identifies the calling MCP
    server (needed for validation and admin calls, not for `issue` or `jwks`). TLS is on
    when `tls` is True or any certificate file is given: `root_cert_file` verifies the
    broker (default: the system roots), `cert_file` + `key_file` are this caller's mTLS
    identity. `timeout` (seconds) bounds every call.

    Sync methods share one channel; the `a*` twins use a grpc.aio channel created on first
    use in the running event loop. Close with `close()` / `aclose()` or use `with` /
    `async with`."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        root_cert_file: PathLike | None = None,
        cert_file: PathLike | None = None,
        key_file: PathLike | None = None,
        tls: bool | None = None,
        timeout: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise InvalidArgumentError("give both cert_file and key_file for a client certificate, or neither")
        self.target = target
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"ApiKey {api_key}"),) if api_key else ()
        self._options = list(options)
        use_tls = tls if tls is not None else any(p is not None for p in (root_cert_file, cert_file, key_file))
        self._tls: tuple[bytes | None, bytes | None, bytes | None] | None = (
            (_read(root_cert_file), _read(key_file), _read(cert_file)) if use_tls else None
        )
        self._channel = self._open(grpc)
        self._stub = broker_pb2_grpc.TokenBrokerStub(self._channel)  # type: ignore[no-untyped-call]
        self._achannel: Any = None
        self._astub: Any = None
        self._aloop: asyncio.AbstractEventLoop | None = None

    def _open(self, module: Any) -> Any:
        """A channel from `grpc` or `grpc.aio` (both have the same factory names)."""
        if self._tls is None:
            return module.insecure_channel(self.target, options=self._options)
        root, key, chain = self._tls
        credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
        return module.secure_channel(self.target, credentials, options=self._options)

    def _aio(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._astub is None or self._aloop is not loop:  # a channel belongs to one event loop
            self._achannel = self._open(grpc.aio)
            self._astub = broker_pb2_grpc.TokenBrokerStub(self._achannel)  # type: ignore[no-untyped-call]
            self._aloop = loop
        return self._astub

    def _error(self, exc: Any) -> TokenBrokerError:
        name = status_name_of(exc)
        details = exc.details() or name
        if name in _BROKER_FAILURES:
            details = f"{details} (broker {self.target}: {name})"
        return error_for_status(name)(details)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    async def _acall(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._aio(), method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    # -- sync -------------------------------------------------------------------------

    def issue(
        self,
        *,
        client_assertion: str | None = None,
        client_secret: str | None = None,
        **fields: Unpack[IssueFields],
    ) -> IssuedToken:
        """`Broker.issue` remotely, plus the client's credential: `client_assertion` (an
        RFC 7523 JWT signed by its registered key) or `client_secret`."""
        request = issue_request(**fields)
        return self.issue_request(request, client_assertion=client_assertion, client_secret=client_secret)

    def issue_request(
        self, request: IssueRequest, *, client_assertion: str | None = None, client_secret: str | None = None
    ) -> IssuedToken:
        """`issue` for a request already built (the one `Broker.issue_request` takes)."""
        return _issued(self._call("IssueToken", _issue_message(request, client_assertion, client_secret)))

    def validate(self, token: str, **fields: Unpack[ValidateFields]) -> Validation:
        """`Broker.validate` remotely, for the caller's own `audience`. A bad token is a
        `Validation` with a reason, never an exception."""
        request = validate_request(token, **fields)
        return request if isinstance(request, Validation) else self.validate_request(request)

    def validate_request(self, request: ValidateRequest) -> Validation:
        """`validate` for a request already built (the one `Broker.validate_request` takes)."""
        return validation_from(self._call("ValidateToken", _validate_message(request)), request.audience)

    def validate_batch(self, requests: Iterable[BatchRequest]) -> list[Validation]:
        """Several validations in one call: each request is a `ValidateRequest` or a mapping
        of `token` and the keyword arguments of `validate`. Answers come in the order of
        the requests."""
        items, message = _batch(requests)
        return _batch_answers(items, self._call("ValidateTokenBatch", message))

    def revoke_session(self, session_id: str) -> int:
        return int(self._call("RevokeSession", pb.RevokeSessionRequest(session_id=session_id)).revoked)

    def revoke_client(self, client_id: str) -> int:
        return int(self._call("RevokeClient", pb.RevokeClientRequest(client_id=client_id)).revoked)

    def revoke_token(self, jti: str) -> int:
        return int(self._call("RevokeToken", pb.RevokeTokenRequest(jti=jti)).revoked)

    def sessions(self, client_id: str) -> list[Session]:
        return _sessions(self._call("ListSessions", pb.ListSessionsRequest(client_id=client_id)), client_id)

    def jwks(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self._call("GetJwks", pb.GetJwksRequest()).jwks_json)
        return doc

    def watch_events(self, client_id: str = "", follow: bool = False) -> Iterator[dict[str, Any]]:
        """The broker's events (an admin server's key), oldest first, each as a dict of the
        DESIGN fields (`evidence` an object): those kept (of `client_id` only, when given);
        with `follow`, then each new one, without a deadline, until the iterator is closed."""
        message = pb.WatchEventsRequest(client_id=client_id, follow=follow)
        call = self._stub.WatchEvents(message, timeout=None if follow else self.timeout, metadata=self._metadata)
        try:
            for event in call:
                evidence = json.loads(event.evidence_json) if event.evidence_json else {}
                yield {
                    "event": event.event,
                    "signal": event.signal,
                    "severity": event.severity,
                    "client_id": event.client_id,
                    "session_id": event.session_id,
                    "source_ip": event.source_ip,
                    "action": event.action,
                    "evidence": evidence,
                    "time": event.time,
                }
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- asyncio twins ----------------------------------------------------------------

    async def aissue(
        self,
        *,
        client_assertion: str | None = None,
        client_secret: str | None = None,
        **fields: Unpack[IssueFields],
    ) -> IssuedToken:
        request = issue_request(**fields)
        return await self.aissue_request(request, client_assertion=client_assertion, client_secret=client_secret)

    async def aissue_request(
        self, request: IssueRequest, *, client_assertion: str | None = None, client_secret: str | None = None
    ) -> IssuedToken:
        return _issued(await self._acall("IssueToken", _issue_message(request, client_assertion, client_secret)))

    async def avalidate(self, token: str, **fields: Unpack[ValidateFields]) -> Validation:
        request = validate_request(token, **fields)
        return request if isinstance(request, Validation) else await self.avalidate_request(request)

    async def avalidate_request(self, request: ValidateRequest) -> Validation:
        return validation_from(await self._acall("ValidateToken", _validate_message(request)), request.audience)

    async def avalidate_batch(self, requests: Iterable[BatchRequest]) -> list[Validation]:
        items, message = _batch(requests)
        return _batch_answers(items, await self._acall("ValidateTokenBatch", message))

    async def arevoke_session(self, session_id: str) -> int:
        return int((await self._acall("RevokeSession", pb.RevokeSessionRequest(session_id=session_id))).revoked)

    async def arevoke_client(self, client_id: str) -> int:
        return int((await self._acall("RevokeClient", pb.RevokeClientRequest(client_id=client_id))).revoked)

    async def arevoke_token(self, jti: str) -> int:
        return int((await self._acall("RevokeToken", pb.RevokeTokenRequest(jti=jti))).revoked)

    async def asessions(self, client_id: str) -> list[Session]:
        return _sessions(await self._acall("ListSessions", pb.ListSessionsRequest(client_id=client_id)), client_id)

    async def ajwks(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((await self._acall("GetJwks", pb.GetJwksRequest())).jwks_json)
        return doc

    async def aclose(self) -> None:
        """Closes the asyncio channel (in its event loop) and the sync channel."""
        if self._achannel is not None:
            await self._achannel.close()
            self._achannel = self._astub = self._aloop = None
        self.close()

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"BrokerClient({self.target!r}, tls={self._tls is not None})"


__all__ = ["BrokerClient", "validation_from"]
