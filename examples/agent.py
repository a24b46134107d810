"""An MCP client authenticating with tokenbroker: lists the server's tools and calls one.

    .venv/bin/python examples/agent.py --client-id demo-client \\
        --key .tokenbroker-demo/client-key.pem --url http://127.0.0.1:8000/mcp

`BrokerAuth` gets a token from the broker with the client's private-key assertion, bound
to a DPoP key held in memory, refreshes it before expiry and signs a fresh DPoP proof for
every HTTP request. Works with mcp 2.x (`Client`, httpx2) and 1.x (`ClientSession`, httpx).

`--token-endpoint URL` gets the tokens from `tokenbroker serve`'s OAuth token endpoint over
HTTP (`http://127.0.0.1:8080/token`, or the issuer `http://127.0.0.1:8080` to discover it)
instead of gRPC `IssueToken`; DPoP nonces are answered either way."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, cast

from tokenbroker.client import BrokerClient
from tokenbroker.mcp import BrokerAuth

try:  # mcp 2.x: the SDK's HTTP client is httpx2
    import httpx2 as http
    from mcp import Client

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x: httpx
    import httpx as http  # type: ignore[no-redef]
    from mcp import ClientSession

    MCP_MAJOR = 1
try:  # mcp 2.x, and 1.x from 1.24
    from mcp.client.streamable_http import streamable_http_client
except ImportError:  # older mcp 1.x
    from mcp.client.streamable_http import streamablehttp_client  # type: ignore[attr-defined,unused-ignore]

    streamable_http_client = None  # type: ignore[assignment]


def http_client(auth: BrokerAuth | None, **options: Any) -> Any:
    """An AsyncClient of the SDK's HTTP library with `auth` on every request (BrokerAuth is
    an httpx.Auth and, when httpx2 is installed, an httpx2.Auth too)."""
    return http.AsyncClient(auth=cast(Any, auth), timeout=http.Timeout(30.0, read=300.0), **options)


@asynccontextmanager
async def connect(url: str, auth: BrokerAuth | None, **client_options: Any) -> AsyncIterator[Any]:
    """An MCP session over streamable HTTP (`list_tools`, `call_tool`), every request
    authenticated by `auth`. `client_options` go to the AsyncClient (e.g. event_hooks)."""
    async with AsyncExitStack() as stack:
        if MCP_MAJOR == 2:
            client = await stack.enter_async_context(http_client(auth, **client_options))
            yield await stack.enter_async_context(Client(streamable_http_client(url, http_client=client)))
            return
        if streamable_http_client is not None:
            client = await stack.enter_async_context(http_client(auth, **client_options))
            streams = await stack.enter_async_context(streamable_http_client(url, http_client=client))
        else:

            def factory(headers: Any = None, timeout: Any = None, auth: Any = None) -> Any:
                return http.AsyncClient(headers=headers, timeout=timeout, auth=auth, **client_options)

            streams = await stack.enter_async_context(
                streamablehttp_client(url, auth=cast(Any, auth), httpx_client_factory=factory)
            )
        session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
        await session.initialize()
        yield session


def tool_result(result: Any) -> Any:
    """A tool call's value: its structured content, or its text content as JSON."""
    if getattr(result, "is_error", None) or getattr(result, "isError", None):
        raise RuntimeError(f"tool failed: {result.content}")
    structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
    if structured is not None:
        return structured.get("result", structured) if isinstance(structured, dict) else structured
    return json.loads(result.content[0].text)


async def run(url: str, auth: BrokerAuth) -> dict[str, Any]:
    async with connect(url, auth) as session:
        listed = await session.list_tools()
        names = sorted(tool.name for tool in listed.tools)
        me = tool_result(await session.call_tool("whoami", {}))
        total = tool_result(await session.call_tool("add", {"a": 2, "b": 3}))
    return {"tools": names, "whoami": me, "add(2, 3)": total}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/mcp", help="the MCP server's endpoint")
    parser.add_argument("--audience", help="the server's resource URI (default: --url)")
    parser.add_argument("--broker", default="127.0.0.1:50051", help="the broker's host:port")
    parser.add_argument("--issuer", default="http://127.0.0.1:50051", help="the broker's issuer")
    parser.add_argument("--client-id", default="demo-client")
    parser.add_argument("--key", type=Path, default=Path(".tokenbroker-demo/client-key.pem"), help="client PEM key")
    parser.add_argument("--scope", dest="scopes", action="append", help="scope to ask for (default: tools:call)")
    parser.add_argument(
        "--token-endpoint",
        metavar="URL",
        help="get tokens from this OAuth token endpoint (or issuer) over HTTP instead of the broker's gRPC",
    )
    args = parser.parse_args(argv)

    print(json.dumps(asyncio.run(_main(args)), indent=2))


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    if args.token_endpoint:
        auth = BrokerAuth.from_token_endpoint(
            args.token_endpoint,
            client_id=args.client_id,
            private_key=args.key.read_bytes(),
            resource=args.audience or args.url,
            scopes=args.scopes or ["tools:call"],
        )
        return await run(args.url, auth)
    async with BrokerClient(args.broker, timeout=5.0) as broker:
        auth = BrokerAuth(
            broker,
            client_id=args.client_id,
            private_key=args.key.read_bytes(),
            issuer=args.issuer,
            audience=args.audience or args.url,
            scopes=args.scopes or ["tools:call"],
        )
        return await run(args.url, auth)


if __name__ == "__main__":
    main()
