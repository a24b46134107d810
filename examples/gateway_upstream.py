"""An MCP server with no auth code of its own, for running behind a gateway that asks
tokenbroker first (nginx `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth` on
`/authz`, or Envoy's ext_authz `Check`): the gateway lets only validated requests through,
strips the client's `Authorization` and `DPoP`, and sets who the caller is in
`X-Tokenbroker-Client-Id`, `-Session-Id` and `-Scopes`.

    .venv/bin/python examples/gateway_upstream.py --port 8000

Listen where only the gateway can reach it (loopback, a private network): the identity
headers are believed because the gateway overwrites whatever the client sent. Tools:
`whoami` (the identity headers, and whether any client credential reached the server) and
`add`. Works with mcp 2.x (`MCPServer`) and 1.x (`FastMCP`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import uvicorn

try:  # mcp 2.x
    from mcp.server.mcpserver import Context
    from mcp.server.mcpserver import MCPServer as _Server

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import Context  # type: ignore[attr-defined,no-redef,unused-ignore]
    from mcp.server.fastmcp import FastMCP as _Server  # type: ignore[attr-defined,no-redef,unused-ignore]

    MCP_MAJOR = 1


def _headers(ctx: Any) -> Mapping[str, str]:
    request = ctx.request_context.request
    headers = getattr(request, "headers", None)
    return headers if headers is not None else {}


def whoami(ctx: Context) -> dict[str, Any]:  # type: ignore[type-arg,unused-ignore]
    """Who is calling, as the gateway said: the identity headers it set."""
    headers = _headers(ctx)
    return {
        "client_id": headers.get("x-tokenbroker-client-id"),
        "session_id": headers.get("x-tokenbroker-session-id"),
        "scopes": (headers.get("x-tokenbroker-scopes") or "").split(),
        "credentials_seen": [name for name in ("authorization", "dpop") if headers.get(name)],
    }


def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


def create_app(*, host: str = "127.0.0.1", stateless: bool = False, json_response: bool = False) -> Any:
    """The SDK's streamable HTTP app (at /mcp), with no auth of its own."""
    options: dict[str, Any] = {}
    if MCP_MAJOR == 1:
        options = {"host": host, "stateless_http": stateless, "json_response": json_response}
    server = _Server("behind-a-gateway", **options)
    server.tool()(whoami)
    server.tool()(add)
    if MCP_MAJOR == 1:
        return server.streamable_http_app()
    return server.streamable_http_app(host=host, stateless_http=stateless, json_response=json_response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--json-response", action="store_true", help="answer JSON rather than SSE streams")
    args = parser.parse_args()
    app = create_app(host=args.host, json_response=args.json_response)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
