"""`BrokerAuthMiddleware`: validates every HTTP request to an MCP server with the broker
(token, DPoP proof, method, URI, client address, client certificate, and what the request
touches for the broker's detection) before the SDK sees it, and hands the validated
principal to the SDK.

The SDK's `TokenVerifier` sees only a token string, so it cannot check a DPoP proof; this
ASGI middleware can. Wrap the SDK's Starlette app with it:

    app = BrokerAuthMiddleware(server.streamable_http_app(), broker=broker, audience=URI)

A request it lets through carries, as the SDK's own bearer middleware would leave it,
`scope["user"]` (an `AuthenticatedUser`) and `scope["auth"]` (`AuthCredentials`), and the
SDK's auth context variable is set, so `get_access_token()` returns the
`BrokerAccessToken` inside tools. When the SDK app runs its own auth stack (built with
`token_verifier=BrokerTokenVerifier(...)` and `AuthSettings`), that stack sees the
request as `Bearer` and the verifier returns what this middleware validated: one broker
call per request either way.

With `authorization_server` (tokenbroker's `public_url`) it also publishes the RFC 9728
protected resource metadata that sends standard MCP clients there (see
`tokenbroker.mcp.resource_metadata`), and every challenge names it (`resource_metadata=`).
With `dpop_nonces` it requires server-provided DPoP nonces (RFC 9449 section 9).

Answers: 401 with `WWW-Authenticate` challenges for DPoP (`algs="EdDSA ES256"`) and, when
Bearer is accepted (`require_dpop=False`), Bearer (RFC 9449 section 7, RFC 6750 section 3),
`error="invalid_token"`, `error="invalid_dpop_proof"` or `error="use_dpop_nonce"` (with a
`DPoP-Nonce` header) on the scheme concerned; 403 `insufficient_scope` with `scope=` (every
scope this server requires); 400 `invalid_request` for duplicated credentials and for request
targets that could route somewhere other than where they were signed for (dot segments,
encoded dots, slashes or backslashes: see `routed_path`); 503 when the broker or its store
cannot answer (fail closed); 500 when the broker refuses this server (misconfiguration)."""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from starlette.authentication import AuthCredentials
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenbroker.dpop_nonce import NONCE_HEADER, USE_DPOP_NONCE, DpopNonces, proof_nonce
from tokenbroker.errors import StoreUnavailableError, TokenBrokerError
from tokenbroker.jsonrpc_resource import MAX_BODY, resource_of
from tokenbroker.mcp.request_body import ReplayableBody
from tokenbroker.mcp.verifier import BrokerAccessToken, Validator, validated_principal
from tokenbroker.models import Validation
from tokenbroker.resource_guard import (
    HOST,
    Challenges,
    Refusal,
    cert_thumbprint,
    checked_target,
    description,
    dpop_bound,
    presented,
    refusal_of,
)
from tokenbroker.resource_metadata import ProtectedResourceMetadata
from tokenbroker.resource_metadata import resource_metadata_url as resource_metadata_url_of

log = logging.getLogger("tokenbroker.mcp")

_PCHAR_SAFE = "/-._~!$&'()*+,;=:@"
_NONCE_HEADER_NAME = NONCE_HEADER.lower().encode("ascii")

_Refusal = Refusal
_description = description


def routed_path(scope: Scope) -> str:
    """The request path as the client spelled it (percent-encoded, no query), once it is
    proven to be the path the app routes; raises `_Refusal` (400) otherwise.

    The app routes `scope["path"]` (Starlette: that path, less `root_path` when it starts
    with it; its URLs keep the whole path), the DPoP `htu` is compared after WHATWG URL
    normalisation. The two agree only when the target has nothing normalisation would
    change: so a target is refused, never normalised, when it is not an RFC 3986 path
    (backslash, space, raw non-ASCII, stray `%`), has an empty segment, decodes to invalid
    UTF-8, has a `.` or `..` segment, percent-encodes a dot, slash or backslash (once or
    twice), decodes to a control character, or when `raw_path` decoded once differs from
    `path`."""
    path: str = scope["path"]
    raw_bytes = scope.get("raw_path")
    # Servers that give no raw_path: the canonical spelling of path (some put the query in raw_path).
    raw = quote(path, safe=_PCHAR_SAFE) if raw_bytes is None else raw_bytes.decode("latin-1").partition("?")[0]
    if checked_target(raw) != path:
        # A server or proxy that rewrote path, or a raw_path without the root_path: either
        # way the proof would cover one path while the app routes another.
        raise Refusal(
            400,
            "invalid_request",
            "request path does not decode to the path the app routes (raw_path and path disagree)",
        )
    return raw


def _with_nonce(send: Send, nonces: DpopNonces) -> Send:
    """`send`, adding the current DPoP nonce to the response (RFC 9449 section 9: a server
    may hand out a fresh nonce in any response)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), (_NONCE_HEADER_NAME, nonces.current().encode("ascii"))]
            message = {**message, "headers": headers}
        await send(message)

    return sending


class BrokerAuthMiddleware:
    """ASGI middleware validating every HTTP request with a broker.

    `broker`: an embedded `Broker` or a `BrokerClient` (anything with `avalidate`).
    `audience`: this server's resource URI (tokens for any other server are refused).
    `required_scopes`: scopes every request's token must carry (403 otherwise).
    `public_base_url`: the scheme, host and port (plus any path prefix a proxy strips)
    clients address this server by, e.g. "https://mcp.example.com" behind a proxy; the
    request path is appended to it to get the URI the DPoP proof must cover (`htu`).
    Without it the URI is rebuilt from the request (ASGI scheme, `Host` header, raw path),
    which trusts the Host header: set it in production and whenever a proxy sits in front.
    `exempt_paths`: path prefixes served without a token (default: `/.well-known/`, the
    OAuth protected resource metadata).
    `authorization_server`: tokenbroker's `public_url` (the issuer). When given, this
    middleware serves the RFC 9728 protected resource metadata itself, without a token, at
    `/.well-known/oauth-protected-resource` plus the audience's path and at the bare path,
    with `authorization_servers` = [`authorization_server`], `scopes_supported`
    (default: `required_scopes`) and `dpop_bound_access_tokens_required` = `require_dpop`;
    and every challenge carries `resource_metadata=` with its URL.
    `resource_metadata_url`: the RFC 9728 metadata URL for the challenges, when it is not
    the one derived from the audience (default: that one, with `authorization_server`;
    none without).
    `realm`: added to the challenges when given.
    `require_dpop` (default True, as a client's `binding` is `dpop` by default): only
    `Authorization: DPoP` with a verified proof gets in; a `Bearer` presentation is refused
    with 401 and the DPoP challenge before any broker call, and no Bearer challenge is
    offered. False also accepts Bearer tokens (clients registered with `binding` `bearer`
    or `mtls`, whose certificate the broker then checks).
    `dpop_nonces`: a `tokenbroker.dpop_nonce.DpopNonces` (share its key between replicas).
    When given, a DPoP proof must carry a nonce it accepts, or the request gets 401
    `error="use_dpop_nonce"` with a fresh nonce in `DPoP-Nonce`, before any broker call (so
    the proof's `jti` is not spent and the client re-signs with the nonce); every answer
    then carries the current nonce (RFC 9449 section 9). None: no nonce is required.

    Every request target is checked first (`routed_path`): one that could route somewhere
    other than the path the proof covers gets 400 before any validation, exempt paths too.

    The client address is the ASGI `client` (run uvicorn with `--proxy-headers` and
    `--forwarded-allow-ips` to have it taken from a trusted proxy). What the request touches
    (the broker's `resource`, for detection) is read from the JSON-RPC body of a POST with a
    JSON content type, "tools/call <name>", "resources/read <uri>", "prompts/get <name>" or
    the method (see `tokenbroker.mcp.jsonrpc_resource`); only a body of at most 64 KiB is
    parsed, and the app receives every body, larger ones too, exactly as it came. Other
    requests (the GET of an SSE stream, a DELETE) touch nothing: no `resource`. The client
    certificate thumbprint comes from the ASGI TLS extension (`scope["extensions"]["tls"]`) when the
    server provides it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        broker: Validator,
        audience: str,
        required_scopes: Sequence[str] = (),
        public_base_url: str | None = None,
        exempt_paths: Sequence[str] = ("/.well-known/",),
        resource_metadata_url: str | None = None,
        realm: str | None = None,
        require_dpop: bool = True,
        authorization_server: str | None = None,
        scopes_supported: Sequence[str] | None = None,
        dpop_nonces: DpopNonces | None = None,
    ) -> None:
        if not audience:
            raise ValueError("audience (this MCP server's resource URI) is required")
        if isinstance(required_scopes, str):
            required_scopes = required_scopes.split()
        if public_base_url is not None and not re.match(r"^https?://[^/?#]+(/[^?#]*)?$", public_base_url):
            raise ValueError("public_base_url must be an http(s) URL without query or fragment")
        self.app = app
        self.broker = broker
        self.audience = audience
        self.required_scopes = tuple(required_scopes)
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.exempt_paths = tuple(exempt_paths)
        self.require_dpop = require_dpop
        self.dpop_nonces = dpop_nonces
        self.resource_metadata = (
            ProtectedResourceMetadata(
                audience,
                authorization_server,
                scopes_supported=self.required_scopes if scopes_supported is None else scopes_supported,
                require_dpop=require_dpop,
            )
            if authorization_server is not None
            else None
        )
        if resource_metadata_url is None and authorization_server is not None:
            resource_metadata_url = resource_metadata_url_of(audience)
        self._challenges = Challenges(
            require_dpop=require_dpop, realm=realm, resource_metadata_url=resource_metadata_url
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # MCP has no websocket transport here
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = ReplayableBody(receive, MAX_BODY)  # read only just before the broker call
        try:
            path = routed_path(scope)  # before anything else: exempt paths are routed too
            if self.resource_metadata is not None and path in self.resource_metadata.paths:
                await self.resource_metadata(scope, receive, send)
                return
            authenticated = None if self._exempt(scope["path"]) else await self._authenticate(scope, path, body)
        except _Refusal as refusal:
            client = scope.get("client")
            log.info(
                "refused %s %s from %s: %d %s%s%s",
                scope.get("method"),
                _description(str(scope.get("path"))),
                client[0] if client else "-",
                refusal.status,
                refusal.error or "no credentials",
                f" {refusal.reason}" if refusal.reason else "",
                f" ({refusal.description})" if refusal.description else "",
            )
            await self._refuse(send, refusal)
            return
        if authenticated is None:
            await self.app(scope, receive, send)
            return
        token, inner = authenticated
        validated = validated_principal.set(token)
        context = auth_context_var.set(inner["user"])
        try:
            sending = send if self.dpop_nonces is None else _with_nonce(send, self.dpop_nonces)
            await self.app(inner, body.receive, sending)  # the body as it came, chunk for chunk
        finally:
            auth_context_var.reset(context)
            validated_principal.reset(validated)

    @staticmethod
    def _json_body(scope: Scope) -> bool:
        """Whether the request is a POST with one JSON `Content-Type` (`application/json`
        or a `+json` type): the only requests whose body names what they touch."""
        if scope["method"] != "POST":
            return False
        types = [value for name, value in scope["headers"] if name == b"content-type"]
        if len(types) != 1:
            return False
        media: bytes = types[0].partition(b";")[0].strip().lower()
        return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))

    async def _resource(self, scope: Scope, body: ReplayableBody) -> str | None:
        """What the request touches, for the broker's detection: the JSON-RPC target of a
        POST with a JSON body of at most `MAX_BODY` bytes (`resource_of`). None for every
        other request: a GET (the SSE stream a client opens to listen touches no tool), a
        DELETE (the session's end), a larger body (passed on whole, never parsed)."""
        if not self._json_body(scope):
            return None
        raw = await body.read()
        return None if raw is None else resource_of(raw)

    def _exempt(self, path: str) -> bool:
        """Served without a token: under an exempt prefix, with no dot segment to climb out."""
        return path.startswith(self.exempt_paths) and not any(part in (".", "..") for part in path.split("/"))

    # -- the request ------------------------------------------------------------------

    async def _authenticate(self, scope: Scope, path: str, body: ReplayableBody) -> tuple[BrokerAccessToken, Scope]:
        authorization, proofs = [], []
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization.append(value.decode("latin-1"))
            elif name == b"dpop":
                proofs.append(value.decode("latin-1"))
        scheme, token, proof = presented(authorization, proofs, require_dpop=self.require_dpop)
        # Before the broker sees the proof: a refused nonce must not spend its jti. The
        # nonce is read unverified; the broker then verifies the signature covering it.
        if proof is not None and self.dpop_nonces is not None and not self.dpop_nonces.accepts(proof_nonce(proof)):
            text = f"this server requires a nonce in DPoP proofs: sign again with the {NONCE_HEADER} one"
            raise Refusal(401, USE_DPOP_NONCE, text, scheme="dpop")
        # The body is read here, after every check that needs no broker: a request refused
        # on its headers alone costs no body read.
        validation = await self._validate(scope, path, token, proof, await self._resource(scope, body))
        if not validation.valid:
            raise self._refusal(validation, scheme, proof is not None)
        # A valid proof is one the broker checked only if the token is DPoP-bound: it ignores
        # a proof sent with a certificate-bound token.
        dpop_proven = proof is not None and dpop_bound(token)
        if self.require_dpop and not dpop_proven:
            description = "this server accepts only DPoP-bound tokens: ask the broker for one with your DPoP key"
            raise _Refusal(401, "invalid_token", description, scheme="dpop")
        principal = BrokerAccessToken.from_validation(token, validation, dpop_proven=dpop_proven)
        inner = dict(scope)
        inner["user"] = AuthenticatedUser(principal)
        inner["auth"] = AuthCredentials(list(principal.scopes))
        if scheme == "dpop":  # the SDK's own bearer stack, if present, reads only `Bearer`
            inner["headers"] = [
                (name, b"Bearer " + token.encode("ascii") if name == b"authorization" else value)
                for name, value in scope["headers"]
            ]
        return principal, inner

    def _uri(self, scope: Scope, path: str) -> str:
        """The request URI as the client addressed it (no query): the DPoP `htu`. `path` is
        the `routed_path`."""
        if self.public_base_url is not None:
            return self.public_base_url + path
        host = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), None)
        if host and not HOST.fullmatch(host):
            # The Host header becomes the proof's htu: only a bare host[:port], never a path.
            raise _Refusal(400, "invalid_request", "Host header is not a host[:port]")
        if not host:
            server = scope.get("server")
            if not server:
                raise _Refusal(400, "invalid_request", "request has no Host")
            host = f"{server[0]}:{server[1]}" if server[1] is not None else str(server[0])
        return f"{scope.get('scheme', 'http')}://{host}{path}"

    @staticmethod
    def _client_cert_thumbprint(scope: Scope) -> str | None:
        tls: Any = (scope.get("extensions") or {}).get("tls")
        if not isinstance(tls, dict):
            return None
        chain = tls.get("client_cert_chain") or ()
        if not chain:
            return None
        try:
            return cert_thumbprint(chain[0])
        except (ValueError, binascii.Error, TypeError):
            raise _Refusal(400, "invalid_request", "client certificate is unreadable") from None

    async def _validate(
        self, scope: Scope, path: str, token: str, proof: str | None, resource: str | None
    ) -> Validation:
        client = scope.get("client")
        try:
            return await self.broker.avalidate(
                token,
                audience=self.audience,
                dpop_proof=proof,
                http_method=scope["method"],
                http_uri=self._uri(scope, path),
                cert_thumbprint=self._client_cert_thumbprint(scope),
                client_ip=client[0] if client else None,
                required_scopes=self.required_scopes,
                resource=resource,
            )
        except StoreUnavailableError as exc:
            log.error("broker unavailable, request refused (fail closed): %s", exc)
            raise _Refusal(503, "temporarily_unavailable", "token validation is unavailable") from None
        except TokenBrokerError as exc:
            log.error("broker refused this server's validation call (%s): %s", type(exc).__name__, exc)
            raise _Refusal(500, "server_error", "token validation is misconfigured") from None

    def _refusal(self, validation: Validation, scheme: str, with_proof: bool) -> Refusal:
        return refusal_of(validation, scheme, with_proof, self.required_scopes)

    # -- answers ------------------------------------------------------------------------

    def challenges(self, error: str = "", description: str = "", *, scheme: str = "", scope: str = "") -> list[str]:
        """The `WWW-Authenticate` values: a DPoP challenge and, unless `require_dpop`, a Bearer
        one; `error` on `scheme`'s."""
        return self._challenges.values(error, description, scheme=scheme, scope=scope)

    async def _refuse(self, send: Send, refusal: _Refusal) -> None:
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        if self.dpop_nonces is not None:
            headers.append((_NONCE_HEADER_NAME, self.dpop_nonces.current().encode("ascii")))
        for value in self._challenges.for_refusal(refusal):
            headers.append((b"www-authenticate", value.encode("ascii")))
        if refusal.status == 503:
            headers.append((b"retry-after", b"1"))
        body = refusal.body()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
