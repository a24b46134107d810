"""For MCP servers that run the SDK's own auth stack (`AuthSettings` plus
`token_verifier=BrokerTokenVerifier(...)`), which unmodified SDK clients with Bearer tokens
talk to: the settings that send those clients to tokenbroker, and the `scope=` the SDK's
challenges lack.

    settings = auth_settings(public_url=PUBLIC_URL, resource=RESOURCE, required_scopes=["tools:call"])
    verifier = BrokerTokenVerifier(broker, audience=RESOURCE, require_dpop=False)
    server = MCPServer("name", auth=settings, token_verifier=verifier)     # FastMCP on mcp 1.x
    app = ScopeChallengeMiddleware(server.streamable_http_app(), required_scopes=["tools:call"])

`auth_settings` makes the SDK publish RFC 9728 protected resource metadata whose
`authorization_servers` is `[public_url]` (mcp 1.x writes a path-less URL with a trailing
`/`, which its clients and 2.x's compare as equal; `BrokerAuthMiddleware` with
`authorization_server=` publishes the string exactly). The SDK's `RequireAuthMiddleware`
answers a token without a required scope with 403 `insufficient_scope` but no `scope=`,
so a client cannot step up: `ScopeChallengeMiddleware` adds `scope=` (every scope the
server requires) to the SDK's 401 and 403 challenges. Leave the scopes to the SDK (not to
the verifier) to get that 403; a verifier with `required_scopes` refuses the token, which
the SDK answers with 401 (completed with `scope=` too, from which clients ask again).

In front of the SDK app, `BrokerAuthMiddleware` does all of this itself (and DPoP)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mcp.server.auth.settings import AuthSettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenbroker.mcp.resource_metadata import check_http_url

# RFC 6749 section 3.3 scope-token: NQCHAR, printable ASCII but space, `"` and `\`.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_HAS_SCOPE = re.compile(rb"(?:^|[\s,])scope\s*=", re.IGNORECASE)
_HAS_METADATA = re.compile(rb"(?:^|[\s,])resource_metadata\s*=", re.IGNORECASE)


def auth_settings(*, public_url: str, resource: str, required_scopes: Sequence[str] = ()) -> AuthSettings:
    """The SDK's `AuthSettings` for a resource server whose tokens come from tokenbroker:
    `issuer_url` = `public_url` (published as `authorization_servers`), `resource_server_url`
    = `resource` (this server's URI, the tokens' audience), `required_scopes`, and, on SDK
    releases that have it, `validate_token_resource` on."""
    check_http_url(public_url, "public_url (tokenbroker's issuer)")
    check_http_url(resource, "resource (this MCP server's URI)")
    if isinstance(required_scopes, str):
        required_scopes = required_scopes.split()
    fields: dict[str, Any] = {
        "issuer_url": public_url,
        "resource_server_url": resource,
        "required_scopes": list(required_scopes) or None,
    }
    if "validate_token_resource" in AuthSettings.model_fields:
        fields["validate_token_resource"] = True
    return AuthSettings(**fields)


class ScopeChallengeMiddleware:
    """ASGI middleware around an SDK app: adds `scope="<required_scopes>"` to each
    `WWW-Authenticate` challenge of a 401 or 403 answer that has none (and
    `resource_metadata="<url>"` when given and missing), so a client learns every scope the
    server needs (RFC 6750 section 3, MCP's step-up authorization). Anything else passes
    through untouched."""

    def __init__(self, app: ASGIApp, *, required_scopes: Sequence[str], resource_metadata_url: str | None = None):
        if isinstance(required_scopes, str):
            required_scopes = required_scopes.split()
        bad = [scope for scope in required_scopes if not _SCOPE_TOKEN.fullmatch(scope)]
        if bad or not required_scopes:
            raise ValueError(
                "required_scopes must be one or more scope tokens (printable ASCII without spaces, quotes or "
                "backslashes), the scopes the SDK's AuthSettings requires"
            )
        if resource_metadata_url is not None:
            check_http_url(resource_metadata_url, "resource_metadata_url")
        self.app = app
        self.required_scopes = tuple(required_scopes)
        self._scope = b'scope="' + " ".join(self.required_scopes).encode("ascii") + b'"'
        self._metadata = f'resource_metadata="{resource_metadata_url}"'.encode() if resource_metadata_url else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status") in (401, 403):
                headers = [
                    (name, self._completed(value) if name.lower() == b"www-authenticate" else value)
                    for name, value in message.get("headers", ())
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)

    def _completed(self, challenge: bytes) -> bytes:
        additions = [] if _HAS_SCOPE.search(challenge) else [self._scope]
        if self._metadata and not _HAS_METADATA.search(challenge):
            additions.append(self._metadata)
        if not additions:
            return challenge
        # "Bearer" alone takes its parameters after a space, "Bearer a=b" after a comma.
        separator = b", " if b"=" in challenge else b" "
        return challenge.rstrip() + separator + b", ".join(additions)


__all__ = ["ScopeChallengeMiddleware", "auth_settings"]
