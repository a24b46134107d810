"""A real MCP server process that uses the SDK's own auth stack, as an SDK user writes it:
`AuthSettings` (built by `tokenbroker.mcp.auth_settings`) plus
`token_verifier=BrokerTokenVerifier(BrokerClient(...), audience=...)`, with no
tokenbroker middleware in front. Unmodified SDK OAuth clients (Bearer tokens) talk to it:
the SDK publishes the protected resource metadata naming tokenbroker's `public_url`, and
answers 401 with its own `Bearer` challenge.

    python tests/support/sdk_oauth_server.py --broker 127.0.0.1:50051 --api-key-file KEY \\
        --resource http://127.0.0.1:8001/mcp --public-url http://127.0.0.1:8080 --port 8001

Tools: `whoami` (the principal the verifier validated, from the SDK's `get_access_token()`)
and `add`. mcp 2.x `MCPServer` or 1.x `FastMCP`, whichever is installed."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token

from tokenbroker.client import BrokerClient
from tokenbroker.mcp import BrokerTokenVerifier, auth_settings

try:  # mcp 2.x
    from mcp.server.mcpserver import MCPServer as _Server

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as _Server  # type: ignore[attr-defined,no-redef,unused-ignore]

    MCP_MAJOR = 1


def whoami() -> dict[str, Any]:
    """The caller as the broker validated it (None outside an authenticated request)."""
    token = get_access_token()
    if token is None:
        return {"client_id": None}
    claims = getattr(token, "claims", None) or {}
    return {
        "client_id": token.client_id,
        "scopes": list(token.scopes),
        "issuer": claims.get("iss"),
        "resource": getattr(token, "resource", None),
        "session_id": claims.get("sid"),
    }


def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


def create_app(broker: BrokerClient, *, resource: str, public_url: str, required_scopes: Sequence[str]) -> Any:
    """The SDK's streamable HTTP app at the path of `resource`, with the SDK's auth on.

    The scopes are the SDK's to require (`AuthSettings.required_scopes`), not the
    verifier's: the SDK then answers a token without them with 403 `insufficient_scope`
    and publishes them as the metadata's `scopes_supported`, which SDK clients ask for.
    `require_dpop=False`: this server takes the Bearer tokens of clients registered with
    `binding` `bearer` (the SDK's clients cannot sign DPoP proofs)."""
    settings = auth_settings(public_url=public_url, resource=resource, required_scopes=required_scopes)
    verifier = BrokerTokenVerifier(broker, audience=resource, require_dpop=False)
    path = urlsplit(resource).path or "/"
    options: dict[str, Any] = {"streamable_http_path": path} if MCP_MAJOR == 1 else {}  # 1.x: HTTP settings here
    server = _Server("sdk-oauth-server", auth=settings, token_verifier=verifier, **options)
    server.tool()(whoami)
    server.tool()(add)
    if MCP_MAJOR == 1:
        return server.streamable_http_app()
    return server.streamable_http_app(streamable_http_path=path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True, help="the broker's gRPC host:port")
    parser.add_argument("--api-key-file", type=Path, required=True, help="this server's broker API key")
    parser.add_argument("--resource", required=True, help="this server's resource URI (the tokens' audience)")
    parser.add_argument("--public-url", required=True, help="tokenbroker's public_url (the issuer)")
    parser.add_argument("--scope", dest="scopes", action="append", help="required scope (default: tools:call)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    broker = BrokerClient(args.broker, api_key=args.api_key_file.read_text().strip(), timeout=5.0)
    app = create_app(
        broker, resource=args.resource, public_url=args.public_url, required_scopes=args.scopes or ["tools:call"]
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
