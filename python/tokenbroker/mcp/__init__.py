"""The MCP SDK integration (`pip install tokenbroker[mcp]`; mcp 1.x `FastMCP` and 2.x
`MCPServer` alike).

Server side: `BrokerAuthMiddleware` (ASGI) validates each request's token and DPoP proof
with the broker before the SDK handles it, and `BrokerTokenVerifier` is the SDK's
`TokenVerifier`; tools read the caller with the SDK's `get_access_token()`, which returns
a `BrokerAccessToken`. Client side: `BrokerAuth`, an httpx auth that obtains, refreshes
and DPoP-signs the client's tokens."""

from tokenbroker.mcp.auth import BrokerAuth, TokenIssuer
from tokenbroker.mcp.middleware import DPOP_ALGS, BrokerAuthMiddleware, cert_thumbprint
from tokenbroker.mcp.verifier import BrokerAccessToken, BrokerTokenVerifier, Validator

__all__ = [
    "DPOP_ALGS",
    "BrokerAccessToken",
    "BrokerAuth",
    "BrokerAuthMiddleware",
    "BrokerTokenVerifier",
    "TokenIssuer",
    "Validator",
    "cert_thumbprint",
]
