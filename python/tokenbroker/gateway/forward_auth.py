"""`GET|POST /authz`: forward auth, the door nginx's `auth_request`, Traefik's
`forwardAuth` and Caddy's `forward_auth` knock on before they pass a request upstream.

The gateway authenticates with `X-Tokenbroker-Api-Key` (a registered server's key; its
audiences are the routes it may ask about). It describes the client's request with
`X-Forwarded-Method` (or nginx's `X-Original-Method`; else the method of this request,
which nginx keeps), `X-Forwarded-Proto`, `X-Forwarded-Host` and `X-Forwarded-Uri` (or
`X-Original-URI`), and passes the client's `Authorization` and `DPoP` as they came. The
client's address is `X-Forwarded-For` / `X-Real-IP` only when the gateway's own address is
in `trusted_proxies`. Optional: `X-Tokenbroker-Required-Scopes` (the route's scopes, set by
the gateway's configuration), `X-Tokenbroker-Resource` (what the request touches, for
detection; a forwarded JSON-RPC body, Traefik's `forwardBody`, is read for it too),
`X-Tokenbroker-Client-Cert` (the client's certificate, URL-encoded PEM as nginx's
`$ssl_client_escaped_cert`, for certificate-bound tokens).

Answers: 200 with `X-Tokenbroker-Client-Id`, `-Session-Id`, `-Scopes` (the gateway copies
them to the upstream request, and strips `Authorization` and `DPoP`); 401 with one
`WWW-Authenticate` holding the DPoP and Bearer challenges (`resource_metadata` naming the
route's RFC 9728 document); 403 `insufficient_scope` with `scope` (403 `access_denied`,
no challenge, for a route that is not one of the gateway's audiences); 400 for a request
that could route somewhere other than where its proof was signed for, or that the gateway
describes incompletely (nginx answers the client 500: a configuration error); 401
`invalid_client` when the gateway's own key is missing or unknown; 503 when the store
cannot answer (fail closed).

The RFC 9728 documents the challenges name are served here too, at
`/.well-known/oauth-protected-resource` plus a route's path, for any registered audience
(`X-Forwarded-Proto` and `-Host` from a trusted proxy say which host was asked)."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenbroker.app import Components
from tokenbroker.errors import TokenBrokerError
from tokenbroker.gateway.door import GatewayDoor, OriginalRequest, refusal_for_error
from tokenbroker.gateway.proxies import TrustedProxies
from tokenbroker.http.errors import NO_STORE
from tokenbroker.jsonrpc_resource import MAX_BODY, resource_of
from tokenbroker.models import Validation
from tokenbroker.registry import ServerRecord
from tokenbroker.resource_guard import Refusal, cert_thumbprint, description
from tokenbroker.resource_metadata import WELL_KNOWN_PATH, ProtectedResourceMetadata

log = structlog.get_logger("tokenbroker.gateway")

API_KEY_HEADER = "x-tokenbroker-api-key"
BODY_SECONDS = 5.0
GATEWAY_CHALLENGE = 'ApiKey realm="tokenbroker", header="X-Tokenbroker-Api-Key"'


def _one(request: Request, *names: str) -> str | None:
    """The value of the first of `names` the request has; two values of one: 400."""
    for name in names:
        values = request.headers.getlist(name)
        if len(values) > 1:
            raise Refusal(400, "invalid_request", f"more than one {name} header")
        if values:
            return values[0].strip()
    return None


def _agreed(request: Request, *names: str) -> str | None:
    """The value the headers `names` give (two spellings of one fact: Traefik's and Caddy's
    X-Forwarded-*, nginx's X-Original-*); 400 when they disagree, for a gateway that set
    one of them passes on a client's own copy of the other."""
    values = {value for value in (_one(request, name) for name in names) if value is not None}
    if len(values) > 1:
        raise Refusal(400, "invalid_request", f"{' and '.join(names)} disagree: the gateway must set them")
    return values.pop() if values else None


def _client_cert(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return cert_thumbprint(unquote(text))
    except (ValueError, TypeError):
        raise Refusal(
            400, "invalid_request", "X-Tokenbroker-Client-Cert is not a URL-encoded PEM certificate"
        ) from None


class ForwardAuth:
    """The `/authz` handler (and the metadata documents its challenges name)."""

    def __init__(self, components: Components, public_url: str):
        self._c = components
        self._door = GatewayDoor()
        self._proxies = TrustedProxies(components.settings.trusted_proxies)
        self._public_url = public_url

    def _gateway(self, request: Request) -> ServerRecord:
        keys = request.headers.getlist(API_KEY_HEADER)
        if len(keys) != 1 or not keys[0].strip():
            text = "the gateway sent no X-Tokenbroker-Api-Key (a registered server's key)"
            raise Refusal(401, "invalid_client", text, challenge=False)
        gateway = self._c.registry.server_by_api_key(keys[0].strip())
        if gateway is None:
            raise Refusal(
                401, "invalid_client", "the gateway's X-Tokenbroker-Api-Key is not registered", challenge=False
            )
        return gateway

    def _client_ip(self, request: Request) -> str:
        peer = request.client.host if request.client is not None else ""
        headers = request.headers
        return self._proxies.client_address(peer, headers.getlist("x-forwarded-for"), headers.getlist("x-real-ip"))

    async def _body_resource(self, request: Request, method: str) -> str | None:
        """What a forwarded JSON-RPC body touches (Traefik's `forwardBody`); None for no
        body, another type, or one over `MAX_BODY` (never a reason to refuse)."""
        if method != "POST":
            return None
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            return None
        body = bytearray()
        try:
            async with asyncio.timeout(BODY_SECONDS):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > MAX_BODY:
                        return None
        except TimeoutError:
            return None
        return resource_of(bytes(body))

    async def _original(self, request: Request) -> OriginalRequest:
        method = _agreed(request, "x-forwarded-method", "x-original-method") or request.method
        scheme = _one(request, "x-forwarded-proto")
        host = _one(request, "x-forwarded-host")
        target = _agreed(request, "x-forwarded-uri", "x-original-uri")
        missing = [name for name, value in (("Proto", scheme), ("Host", host)) if not value]
        if missing or not target:
            names = [f"X-Forwarded-{name}" for name in missing] + ([] if target else ["X-Forwarded-Uri"])
            raise Refusal(400, "invalid_request", f"the gateway sent no {', '.join(names)}: see contrib/gateways")
        resource = _one(request, "x-tokenbroker-resource") or await self._body_resource(request, method.upper())
        return OriginalRequest(
            method=method.upper(),
            scheme=scheme or "",
            host=host or "",
            target=target,
            authorization=tuple(request.headers.getlist("authorization")),
            proofs=tuple(request.headers.getlist("dpop")),
            client_ip=self._client_ip(request),
            cert_thumbprint=_client_cert(_one(request, "x-tokenbroker-client-cert")),
            resource=resource,
            route_scopes=" ".join(request.headers.getlist("x-tokenbroker-required-scopes")),
        )

    async def authz(self, request: Request) -> Response:
        audience: str | None = None
        routed: str | None = None
        original: OriginalRequest | None = None
        try:
            gateway = self._gateway(request)
            original = await self._original(request)
            routed = self._door.audience_of(original)
            audience = routed if routed in gateway.audiences else None  # challenges for its own only
            prepared = self._door.prepare(gateway, original, routed)
            built = prepared.request
            try:
                validation = built if isinstance(built, Validation) else await self._c.broker.avalidate_request(built)
            except TokenBrokerError as exc:
                raise refusal_for_error(exc) from None
            allowed = self._door.answer(prepared, validation)
        except Refusal as refusal:
            return self._refused(refusal, audience, original, routed)
        return Response(status_code=200, headers={**dict(allowed.headers()), **NO_STORE})

    def _refused(
        self, refusal: Refusal, audience: str | None, original: OriginalRequest | None, routed: str | None
    ) -> Response:
        log.info(
            "authz refused",
            status=refusal.status,
            error=refusal.error or "no credentials",
            reason=refusal.reason or None,
            detail=refusal.description or None,
            audience=routed,
            method=original.method if original else None,
            client_ip=original.client_ip if original else None,
        )
        headers = dict(NO_STORE)
        challenges = self._door.challenges(audience).for_refusal(refusal)
        if refusal.error == "invalid_client":  # the gateway's own credential
            headers["WWW-Authenticate"] = GATEWAY_CHALLENGE
        elif challenges:
            # One header holding both challenges (RFC 9110 section 11.6.1): a gateway
            # copies one upstream header into its own answer (nginx's auth_request_set).
            headers["WWW-Authenticate"] = ", ".join(challenges)
        if refusal.status == 503:
            headers["Retry-After"] = "1"
        body = {"error": refusal.error or "unauthorized", "error_description": description(refusal.description)}
        if not refusal.error:
            body["error_description"] = "authentication required"
        return JSONResponse(body, status_code=refusal.status, headers=headers)

    async def resource_metadata(self, request: Request) -> Response:
        """The RFC 9728 document of a registered audience, at its well-known path."""
        path = request.url.path[len(WELL_KNOWN_PATH) :] or "/"
        peer = request.client.host if request.client is not None else ""
        if self._proxies.trusts(peer):
            scheme = request.headers.get("x-forwarded-proto", request.url.scheme)
            host = request.headers.get("x-forwarded-host", request.headers.get("host", ""))
        else:
            scheme, host = request.url.scheme, request.headers.get("host", "")
        resource = f"{scheme.lower()}://{host.lower()}{'' if path == '/' else path}"
        for server in self._c.registry.servers():
            for audience in server.audiences:
                if audience == resource or (path == "/" and audience.rstrip("/") == resource):
                    document = ProtectedResourceMetadata(
                        audience, self._public_url, scopes_supported=server.required_scopes, require_dpop=False
                    )
                    headers = {"Cache-Control": "public, max-age=3600", "Access-Control-Allow-Origin": "*"}
                    return JSONResponse(document.document, headers=headers)
        return JSONResponse(
            {"error": "not_found", "error_description": "no registered MCP server has this resource URI"},
            status_code=404,
        )


__all__ = ["API_KEY_HEADER", "ForwardAuth"]
