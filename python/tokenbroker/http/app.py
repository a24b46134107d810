"""The Starlette application of the HTTP door: routes, and the answers of the small
endpoints (metadata, JWKS, the authorization endpoint's honest refusal, health)."""

from __future__ import annotations

import json
import time
from importlib import resources
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenbroker.app import Components
from tokenbroker.dpop_nonce import DpopNonces
from tokenbroker.errors import StoreUnavailableError
from tokenbroker.gateway.forward_auth import ForwardAuth
from tokenbroker.http.errors import NO_STORE, SECURITY_HEADERS, OAuthError, error_response
from tokenbroker.http.introspection import Introspection
from tokenbroker.http.metadata import Endpoints, authorization_server_metadata
from tokenbroker.http.token_endpoint import CLIENT_CREDENTIALS, JWT_BEARER_GRANT, TokenEndpoint
from tokenbroker.resource_metadata import WELL_KNOWN_PATH

log = structlog.get_logger("tokenbroker.http")
OPENAPI_RESOURCE = "openapi.json"
# /authz answers the method the gateway forwards (nginx's auth_request keeps the client's).
AUTHZ_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
NONCE_PURPOSE = "token endpoint"


def nonces_for(components: Components) -> DpopNonces:
    """The token endpoint's nonces, under a key derived from the active signing key: every
    replica holds it (they share the key file), so a nonce one replica handed out is
    accepted by all of them, and nothing more needs to be configured or stored."""
    keyring = components.broker.keyring
    secret = keyring.key_set.private_pem(keyring.active_kid).encode()
    return DpopNonces.derived(secret, NONCE_PURPOSE, window_seconds=components.settings.dpop_nonce_window_seconds)


_SECURITY_HEADERS = tuple((name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items())


class _SecurityHeaders:
    """Headers every answer carries: nothing here is for a browser to render or frame."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, sending)


def build_http_app(components: Components, *, public_url: str | None = None) -> Starlette:
    """The HTTP door for `components` (see `tokenbroker.http`)."""
    settings = components.settings
    endpoints = Endpoints(public_url or components.broker.issuer)
    nonces = nonces_for(components)
    token = TokenEndpoint(
        components,
        endpoints,
        nonces,
        require_dpop_nonce=settings.require_dpop_nonce,
        session_idle_seconds=settings.session_idle_seconds,
        attesters=components.attesters,
    )
    grants = (CLIENT_CREDENTIALS, JWT_BEARER_GRANT) if components.attesters is not None else (CLIENT_CREDENTIALS,)
    introspection = Introspection(components)
    forward_auth = ForwardAuth(components, endpoints.issuer)

    async def metadata(request: Request) -> Response:
        try:
            clients = components.registry.clients()
        except StoreUnavailableError:  # the registry shared through Redis is out of reach
            return error_response(
                OAuthError(
                    "temporarily_unavailable",
                    "the broker's registry is unreachable",
                    status=503,
                    headers={"Retry-After": "5"},
                )
            )
        scopes = {s for client in clients for s in client.allowed_scopes}
        document = authorization_server_metadata(endpoints, scopes, grants)
        return JSONResponse(document, headers={"Cache-Control": "public, max-age=60"})

    async def jwks(request: Request) -> Response:
        return JSONResponse(components.broker.jwks(), headers={"Cache-Control": "public, max-age=60"})

    async def authorize(request: Request) -> Response:
        # RFC 6749 section 4.1.2.1: with no registered redirect URI, never redirect; answer.
        return error_response(
            OAuthError(
                "unsupported_response_type",
                "tokenbroker authenticates clients, not people: there is no authorization code flow; use the "
                f"client_credentials grant at {endpoints.token_url}",
            )
        )

    async def healthz(request: Request) -> Response:
        try:
            await components.broker.store.asessions("\x00healthz", now=int(time.time()))
        except StoreUnavailableError:
            return JSONResponse({"status": "not_serving", "store": "unreachable"}, status_code=503, headers=NO_STORE)
        return JSONResponse({"status": "serving"}, headers=NO_STORE)

    async def openapi(request: Request) -> Response:
        text = resources.files("tokenbroker.http").joinpath(OPENAPI_RESOURCE).read_text("utf-8")
        return JSONResponse(json.loads(text))

    routes = [
        Route(endpoints.metadata_path, metadata, methods=["GET"]),
        Route(endpoints.path("token"), token.handle, methods=["POST"]),
        Route(endpoints.path("jwks"), jwks, methods=["GET"]),
        Route(endpoints.path("introspect"), introspection.introspect, methods=["POST"]),
        Route(endpoints.path("revoke"), introspection.revoke, methods=["POST"]),
        Route(endpoints.path("authorize"), authorize, methods=["GET"]),
        Route("/authz", forward_auth.authz, methods=AUTHZ_METHODS),
        Route(WELL_KNOWN_PATH, forward_auth.resource_metadata, methods=["GET"]),
        Route(WELL_KNOWN_PATH + "/{rest:path}", forward_auth.resource_metadata, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders)])
    # No 307 to the slash-less path (built from the request's Host header): an unknown path is a 404.
    app.router.redirect_slashes = False
    return app


__all__ = ["build_http_app", "nonces_for"]
