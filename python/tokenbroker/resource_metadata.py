"""RFC 9728 protected resource metadata: the document that sends a standard MCP client from
an MCP server to tokenbroker's authorization server, and where it lives.

An MCP client (authorization spec 2025-11-25) reads it first, at the `resource_metadata`
URL of a 401 challenge, else at `/.well-known/oauth-protected-resource` plus the resource's
path (RFC 9728 section 3.1), else at the bare well-known path, and follows
`authorization_servers[0]` (tokenbroker's `public_url`) to its RFC 8414 metadata. The
document is public: it is served without a token, and with CORS open so browser-based
clients can read it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.types import Receive, Scope, Send

WELL_KNOWN_PATH = "/.well-known/oauth-protected-resource"
DPOP_SIGNING_ALGS = ("EdDSA", "ES256")
_METHODS = b"GET, HEAD, OPTIONS"


def check_http_url(value: str, what: str) -> tuple[str, str, str]:
    """(scheme, netloc, path) of an absolute http(s) URL without query, fragment or user
    info; raises ValueError saying what to fix otherwise."""
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http(s) URL such as https://mcp.example.com/mcp")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError(f"{what} must have no query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what} must not carry a user name or password")
    return parts.scheme, parts.netloc, parts.path


def resource_metadata_path(resource: str) -> str:
    """The path of `resource`'s metadata: the well-known path with the resource's path
    appended (RFC 9728 section 3.1; a bare `/` path appends nothing)."""
    _, _, path = check_http_url(resource, "the resource (the MCP server's URI)")
    return WELL_KNOWN_PATH + ("" if path == "/" else path)


def resource_metadata_url(resource: str) -> str:
    """RFC 9728 section 3.1: the URL of `resource`'s metadata, e.g. `http://h/mcp` ->
    `http://h/.well-known/oauth-protected-resource/mcp` (what `resource_metadata=` names)."""
    scheme, netloc, _ = check_http_url(resource, "the resource (the MCP server's URI)")
    return f"{scheme}://{netloc}{resource_metadata_path(resource)}"


class ProtectedResourceMetadata:
    """The metadata document of one resource (an MCP server) and the ASGI app that serves it.

    `resource`: the server's resource URI (the tokens' audience). `authorization_server`:
    tokenbroker's `public_url`, the issuer, written as given (clients compare it with the
    authorization server metadata's `issuer` as strings). `scopes_supported`: the scopes
    clients should ask for (omitted when empty). `require_dpop`: published as
    `dpop_bound_access_tokens_required`.

    Served at `paths` (the path-inserted form and the bare one) for GET and HEAD; OPTIONS
    answers a CORS preflight; other methods get 405."""

    def __init__(
        self,
        resource: str,
        authorization_server: str,
        *,
        scopes_supported: Sequence[str] = (),
        require_dpop: bool = True,
    ) -> None:
        check_http_url(authorization_server, "authorization_server (tokenbroker's public_url, the issuer)")
        if isinstance(scopes_supported, str):
            scopes_supported = scopes_supported.split()
        self.resource = resource
        self.authorization_server = authorization_server
        self.url = resource_metadata_url(resource)
        self.paths = frozenset({resource_metadata_path(resource), WELL_KNOWN_PATH})
        document: dict[str, Any] = {"resource": resource, "authorization_servers": [authorization_server]}
        if scopes_supported:
            document["scopes_supported"] = list(scopes_supported)
        document |= {
            "bearer_methods_supported": ["header"],
            "dpop_signing_alg_values_supported": list(DPOP_SIGNING_ALGS),
            "dpop_bound_access_tokens_required": require_dpop,
        }
        self.document = document
        self._body = json.dumps(document, separators=(",", ":")).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        cors = [(b"access-control-allow-origin", b"*")]
        if method == "OPTIONS":
            headers = [*cors, (b"access-control-allow-methods", _METHODS), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if method not in ("GET", "HEAD"):
            body = b'{"error":"invalid_request","error_description":"protected resource metadata is read with GET"}'
            headers = [(b"content-type", b"application/json"), (b"allow", _METHODS)]
            headers.append((b"content-length", b"%d" % len(body)))
            await send({"type": "http.response.start", "status": 405, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"cache-control", b"public, max-age=3600"),
            *cors,
            (b"content-length", b"%d" % len(self._body)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else self._body})


__all__ = [
    "DPOP_SIGNING_ALGS",
    "WELL_KNOWN_PATH",
    "ProtectedResourceMetadata",
    "check_http_url",
    "resource_metadata_path",
    "resource_metadata_url",
]
