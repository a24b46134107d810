"""An MCP server protected by tokenbroker: every HTTP request must carry a broker token
for this server (its audience) with a fresh DPoP proof of the client's key.

    .venv/bin/python examples/protected_server.py --broker 127.0.0.1:50051 \\
        --api-key-file .tokenbroker-demo/api-key --audience http://127.0.0.1:8000/mcp

Tools: `whoami` (the caller as the broker validated it, from the SDK's
`get_access_token()`) and `add`. Works with mcp 2.x (`MCPServer`) and 1.x (`FastMCP`).

`BrokerAuthMiddleware` validates token + proof + method + URI + client address before the
SDK sees the request; the SDK's own auth stack (`BrokerTokenVerifier`, `AuthSettings`)
then finds the principal already validated, enforces the required scopes again and serves
the OAuth protected resource metadata (RFC 9728) at /.well-known/oauth-protected-resource.

`--authorization-server URL` (tokenbroker's `public_url`) has the middleware publish that
metadata itself, with `authorization_servers` = [URL], so standard MCP clients find
tokenbroker's token endpoint; `--require-dpop-nonce` requires server-provided DPoP nonces
(RFC 9449 section 9; a random nonce key, right for one process)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.settings import AuthSettings

from tokenbroker.dpop_nonce import DpopNonces
from tokenbroker.mcp import BrokerAuthMiddleware, BrokerTokenVerifier, Validator
from tokenbroker.mcp import resource_metadata_url as _metadata_url

try:  # mcp 2.x
    from mcp.server.mcpserver import MCPServer as _Server

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as _Server  # type: ignore[attr-defined,no-redef,unused-ignore]

    MCP_MAJOR = 1

DEFAULT_AUDIENCE = "http://127.0.0.1:8000/mcp"
DEFAULT_ISSUER = "http://127.0.0.1:50051"  # the `issuer` setting of `tokenbroker serve`


def whoami() -> dict[str, Any]:
    """Who is calling: the client, scopes and broker session the broker validated."""
    token = get_access_token()
    if token is None:  # never for a protected server: the middleware let nobody else in
        return {"client_id": None}
    claims = token.claims or {}
    return {
        "client_id": token.client_id,
        "scopes": list(token.scopes),
        "session_id": claims.get("sid"),
        "token_id": claims.get("jti"),
        "issuer": claims.get("iss"),
        "subject": token.subject,
        "resource": token.resource,
    }


def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


def resource_metadata_url(audience: str) -> str:
    """RFC 9728 section 3.1: the well-known URI for the resource `audience`."""
    return _metadata_url(audience)


def create_server(
    verifier: BrokerTokenVerifier | None = None,
    *,
    issuer: str = DEFAULT_ISSUER,
    required_scopes: Sequence[str] = (),
    host: str = "127.0.0.1",
    stateless: bool = False,
    json_response: bool = False,
) -> Any:
    """The MCP server with its two tools; with `verifier`, the SDK's auth stack is on."""
    options: dict[str, Any] = {}
    if verifier is not None:
        settings: dict[str, Any] = {
            "issuer_url": issuer,
            "resource_server_url": verifier.audience,
            "required_scopes": list(required_scopes) or None,
        }
        if "validate_token_resource" in AuthSettings.model_fields:  # mcp >= 2
            settings["validate_token_resource"] = True
        options = {"token_verifier": verifier, "auth": AuthSettings(**settings)}
    if MCP_MAJOR == 1:  # FastMCP takes its HTTP settings here
        options |= {"host": host, "stateless_http": stateless, "json_response": json_response}
    server = _Server("tokenbroker-protected", **options)
    server.tool()(whoami)
    server.tool()(add)
    return server


def create_app(
    broker: Validator | None,
    *,
    audience: str = DEFAULT_AUDIENCE,
    issuer: str = DEFAULT_ISSUER,
    required_scopes: Sequence[str] = ("tools:call",),
    public_base_url: str | None = None,
    host: str = "127.0.0.1",
    stateless: bool = False,
    json_response: bool = False,
    require_dpop: bool = True,
    authorization_server: str | None = None,
    dpop_nonces: DpopNonces | None = None,
) -> Any:
    """The ASGI app: the SDK's streamable HTTP app behind `BrokerAuthMiddleware`, or
    unprotected when `broker` is None (for comparisons only). `require_dpop=False` also
    accepts Bearer tokens (clients registered with `binding` `bearer`).
    `authorization_server` (tokenbroker's `public_url`): the middleware publishes the
    protected resource metadata naming it (and the SDK's settings name it as the issuer).
    `dpop_nonces`: DPoP proofs must carry a nonce of these."""
    verifier = (
        BrokerTokenVerifier(broker, audience=audience, required_scopes=required_scopes, require_dpop=require_dpop)
        if broker
        else None
    )
    server = create_server(
        verifier,
        issuer=authorization_server or issuer,
        required_scopes=required_scopes,
        host=host,
        stateless=stateless,
        json_response=json_response,
    )
    if MCP_MAJOR == 1:
        app = server.streamable_http_app()
    else:
        app = server.streamable_http_app(host=host, stateless_http=stateless, json_response=json_response)
    if broker is None:
        return app
    return BrokerAuthMiddleware(
        app,
        broker=broker,
        audience=audience,
        required_scopes=required_scopes,
        public_base_url=public_base_url,
        resource_metadata_url=resource_metadata_url(audience),
        require_dpop=require_dpop,
        authorization_server=authorization_server,
        dpop_nonces=dpop_nonces,
    )


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    from tokenbroker.client import BrokerClient

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="127.0.0.1:50051", help="the broker's host:port")
    parser.add_argument("--api-key-file", type=Path, required=True, help="this server's broker API key")
    parser.add_argument("--audience", default=DEFAULT_AUDIENCE, help="this server's resource URI")
    parser.add_argument("--issuer", default=DEFAULT_ISSUER, help="the broker's issuer (for the resource metadata)")
    parser.add_argument("--scope", dest="scopes", action="append", help="required scope (default: tools:call)")
    parser.add_argument("--public-base-url", help="scheme://host[:port][/prefix] clients use, behind a proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--stateless", action="store_true", help="stateless streamable HTTP")
    parser.add_argument(
        "--require-dpop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="accept only DPoP-bound tokens with their proof (default); --no-require-dpop also accepts Bearer",
    )
    parser.add_argument(
        "--authorization-server",
        metavar="URL",
        help="tokenbroker's public_url: publish the protected resource metadata naming it (RFC 9728)",
    )
    parser.add_argument(
        "--require-dpop-nonce", action="store_true", help="require server-provided DPoP nonces (RFC 9449 section 9)"
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key_file.read_text().strip()
    broker = BrokerClient(args.broker, api_key=api_key, timeout=5.0)
    app = create_app(
        broker,
        audience=args.audience,
        issuer=args.issuer,
        required_scopes=args.scopes or ["tools:call"],
        public_base_url=args.public_base_url,
        host=args.host,
        stateless=args.stateless,
        require_dpop=args.require_dpop,
        authorization_server=args.authorization_server,
        dpop_nonces=DpopNonces() if args.require_dpop_nonce else None,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
