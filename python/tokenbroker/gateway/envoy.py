"""`envoy.service.auth.v3.Authorization/Check` on the gRPC port: Envoy's external
authorization (the `ext_authz` HTTP filter, gRPC service), over the protos of PyPI's
`xds-protos`.

Envoy authenticates like any registered server: `authorization: ApiKey <key>` in the
filter's `grpc_service.initial_metadata`, or its mTLS client certificate. A `CheckRequest`
maps to the validation `/authz` runs (`tokenbroker.gateway.door`):
- `attributes.request.http`: `method`, `scheme`, `host`, `path` (query dropped) and the
  headers (`headers`, or `header_map` when Envoy sends that instead): `authorization`,
  `dpop`, `x-tokenbroker-required-scopes` (which only adds scopes);
- `attributes.context_extensions`: `required_scopes` (per route in Envoy's configuration,
  `check_settings.context_extensions`), added to the server record's;
- `attributes.source.address`: the client's address, believed only when Envoy's own
  address is in `trusted_proxies` (else Envoy's address is the client's);
- `attributes.source.certificate` (`include_peer_certificate: true`): the client's
  certificate, URL-encoded PEM, whose `x5t#S256` a certificate-bound token must match;
- `attributes.request.http.body` / `raw_body` (`with_request_body`): a JSON-RPC body names
  the resource, for detection.

Answers (as the ext_authz API specifies): `status` OK and `ok_response` with the
`x-tokenbroker-client-id`, `-session-id`, `-scopes` headers (overwriting any the client
sent) and `headers_to_remove` `authorization` and `dpop`; or `status` UNAUTHENTICATED,
PERMISSION_DENIED, INVALID_ARGUMENT or UNAVAILABLE with a `denied_response` carrying
401 / 403 / 400 / 503, the `www-authenticate` challenge and a JSON body."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from tokenbroker.broker import Broker
from tokenbroker.errors import TokenBrokerError
from tokenbroker.gateway.door import CREDENTIAL_HEADERS, GatewayDoor, OriginalRequest, refusal_for_error
from tokenbroker.gateway.proxies import TrustedProxies
from tokenbroker.jsonrpc_resource import MAX_BODY, resource_of
from tokenbroker.models import Validation
from tokenbroker.resource_guard import Refusal, cert_thumbprint, description
from tokenbroker.service.auth import CallerAuthenticator, peer_ip

log = structlog.get_logger("tokenbroker.gateway")

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_RPC_CODES = {400: code_pb2.INVALID_ARGUMENT, 401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED}
_HTTP_CODES = {400: 400, 401: 401, 403: 403, 500: 500, 503: 503}


def _headers(http: Any) -> dict[str, list[str]]:
    """The request's headers by lower-case name: `headers` (Envoy joins repeated ones with
    a comma), or `header_map` (each value on its own)."""
    found: dict[str, list[str]] = {}
    if http.headers:
        for name, value in http.headers.items():
            found.setdefault(name.lower(), []).append(value)
        return found
    for header in http.header_map.headers:
        value = header.value or header.raw_value.decode("utf-8", "replace")
        found.setdefault(header.key.lower(), []).append(value)
    return found


def _header(value: str, append_action: int = _OVERWRITE) -> Any:
    name, _, text = value.partition(":")
    # keep_empty_value: an empty scopes header still overwrites a client's own.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=text.strip()), append_action=append_action, keep_empty_value=True
    )


def _body_resource(http: Any, headers: dict[str, list[str]]) -> str | None:
    media = (headers.get("content-type") or [""])[0].partition(";")[0].strip().lower()
    if http.method != "POST" or media != "application/json":
        return None
    body = http.raw_body or http.body.encode("utf-8", "replace")
    return resource_of(bytes(body)) if body and len(body) <= MAX_BODY else None


class EnvoyAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Envoy's ext_authz `Check`, validating with `broker` for the calling gateway."""

    def __init__(self, broker: Broker, callers: CallerAuthenticator, trusted_proxies: TrustedProxies):
        self._broker = broker
        self._callers = callers
        self._proxies = trusted_proxies
        self._door = GatewayDoor()

    def _original(self, request: Any, context: Any) -> OriginalRequest:
        attributes = request.attributes
        http = attributes.request.http
        headers = _headers(http)
        source = attributes.source
        address = source.address.socket_address.address
        client_ip = address if address and self._proxies.trusts(peer_ip(context)) else peer_ip(context)
        cert = None
        if source.certificate:
            try:
                cert = cert_thumbprint(unquote(source.certificate))
            except (ValueError, TypeError):
                raise Refusal(400, "invalid_request", "the forwarded peer certificate is not PEM") from None
        route = attributes.context_extensions.get("required_scopes", "")
        scopes = " ".join([*headers.get("x-tokenbroker-required-scopes", ()), route])
        resource = _body_resource(http, headers)  # never a header: the client could name its own
        return OriginalRequest(
            method=http.method.upper(),
            scheme=http.scheme,
            host=http.host,
            target=http.path,
            authorization=tuple(headers.get("authorization", ())),
            proofs=tuple(headers.get("dpop", ())),
            client_ip=client_ip or None,
            cert_thumbprint=cert,
            resource=resource,
            route_scopes=scopes,
        )

    def Check(self, request: Any, context: Any) -> Any:
        try:
            gateway = self._callers.identify(context)
        except TokenBrokerError as exc:  # no registered caller: an RPC error, as every other method's
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # unreachable: abort raises
        audience: str | None = None
        try:
            original = self._original(request, context)
            routed = self._door.audience_of(original)
            audience = routed if routed in gateway.audiences else None  # challenges for its own only
            prepared = self._door.prepare(gateway, original, routed)
            built = prepared.request
            try:
                validation = built if isinstance(built, Validation) else self._broker.validate_request(built)
            except TokenBrokerError as exc:
                raise refusal_for_error(exc) from None
            allowed = self._door.answer(prepared, validation)
        except Refusal as refusal:
            log.info(
                "ext_authz refused",
                status=refusal.status,
                error=refusal.error or "no credentials",
                reason=refusal.reason or None,
                audience=audience,
                gateway=gateway.server_id,
            )
            return self._denied(refusal, audience)
        ok = external_auth_pb2.OkHttpResponse(
            headers=[_header(f"{name.lower()}: {value}") for name, value in allowed.headers()],
            headers_to_remove=[name.lower() for name in CREDENTIAL_HEADERS],
        )
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)

    def _denied(self, refusal: Refusal, audience: str | None) -> Any:
        headers = [_header("content-type: application/json"), _header("cache-control: no-store")]
        challenges = self._door.challenges(audience).for_refusal(refusal)
        if challenges:
            headers.append(_header(f"www-authenticate: {', '.join(challenges)}"))
        if refusal.status == 503:
            headers.append(_header("retry-after: 1"))
        error = refusal.error or "unauthorized"
        text = description(refusal.description) if refusal.error else "authentication required"
        rpc = _RPC_CODES.get(refusal.status, code_pb2.UNAVAILABLE if refusal.status == 503 else code_pb2.INTERNAL)
        denied = external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=_HTTP_CODES.get(refusal.status, 500)),
            headers=headers,
            body=json.dumps({"error": error, "error_description": text}),
        )
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=rpc, message=text), denied_response=denied)


def add_envoy_authorization(server: Any, broker: Broker, callers: CallerAuthenticator, proxies: TrustedProxies) -> None:
    """Serves Envoy's `Check` on `server` (a `grpc.Server`)."""
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(EnvoyAuthorization(broker, callers, proxies), server)


__all__ = ["CHECK_METHOD", "EnvoyAuthorization", "add_envoy_authorization"]
