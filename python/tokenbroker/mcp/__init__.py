"""The MCP SDK integration (`pip install tokenbroker[mcp]`; mcp 1.x `FastMCP` and 2.x
`MCPServer` alike).

Server side: `BrokerAuthMiddleware` (ASGI) validates each request's token and DPoP proof
with the broker before the SDK handles it, and `BrokerTokenVerifier` is the SDK's
`TokenVerifier`; tools read the caller with the SDK's `get_access_token()`, which returns
a `BrokerAccessToken`. With `authorization_server=` the middleware
publishes the RFC 9728 protected resource metadata that sends standard MCP clients to
tokenbroker's authorization server (`resource_metadata`); servers that run the SDK's own
auth stack use `auth_settings` and `ScopeChallengeMiddleware` (`sdk_auth`). Client side:
`BrokerAuth`, an httpx auth that obtains (over gRPC, or from a `TokenEndpoint` over HTTP),
refreshes and DPoP-signs the client's tokens and answers DPoP nonce challenges."""

from tokenbroker.mcp.auth import BrokerAuth, TokenIssuer
from tokenbroker.mcp.middleware import BrokerAuthMiddleware
from tokenbroker.mcp.resource_metadata import ProtectedResourceMetadata, resource_metadata_url
from tokenbroker.mcp.sdk_auth import ScopeChallengeMiddleware, auth_settings
from tokenbroker.mcp.token_endpoint import TokenEndpoint, TokenEndpointError
from tokenbroker.mcp.verifier import BrokerAccessToken, BrokerTokenVerifier, Validator
from tokenbroker.resource_guard import DPOP_ALGS, cert_thumbprint

__all__ = [
    "DPOP_ALGS",
    "BrokerAccessToken",
    "BrokerAuth",
    "BrokerAuthMiddleware",
    "BrokerTokenVerifier",
    "ProtectedResourceMetadata",
    "ScopeChallengeMiddleware",
    "TokenEndpoint",
    "TokenEndpointError",
    "TokenIssuer",
    "Validator",
    "auth_settings",
    "cert_thumbprint",
    "resource_metadata_url",
]
