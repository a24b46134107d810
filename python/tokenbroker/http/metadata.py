"""RFC 8414 authorization server metadata: where every endpoint of the issuer lives.

Every URL here is `public_url` plus a path, so the metadata's `issuer`, the tokens' `iss`,
the `aud` a client assertion names and what MCP servers publish in `authorization_servers`
are one string."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from tokenbroker.client_auth import ASSERTION_ALGORITHMS

METADATA_PATH = "/.well-known/oauth-authorization-server"
CLIENT_AUTH_METHODS = ("private_key_jwt", "client_secret_basic", "client_secret_post")
DPOP_ALGORITHMS = ("EdDSA", "ES256")


class Endpoints:
    """The issuer's endpoint URLs and the paths this server routes them on. An issuer with
    a path (`https://h/auth`) serves `/auth/token` and its metadata at
    `/.well-known/oauth-authorization-server/auth` (RFC 8414 section 3.1)."""

    def __init__(self, public_url: str):
        self.issuer = public_url
        base = public_url.rstrip("/")
        self.prefix = urlsplit(base).path  # "" or "/auth"
        parts = urlsplit(public_url)
        self.metadata_path = METADATA_PATH + self.prefix
        self.metadata_url = f"{parts.scheme}://{parts.netloc}{self.metadata_path}"
        self.token_url = f"{base}/token"
        self.jwks_url = f"{base}/jwks"
        self.introspection_url = f"{base}/introspect"
        self.revocation_url = f"{base}/revoke"
        self.authorization_url = f"{base}/authorize"

    def path(self, name: str) -> str:
        """The route of endpoint `name` ("token", "jwks", ...) on this server."""
        return f"{self.prefix}/{name}"


def authorization_server_metadata(
    endpoints: Endpoints, scopes: Iterable[str], grant_types: Iterable[str]
) -> dict[str, Any]:
    """The metadata document. `response_types_supported` is REQUIRED and honestly empty:
    tokenbroker has no authorization endpoint that issues codes; `authorization_endpoint`
    is there because clients' metadata parsers require it, and answers with an error."""
    return {
        "issuer": endpoints.issuer,
        "authorization_endpoint": endpoints.authorization_url,
        "token_endpoint": endpoints.token_url,
        "jwks_uri": endpoints.jwks_url,
        "introspection_endpoint": endpoints.introspection_url,
        "revocation_endpoint": endpoints.revocation_url,
        "response_types_supported": [],
        "grant_types_supported": list(grant_types),
        "token_endpoint_auth_methods_supported": list(CLIENT_AUTH_METHODS),
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "revocation_endpoint_auth_methods_supported": list(CLIENT_AUTH_METHODS),
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),
        "scopes_supported": sorted(set(scopes)),
        "client_id_metadata_document_supported": False,
        "token_types_supported": ["DPoP", "Bearer"],
    }


__all__ = ["CLIENT_AUTH_METHODS", "DPOP_ALGORITHMS", "METADATA_PATH", "Endpoints", "authorization_server_metadata"]
