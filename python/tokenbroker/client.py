"""`BrokerClient`: a remote broker over gRPC, with the method names of `Broker` (`issue`,
`validate`, `validate_batch`, `revoke_session`, `revoke_client`, `revoke_token`,
`sessions`, `jwks`) and their asyncio twins (`aissue`, `avalidate`, ...). It returns the
same domain objects (`IssuedToken`, `Validation`, `Session`) and raises the same
`tokenbroker.errors` exceptions, mapped back from the gRPC status:

    UNAUTHENTICATED -> AuthenticationError     PERMISSION_DENIED  -> PermissionDeniedError
    INVALID_ARGUMENT -> InvalidArgumentError   RESOURCE_EXHAUSTED -> SessionLimitExceededError
    NOT_FOUND -> SessionNotFoundError          UNAVAILABLE, DEADLINE_EXCEEDED -> StoreUnavailableError
    anything else -> TokenBrokerError

A broker that cannot be reached is UNAVAILABLE too: callers fail closed either way."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]

from tokenbroker.errors import (
    AuthenticationError,
    InvalidArgumentError,
    PermissionDeniedError,
    SessionLimitExceededError,
    SessionNotFoundError,
    StoreUnavailableError,
    TokenBrokerError,
)
from tokenbroker.models import IssuedToken, Session, Validation
from tokenbroker.reason import Reason
from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker.v1 import broker_pb2_grpc

_ERROR_BY_STATUS: dict[str, type[TokenBrokerError]] = {
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "INVALID_ARGUMENT": InvalidArgumentError,
    "RESOURCE_EXHAUSTED": SessionLimitExceededError,
    "NOT_FOUND": SessionNotFoundError,
    "UNAVAILABLE": StoreUnavailableError,
    "DEADLINE_EXCEEDED": StoreUnavailableError,
}

_VALIDATE_FIELDS = frozenset(
    (
        "token",
        "audience",
        "dpop_proof",
        "http_method",
        "http_uri",
        "cert_thumbprint",
        "client_ip",
        "required_scopes",
        "request_id",
    )
)

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


def _validate_request(
    token: str,
    *,
    audience: str,
    dpop_proof: str | None = None,
    http_method: str | None = None,
    http_uri: str | None = None,
    cert_thumbprint: str | None = None,
    client_ip: str | None = None,
    required_scopes: Sequence[str] = (),
    request_id: str = "",
) -> pb.ValidateTokenRequest:
    if isinstance(required_scopes, str):
        required_scopes = required_scopes.split()
    return pb.ValidateTokenRequest(
        token=token,
        audience=audience,
        dpop_proof=dpop_proof or "",
        http_method=http_method or "",
        http_uri=http_uri or "",
        cert_thumbprint=cert_thumbprint or "",
        client_ip=client_ip or "",
        required_scopes=list(required_scopes),
        request_id=request_id,
    )


def _batch_request(requests: Iterable[Mapping[str, Any]]) -> tuple[pb.ValidateTokenBatchRequest, list[str]]:
    items, audiences = [], []
    for n, item in enumerate(requests):
        unknown = set(item) - _VALIDATE_FIELDS
        if unknown or "token" not in item or "audience" not in item:
            raise InvalidArgumentError(
                f"batch request {n} needs `token` and `audience` and only the keyword arguments of validate"
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )
        fields = dict(item)
        items.append(_validate_request(fields.pop("token"), **fields))
        audiences.append(str(item["audience"]))
    return pb.ValidateTokenBatchRequest(requests=items), audiences


def _issue_request(
    *,
    client_id: str,
    audience: str,
    scopes: Iterable[str] = (),
    ttl_seconds: int | None = None,
    session_id: str | None = None,
    dpop_jkt: str | None = None,
    cert_thumbprint: str | None = None,
    once: bool = False,
    client_ip: str | None = None,
    client_assertion: str | None = None,
    client_secret: str | None = None,
) -> pb.IssueTokenRequest:
    if isinstance(scopes, str):
        scopes = scopes.split()
    return pb.IssueTokenRequest(
        client_id=client_id,
        client_assertion=client_assertion or "",
        client_secret=client_secret or "",
        audience=audience,
        scopes=list(scopes),
        ttl_seconds=ttl_seconds or 0,
        session_id=session_id or "",
        dpop_jkt=dpop_jkt or "",
        cert_thumbprint=cert_thumbprint or "",
        client_ip=client_ip or "",
        once=once,
    )


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
        code = exc.code()
        name = getattr(code, "name", str(code))
        details = exc.details() or name
        error_type = _ERROR_BY_STATUS.get(name, TokenBrokerError)
        if name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"):
            details = f"{details} (broker {self.target}: {name})"
        return error_type(details)

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
        client_id: str,
        audience: str,
        scopes: Iterable[str] = (),
        ttl_seconds: int | None = None,
        session_id: str | None = None,
        dpop_jkt: str | None = None,
        cert_thumbprint: str | None = None,
        once: bool = False,
        client_ip: str | None = None,
        client_assertion: str | None = None,
        client_secret: str | None = None,
    ) -> IssuedToken:
        """`Broker.issue` remotely, plus the client's credential: `client_assertion` (an
        RFC 7523 JWT signed by its registered key) or `client_secret`."""
        request = _issue_request(
            client_id=client_id,
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            session_id=session_id,
            dpop_jkt=dpop_jkt,
            cert_thumbprint=cert_thumbprint,
            once=once,
            client_ip=client_ip,
            client_assertion=client_assertion,
            client_secret=client_secret,
        )
        return _issued(self._call("IssueToken", request))

    def validate(
        self,
        token: str,
        *,
        audience: str,
        dpop_proof: str | None = None,
        http_method: str | None = None,
        http_uri: str | None = None,
        cert_thumbprint: str | None = None,
        client_ip: str | None = None,
        required_scopes: Sequence[str] = (),
        request_id: str = "",
    ) -> Validation:
        """`Broker.validate` remotely, for the caller's own `audience`. A bad token is a
        `Validation` with a reason, never an exception."""
        request = _validate_request(
            token,
            audience=audience,
            dpop_proof=dpop_proof,
            http_method=http_method,
            http_uri=http_uri,
            cert_thumbprint=cert_thumbprint,
            client_ip=client_ip,
            required_scopes=required_scopes,
            request_id=request_id,
        )
        return validation_from(self._call("ValidateToken", request), request.audience)

    def validate_batch(self, requests: Iterable[Mapping[str, Any]]) -> list[Validation]:
        """Several validations in one call: each mapping holds `token` and the keyword
        arguments of `validate`. Answers come in the order of the requests."""
        request, audiences = _batch_request(requests)
        response = self._call("ValidateTokenBatch", request)
        return [validation_from(r, a) for r, a in zip(response.responses, audiences, strict=True)]

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
        client_id: str,
        audience: str,
        scopes: Iterable[str] = (),
        ttl_seconds: int | None = None,
        session_id: str | None = None,
        dpop_jkt: str | None = None,
        cert_thumbprint: str | None = None,
        once: bool = False,
        client_ip: str | None = None,
        client_assertion: str | None = None,
        client_secret: str | None = None,
    ) -> IssuedToken:
        request = _issue_request(
            client_id=client_id,
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            session_id=session_id,
            dpop_jkt=dpop_jkt,
            cert_thumbprint=cert_thumbprint,
            once=once,
            client_ip=client_ip,
            client_assertion=client_assertion,
            client_secret=client_secret,
        )
        return _issued(await self._acall("IssueToken", request))

    async def avalidate(
        self,
        token: str,
        *,
        audience: str,
        dpop_proof: str | None = None,
        http_method: str | None = None,
        http_uri: str | None = None,
        cert_thumbprint: str | None = None,
        client_ip: str | None = None,
        required_scopes: Sequence[str] = (),
        request_id: str = "",
    ) -> Validation:
        request = _validate_request(
            token,
            audience=audience,
            dpop_proof=dpop_proof,
            http_method=http_method,
            http_uri=http_uri,
            cert_thumbprint=cert_thumbprint,
            client_ip=client_ip,
            required_scopes=required_scopes,
            request_id=request_id,
        )
        return validation_from(await self._acall("ValidateToken", request), request.audience)

    async def avalidate_batch(self, requests: Iterable[Mapping[str, Any]]) -> list[Validation]:
        request, audiences = _batch_request(requests)
        response = await self._acall("ValidateTokenBatch", request)
        return [validation_from(r, a) for r, a in zip(response.responses, audiences, strict=True)]

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
